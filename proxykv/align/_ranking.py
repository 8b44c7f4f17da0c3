"""Row-wise helpers shared by the losses and the metrics."""

from __future__ import annotations

import torch

from proxykv._validation import check_float


def check_keep_ratios(keep_ratios) -> tuple[float, ...]:
    """One keep ratio or a non-empty sequence of them, each in ``(0, 1]``; returns floats."""
    ratios = tuple(keep_ratios) if hasattr(keep_ratios, "__iter__") else (keep_ratios,)
    if not ratios:
        raise ValueError(f"keep_ratios must hold at least one ratio, got {keep_ratios!r}")
    return tuple(check_float("each keep_ratios entry", ratio, minimum=0.0, maximum=1.0,
                             exclusive_minimum=True, meaning="the fraction of positions kept")
                 for ratio in ratios)


def descending_ranks(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid entry within its row (last axis), 0 = largest, ties sharing the average
    of their positions (so the result depends only on the order of the values, ties included).
    Float32, same shape; entries where ``valid`` is False hold meaningless numbers.
    """
    length = values.shape[-1]
    if length == 0:
        return torch.zeros_like(values)
    ordered, order = torch.where(valid, values, float("inf")).sort(dim=-1)
    position = torch.arange(length, device=values.device).expand_as(ordered)
    # A run of equal values spans [first, last]; every member gets (first + last) / 2.
    starts = torch.cat([torch.ones_like(ordered[..., :1], dtype=torch.bool),
                        ordered[..., 1:] != ordered[..., :-1]], dim=-1)
    ends = torch.cat([starts[..., 1:], torch.ones_like(starts[..., :1])], dim=-1)
    first = torch.where(starts, position, 0).cummax(dim=-1).values
    last = torch.where(ends, position, length).flip(-1).cummin(dim=-1).values.flip(-1)
    ascending = torch.zeros_like(values).scatter_(-1, order, (first + last).float() / 2)
    count = valid.sum(dim=-1, keepdim=True).float()
    return count - 1 - ascending


def row_mean_std(values: torch.Tensor, valid: torch.Tensor,
                 eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation ``sqrt(var + eps)`` of each row's valid entries
    (``[R, 1]`` each); finite gradients even for constant rows (with ``eps > 0``) and ``-inf``
    entries."""
    count = valid.sum(dim=-1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, values, 0.0).sum(dim=-1, keepdim=True) / count
    centred = torch.where(valid, values - mean, 0.0)
    return mean, (centred.square().sum(dim=-1, keepdim=True) / count + eps).sqrt()


def standardise_rows(values: torch.Tensor, valid: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(x - mean) / std`` over each row's valid entries; 0 at invalid entries."""
    mean, std = row_mean_std(values, valid, eps)
    return torch.where(valid, values - mean, 0.0) / std


def kth_largest(values: torch.Tensor, valid: torch.Tensor,
                ks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per row, the ``k``-th largest valid value for each ``k`` in ``ks`` (each ``[R]`` int,
    1-based) -> a list of ``[R, 1]`` tensors. Rows with fewer than ``k`` valid entries get ``-inf``.
    One sort serves every ``k``."""
    ordered = torch.where(valid, values, float("-inf")).sort(dim=-1, descending=True).values
    return [ordered.gather(-1, (k.clamp(1, values.shape[-1]) - 1).to(torch.int64)[:, None])
            for k in ks]


def budget_sizes(count: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Entries kept at ``keep_ratio`` of ``count`` valid ones: ``max(1, ceil(keep_ratio * count))``
    (int64; the small offset keeps ``0.3 * 10`` at 3 despite float rounding)."""
    return torch.ceil(count.double() * keep_ratio - 1e-9).long().clamp_min(1)
