"""Launch shapes at the extremes the API accepts, computed without running anything: every grid
axis within CUDA's limits (x < 2**31, y and z <= 65535)."""

from __future__ import annotations

import pytest

from proxykv.kernels.attention.triton_impl import GPU_CONFIGS, LaunchPlan, launch_grids

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


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_a_plan_asking_for_too_many_splits_still_launches(config):
    block_m, block_n, num_warps, num_stages = config
    plan = LaunchPlan(block_m, block_n, n_splits=1 << 20, num_warps=num_warps,
                      num_stages=num_stages)
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
def test_decode_splits_fill_the_gpu_by_total_work(lengths):
    """The decode plan sizes its splits from the total rows to read, not the longest segment, so
    ragged and batched caches fill the machine: at least half the target number of programs, or
    (when there is too little work for that) every split at its smallest size."""
    import torch

    from proxykv.kernels.attend import triton_impl

    plan = triton_impl.plan_ragged_attention(max(lengths), len(lengths), 4, 128, torch.bfloat16,
                                             True, total_rows=sum(lengths))
    useful = _useful_programs(lengths, plan)
    smallest_split = triton_impl.GPU_MIN_TILES_PER_SPLIT * plan.block_n
    assert plan.keys_per_split >= smallest_split
    assert useful >= min(triton_impl.GPU_TARGET_PROGRAMS // 2, sum(lengths) // smallest_split), \
        (useful, plan)
    assert useful <= 4 * triton_impl.GPU_TARGET_PROGRAMS  # not split into needless merges
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
