"""Triton path of ``pool_scores``: the fused aggregation kernel with a group of one head (no group
reduction, no normalisation) — one pooling kernel in the library, shared with
``aggregate_scores``."""

from __future__ import annotations

import torch

from proxykv.kernels.aggregate.triton_impl import aggregate_scores_triton

# The pooling variants are compiled as part of the aggregation kernel's COMPILE_SPECS.
COMPILE_SPECS = []


def pool_scores_triton(scores: torch.Tensor, kernel_size: int, mode: str) -> torch.Tensor:
    pooled = aggregate_scores_triton(scores.unsqueeze(-2), group_size=1, group_mode="max",
                                     pool_kernel_size=kernel_size, pool_mode=mode,
                                     normalize="none")
    return pooled.squeeze(-2)
