"""Launch shapes at the extremes the API accepts, computed without running anything: every grid
axis within CUDA's limits (x < 2**31, y and z <= 65535)."""

from __future__ import annotations

import pytest

from proxykv.kernels.attention.triton_impl import GPU_TILES, LaunchPlan, launch_grids

GRID_X_LIMIT = 2**31 - 1
GRID_YZ_LIMIT = 65535


def assert_launchable(grid) -> None:
    assert 1 <= grid[0] <= GRID_X_LIMIT, grid
    assert all(1 <= axis <= GRID_YZ_LIMIT for axis in grid[1:]), grid


# (B, H_kv, group, T_q, T_k): a group of 32 at 128k queries (4.19M rows of one KV head), 1M-token
# reconstruction, a window over 4M keys, a wide batch
EXTREME_SHAPES = [
    (1, 1, 32, 131072, 131072),
    (1, 8, 4, 1 << 20, 1 << 20),
    (1, 8, 8, 64, 1 << 22),
    (512, 8, 8, 2048, 2048),
    (1, 1, 1, 1, 1),
]


@pytest.mark.parametrize("shape", EXTREME_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("on_gpu", [True, False])
def test_attention_scores_grids_fit_at_extreme_shapes(shape, on_gpu):
    b, h_kv, group, t_q, t_k = shape
    lse_grid, scores_grid, keys_per_split = launch_grids(b, h_kv, group, t_q, t_k,
                                                         on_gpu=on_gpu)
    assert_launchable(lse_grid)
    assert_launchable(scores_grid)
    assert keys_per_split >= 1 and lse_grid[1] * keys_per_split >= t_k


@pytest.mark.parametrize("tile", GPU_TILES)
def test_a_plan_asking_for_too_many_splits_still_launches(tile):
    block_m, block_n, num_warps = tile
    plan = LaunchPlan(block_m, block_n, n_splits=1 << 20, num_warps=num_warps)
    lse_grid, _, keys_per_split = launch_grids(1, 1, 1, 1, 1 << 30, plan=plan)
    assert_launchable(lse_grid)
    assert keys_per_split % block_n == 0


@pytest.mark.parametrize("causal", [False, True])
def test_scores_read_queries_past_2_31_elements(causal, device):
    """The second query row starts 2**31 elements into q's storage (as in a [B, T, H, D] cache at
    H * D = 16384, T = 128k): its offset needs 64-bit arithmetic. The storage is allocated lazily,
    so only the pages of the two rows are touched. (The interpreter computes the offset right
    either way; compiled on a GPU, a 32-bit product would read the wrong row.)"""
    import torch

    from proxykv import attention_scores

    d, t_q, t_k, row_stride = 16, 2, 32, 1 << 31
    storage = torch.UntypedStorage((row_stride + d) * 2, device=device)
    q = torch.empty(0, dtype=torch.float16, device=device).set_(
        storage, 0, (1, 1, t_q, d), (0, 0, row_stride, 1))
    values = torch.randn(1, 1, t_q, d, dtype=torch.float16, device=device)
    q.copy_(values)
    k = torch.randn(1, 1, t_k, d, dtype=torch.float16, device=device)
    got = attention_scores(q, k, causal=causal, impl="triton")
    expected = attention_scores(values, k, causal=causal, impl="torch")
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


def _useful_programs(lengths, plan, query_blocks=1):
    """Programs that have keys to read: per segment, its splits that start inside it."""
    return query_blocks * sum(max(1, -(-n // plan.keys_per_split)) for n in lengths)


@pytest.mark.parametrize("lengths", [
    [32768] + [1024] * 31,            # one long conversation among short ones
    [4096] * 8,                       # a small uniform batch
    [100_000, 50_000, 3, 7000],       # very ragged
    [131072] + [4096] * 31,           # a long one among medium ones
], ids=["one-long", "uniform", "ragged", "long-medium"])
@pytest.mark.parametrize("sm_count", [132, 78, 8], ids=["H100", "H20", "small"])
def test_decode_splits_fill_the_gpu_by_total_work(lengths, sm_count):
    """The decode plan sizes its splits from the total rows to read (not the longest segment) and
    the device's SM count, so ragged and batched caches fill the machine: at least half the
    target number of programs, or (when there is too little work for that) every split at its
    smallest size."""
    import torch

    from proxykv.kernels.attend import triton_impl

    plan = triton_impl.plan_ragged_attention(max(lengths), len(lengths), 4, 128, torch.bfloat16,
                                             True, total_rows=sum(lengths), sm_count=sm_count)
    useful = _useful_programs(lengths, plan)
    smallest_split = triton_impl.GPU_MIN_TILES_PER_SPLIT * plan.block_n
    assert plan.keys_per_split >= smallest_split
    from proxykv.kernels._gpu import PROGRAMS_PER_SM

    target = PROGRAMS_PER_SM * sm_count
    assert useful >= min(target // 2, sum(lengths) // smallest_split), (useful, plan)
    assert useful <= 4 * target  # not split into needless merges
    assert_launchable((len(lengths) * -(-4 // plan.block_m), plan.num_splits))


def test_decode_plan_caps_the_split_count():
    import torch

    from proxykv.kernels.attend import triton_impl

    plan = triton_impl.plan_ragged_attention((1 << 31) - 1, 1, 1, 64, torch.float16, True,
                                             total_rows=(1 << 31) - 1)
    assert plan.num_splits <= GRID_YZ_LIMIT
    block_n = triton_impl.gpu_tile(torch.float16)[0]
    with pytest.raises(ValueError, match="keys_per_split"):
        triton_impl.plan_ragged_attention(1 << 30, 1, 1, 64, torch.float16, True,
                                          keys_per_split=block_n)


def test_total_rows_is_a_checked_hint(device):
    import torch

    from proxykv.kernels import ragged_attention

    g = torch.Generator().manual_seed(0)
    lengths = [40, 3, 1, 17]
    k = torch.randn(sum(lengths), 16, generator=g).to(device)
    v = torch.randn(sum(lengths), 16, generator=g).to(device)
    q = torch.randn(2, 4, 1, 16, generator=g).to(device)
    cu = torch.tensor([0, 40, 43, 44, 61], device=device)
    base = ragged_attention(q, k, v, cu, impl="triton")
    for hint in (0, 1, sum(lengths)):
        torch.testing.assert_close(ragged_attention(q, k, v, cu, total_rows=hint, impl="triton"),
                                   base, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="total_rows"):
        ragged_attention(q, k, v, cu, total_rows=sum(lengths) + 1)
    with pytest.raises(TypeError, match="total_rows"):
        ragged_attention(q, k, v, cu, total_rows=1.5)


# Shared memory per block (opt-in) of the GPUs a plan must fit: H100/H200, A100, and the 99 KiB of
# sm_86/sm_89.
SHARED_LIMITS = [232_448, 166_912, 101_376]


@pytest.mark.parametrize("shared_memory", SHARED_LIMITS, ids=lambda s: f"{s // 1024}KiB")
@pytest.mark.parametrize("itemsize", [2, 4], ids=["16bit", "fp32"])
@pytest.mark.parametrize("per_head", [False, True], ids=["folded", "per-head"])
def test_scoring_plans_fit_shared_memory_at_every_head_dim(shared_memory, itemsize, per_head):
    """Every head dim the API accepts, at window and reconstruction lengths: the launcher's plan
    needs at most the device's shared memory in either pass (by the estimate that
    tests/test_compile.py checks against the compiler), pipelined at least one stage."""
    from proxykv.kernels._gpu import GpuLimits
    from proxykv.kernels.attention import triton_impl

    limits = GpuLimits(sm_count=132, shared_memory=shared_memory)
    for head_dim in [1, 16, 63, 64, 80, 96, 112, 128, 160, 192, 255, 256]:
        for t_q in (1, 64, 128, 129, 4096, 1 << 20):
            plan = triton_impl._default_plan(1, 8, 4, t_q, 1 << 20, True, head_dim=head_dim,
                                             itemsize=itemsize, per_head=per_head, limits=limits)
            needs = triton_impl.shared_memory_bytes(plan.block_m, plan.block_n, head_dim,
                                                    itemsize, plan.num_stages, plan.score_stages)
            assert max(needs) <= shared_memory, (head_dim, t_q, plan, needs)
            assert plan.num_stages >= 1 and 1 <= plan.score_stages <= 2, plan


def test_reconstruction_plans_use_128_row_tiles_and_3_stages_on_an_h100():
    from proxykv.kernels.attention import triton_impl

    long = triton_impl._default_plan(1, 8, 4, 8192, 8192, True, head_dim=128)
    assert (long.block_m, long.block_n, long.num_warps, long.num_stages) == (128, 128, 8, 3)
    mixed = triton_impl._default_plan(1, 8, 4, 8192, 8192, True, head_dim=128, per_head=True)
    assert (mixed.block_m, mixed.block_n, mixed.num_warps) == (128, 64, 8)  # 128 x 128 spills
    window = triton_impl._default_plan(1, 8, 4, 64, 1 << 17, True, head_dim=128)
    assert (window.block_m, window.num_warps) == (64, 4)
    row_blocks = 8 * (4 * 64 // 64)  # KV heads x row blocks of the group's 256 rows
    assert window.n_splits * row_blocks >= 4 * 132  # the key splits fill the GPU
    # On an A100 at D = 256 the reconstruction tile still fits, with fewer stages or rows.
    from proxykv.kernels._gpu import GpuLimits

    a100 = triton_impl._default_plan(1, 8, 4, 8192, 8192, True, head_dim=256,
                                     limits=GpuLimits(108, 166_912))
    assert max(triton_impl.shared_memory_bytes(a100.block_m, a100.block_n, 256, 2,
                                               a100.num_stages, a100.score_stages)) <= 166_912


@pytest.mark.parametrize("block, stride_t, head_dim, stride_d, wide", [
    (128, 1 << 25, 128, 1, True),          # 127 rows of 2**25 elements: past 2**31
    (128, (1 << 31) // 127 - 1, 16, 1, False),
    (128, 16384, 128, 1, False),           # [B, T, H, D] at H * D = 16384
    (16, 1, 128, 1 << 28, True),           # a transposed head dim
])
def test_tile_offsets_widen_only_when_they_could_pass_2_31(block, stride_t, head_dim, stride_d,
                                                           wide):
    from proxykv.kernels.attention import triton_impl

    assert triton_impl._wide_tile_offsets(block, stride_t, head_dim, stride_d) is wide


@pytest.mark.parametrize("batch, h_kv, n", [(1, 8, 1 << 24), (8192, 8, 4096), (1, 1, 1)],
                         ids=["16M-rows-kept", "batch-8192", "one"])
@pytest.mark.parametrize("head_dim, itemsize", [(64, 2), (128, 2), (256, 4)])
def test_gather_grids_fit_at_extreme_shapes(batch, h_kv, n, head_dim, itemsize):
    """16M kept rows of one head made 262,144 blocks on grid axis 1 before the blocks moved to
    axis 0 with the (batch, head) rows."""
    from proxykv.kernels.gather import triton_impl

    block_n = triton_impl.tile_shape(head_dim, itemsize)[0]
    assert_launchable(triton_impl.gather_grid(batch, h_kv, n, block_n))


@pytest.mark.parametrize("batch, heads, length, layers_out", [
    (8192, 8, 4096, 80),        # 65,536 (batch, head) rows: one past axis 1's limit
    (1, 8, 1 << 26, 80),        # a 64M-token row
    (1, 1, 1, 1),
])
def test_combine_layers_grids_fit_at_extreme_shapes(batch, heads, length, layers_out):
    from proxykv.kernels.aggregate import triton_impl

    assert_launchable(triton_impl.combine_grid(batch, heads, length, layers_out))


def test_aggregate_grids_fit_and_an_impossible_one_is_refused():
    """Score aggregation launches rows (batch × layers × heads) by tiles of the length: a row of
    2**27 tokens has 131,072 tiles, past axis 1's limit, and fits on axis 0. A grid past axis 0's
    2**31 - 1 programs raises a ValueError before any launch."""
    from proxykv.kernels._layout import rows_by_tiles_grid
    from proxykv.kernels.aggregate import triton_impl

    for rows, length in [(8, 1 << 27), (32 * 80 * 32, 1 << 17), (1, 1)]:
        assert_launchable(rows_by_tiles_grid(rows, -(-length // triton_impl._block_t(length))))
    with pytest.raises(ValueError, match="programs"):
        rows_by_tiles_grid(1 << 20, 1 << 12)


def test_plans_assume_an_h100_off_a_gpu():
    import torch

    from proxykv.kernels._gpu import H100, gpu_limits

    assert gpu_limits(None) == gpu_limits(torch.device("cpu")) == H100


def test_a_device_too_small_for_any_scoring_tile_is_refused():
    from proxykv.kernels._gpu import GpuLimits
    from proxykv.kernels.attention import triton_impl

    with pytest.raises(ValueError, match="no attention_scores tile fits in 16384 bytes"):
        triton_impl.gpu_tile_and_stages(4096, 256, 4, limits=GpuLimits(16, 16 * 1024))
