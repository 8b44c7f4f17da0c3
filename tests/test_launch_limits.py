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
