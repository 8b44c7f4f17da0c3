"""Budget arithmetic shared by the policies: from ``keep_ratio``/``budget`` to a per-head count,
and PyramidKV's redistribution of budgets over layers.

Conventions (every policy follows them):

* ``budget`` is a count of positions **per KV head** (on average over heads and layers for the
  policies that move budget between heads or layers), an int in ``[1, T]``.
* ``keep_ratio`` in ``(0, 1]`` maps to ``budget = max(1, floor(keep_ratio * T + 0.5))`` — rounding
  half up, never below one position — so it is within one position of ``keep_ratio * T``.
"""

from __future__ import annotations

import math
import numbers

import torch

from proxykv._validation import check_float


def keep_ratio_to_budget(keep_ratio: float, seq_len: int) -> int:
    """Per-head count for ``keep_ratio`` of ``seq_len`` positions (round half up, at least 1)."""
    return max(1, math.floor(keep_ratio * seq_len + 0.5))


def round_half_up(values: torch.Tensor) -> torch.Tensor:
    """int64 ``floor(values + 0.5)`` (``torch.round`` rounds half to even: less obvious)."""
    return torch.floor(values.double() + 0.5).to(torch.int64)


def check_budget_choice(keep_ratio, budget, *, needs_budget: bool, policy_name: str) -> None:
    """The checks of ``resolve_budget`` that need no sequence length: both or neither of
    ``keep_ratio``/``budget`` (when one is needed), either for a policy that needs neither,
    ``keep_ratio`` outside ``(0, 1]``, ``budget`` not an int >= 1."""
    if not needs_budget:
        if keep_ratio is not None or budget is not None:
            raise ValueError(f"{policy_name} chooses its own budget from the scores: pass neither "
                             f"keep_ratio nor budget, got keep_ratio={keep_ratio!r}, "
                             f"budget={budget!r}")
        return
    if keep_ratio is None and budget is None:
        raise ValueError(f"{policy_name} needs exactly one of keep_ratio and budget, got neither")
    if keep_ratio is not None and budget is not None:
        raise ValueError(f"{policy_name} needs exactly one of keep_ratio and budget, got both "
                         f"(keep_ratio={keep_ratio!r}, budget={budget!r})")
    if keep_ratio is not None:
        check_float("keep_ratio", keep_ratio, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                    meaning="the fraction of positions kept")
        return
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"budget must be an int (positions kept per head), got "
                        f"{type(budget).__name__} {budget!r}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1 (positions kept per head), got {budget}")


def resolve_budget(seq_len: int, keep_ratio, budget, *, needs_budget: bool,
                   policy_name: str) -> int | None:
    """The per-head budget ``select`` was asked for, or None for adaptive policies.

    Raises ``ValueError``/``TypeError`` as ``check_budget_choice``, and for ``budget > T``.
    """
    check_budget_choice(keep_ratio, budget, needs_budget=needs_budget, policy_name=policy_name)
    if not needs_budget:
        return None
    if keep_ratio is not None:
        return keep_ratio_to_budget(float(keep_ratio), seq_len)
    if budget > seq_len:
        raise ValueError(f"budget must be <= T={seq_len} (the number of positions), got {budget}")
    return int(budget)


def pyramid_weights(num_layers: int, beta: float) -> torch.Tensor:
    """float64 ``[L]`` linear weights with mean 1: layer 0 gets ``2 - 1/beta``, the last ``1/beta``
    (PyramidKV, Cai et al. 2024: the deepest layer keeps ``1/beta`` of the mean budget)."""
    if num_layers == 1:
        return torch.ones(1, dtype=torch.float64)
    return torch.linspace(2.0 - 1.0 / beta, 1.0 / beta, num_layers, dtype=torch.float64)


def pyramid_budgets(row_budget: torch.Tensor, capacity: torch.Tensor, beta: float,
                    lower: int = 0) -> torch.Tensor:
    """Redistribute per-head budgets over layers so they shrink linearly with depth.

    Args:
        row_budget: int64 ``[B, L, H]``, what each head would keep under a uniform allocation.
        capacity: int64 ``[B, L, H]``, how many positions each head can keep (its valid ones).
        beta: ``>= 1``; see ``pyramid_weights`` (``beta == 1`` keeps the budgets uniform).
        lower: every layer keeps at least this many (what the wrapped policy always keeps).

    Returns:
        int64 ``[B, L, H]``. For each ``(b, h)`` the sum over layers is conserved:
        ``sum_l out = lower * L + min(sum_l (row_budget - lower), sum_l (capacity - lower)^+)``;
        within a column the budgets are ``lower + min(cap_l, lambda * w_l)`` (water-filling, so a
        layer whose share exceeds its capacity passes the excess to the others in proportion to
        their weights), rounded to integers by largest remainder (ties to the lower layer).
    """
    num_layers = row_budget.shape[1]
    device = row_budget.device
    weights = pyramid_weights(num_layers, beta).to(device).view(1, num_layers, 1)
    cap = (capacity - lower).clamp(min=0).double()
    total = torch.minimum((row_budget - lower).clamp(min=0).sum(1, keepdim=True).double(),
                          cap.sum(1, keepdim=True))
    shares = _water_fill(total, cap, weights.expand_as(cap))
    # Largest-remainder rounding keeps each column's integer sum exactly `total`.
    whole = torch.minimum(torch.floor(shares), cap)
    missing = (total.round() - whole.sum(1, keepdim=True)).to(torch.int64)
    remainder = torch.where(whole < cap, shares - whole, torch.full_like(shares, -1.0))
    order = torch.sort(remainder, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_layers, device=device).view(1, -1, 1).expand_as(order))
    extra = (rank < missing) & (remainder >= 0)
    return lower + whole.to(torch.int64) + extra.to(torch.int64)


def _water_fill(total: torch.Tensor, cap: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``min(cap, lambda * weights)`` along dim 1 with ``lambda`` such that the sum is ``total``
    (``total <= cap.sum(1)``, weights > 0). Closed form over the sorted breakpoints
    ``cap / weights``: below the ``j``-th one, layers ``< j`` are full and the rest share."""
    breakpoints = cap / weights
    order = breakpoints.argsort(dim=1, stable=True)
    point = breakpoints.gather(1, order)
    cap_sorted = cap.gather(1, order)
    weight_sorted = weights.gather(1, order)
    cap_before = cap_sorted.cumsum(1) - cap_sorted
    weight_from = weight_sorted.flip(1).cumsum(1).flip(1)
    # Filled amount when lambda reaches each breakpoint.
    filled_at_point = cap_before + cap_sorted + point * (weight_from - weight_sorted)
    segment = (filled_at_point < total).sum(1, keepdim=True).clamp(max=cap.shape[1] - 1)
    lam = (total - cap_before.gather(1, segment)) / weight_from.gather(1, segment)
    return torch.minimum(cap, lam.clamp(min=0) * weights)
