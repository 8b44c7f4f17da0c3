"""Naive oracle for ``pool_scores``: a Python loop over window offsets, in float64."""

from __future__ import annotations

import torch


def pool_scores_reference(scores: torch.Tensor, kernel_size: int, mode: str) -> torch.Tensor:
    half = kernel_size // 2
    x = scores.double()
    length = x.shape[-1]
    valid = x != float("-inf")
    pooled_max = torch.full_like(x, float("-inf"))
    total = torch.zeros_like(x)
    count = torch.zeros_like(x)
    for t in range(length):
        lo, hi = max(0, t - half), min(length, t + half + 1)
        window, window_valid = x[..., lo:hi], valid[..., lo:hi]
        pooled_max[..., t] = window.amax(dim=-1)
        total[..., t] = torch.where(window_valid, window, 0.0).sum(dim=-1)
        count[..., t] = window_valid.sum(dim=-1)
    pooled = pooled_max if mode == "max" else total / count.clamp_min(1)
    return torch.where(valid, pooled, float("-inf")).float()
