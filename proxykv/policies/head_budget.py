"""Per-head allocation (AdaKV): heads of a layer — or of the whole model — compete for one pooled
budget, so heads with concentrated scores give positions to heads with spread-out ones.

The competition compares scores of different heads, so they must be on one scale. Scores that
only rank positions within a head are not — e.g. an aligner's output: its ranking losses leave
each head's level free, and the zoo's axial aligner puts the two heads of a layer hundreds of
units apart, so compared raw one head took the whole pooled budget. By default each head's scores
are therefore normalised over its own positions first (``normalize="softmax"``), as AdaKV compares
attention weights that sum to 1 per head."""

from __future__ import annotations

import torch

from proxykv._validation import check_choice, check_float
from proxykv.policies.base import Policy, check_scores
from proxykv.policies.budget import round_half_up
from proxykv.policies.ranking import top_count_mask
from proxykv.policies.registry import register_policy

HEAD_BUDGET_SCOPES = ("layer", "global")
#: how ``HeadBudget`` puts the heads' scores on one scale before comparing them across heads
HEAD_BUDGET_NORMALIZATIONS = ("softmax", "sum", "none")

NEG_INF = float("-inf")


def _check_normalize(normalize) -> str:
    if not isinstance(normalize, str):
        raise TypeError(f"normalize must be a str, one of {', '.join(HEAD_BUDGET_NORMALIZATIONS)}; "
                        f"got {type(normalize).__name__} {normalize!r}")
    check_choice("normalize", normalize, HEAD_BUDGET_NORMALIZATIONS)
    return normalize


def normalize_head_scores(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """The scores ``HeadBudget`` compares across heads: float32 ``[B, L, H_kv, T]``, each
    ``(b, l, h)`` row normalised on its own (a new tensor; ``scores`` is not modified).

    ``scores``: as for ``Policy.select`` (float32 or float64 ``[B, L, H_kv, T]``, ``-inf`` =
    invalid, no NaN). ``normalize``:
        ``"softmax"``: the row read as log-scores (logits) — ``log softmax``, i.e.
            ``s - logsumexp(s)`` over the row's finite entries: the log of each position's share
            of the head's mass. Invariant to adding a constant to a head (not to scaling it: the
            spread of log-scores acts as a temperature).
        ``"sum"``: the row read as attention mass (``>= 0``) — ``s / sum(s)`` over its finite
            entries (all 0 when they sum to 0). Invariant to scaling a head by a positive
            constant. A negative valid score raises ``ValueError``.
        ``"none"``: the scores as they are (a float32 copy).

    ``-inf`` (invalid) stays ``-inf`` and ``+inf`` stays ``+inf`` (it still ranks first); the
    finite entries are normalised among themselves, computed in float64 and rounded to float32.
    Within a head the order is kept (rounding can only merge near-equal values into a tie).

    Raises ``TypeError``/``ValueError`` for ``scores`` not as above and for a ``normalize`` that
    is not one of :data:`HEAD_BUDGET_NORMALIZATIONS`.
    """
    _check_normalize(normalize)
    return _normalized(check_scores(scores), normalize)


def _normalized(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """``normalize_head_scores`` on checked arguments."""
    if normalize == "none":
        return scores.float().clone()
    finite = torch.isfinite(scores)
    values = scores.double()
    if normalize == "softmax":
        total = torch.where(finite, values, NEG_INF).logsumexp(-1, keepdim=True)
        normalised = values - torch.where(torch.isfinite(total), total, 0.0)
    else:
        negative = finite & (scores < 0)
        if bool(negative.any()):
            first = tuple(int(i) for i in negative.nonzero()[0])
            raise ValueError(f"scores must be >= 0 (attention mass) for normalize='sum', got "
                             f"{float(scores[first])} at {list(first)}; use normalize='softmax' "
                             f"for log-scores")
        total = torch.where(finite, values, 0.0).sum(-1, keepdim=True)
        normalised = values / torch.where(total > 0, total, 1.0)
    return torch.where(finite, normalised, values).float()


class HeadBudget(Policy):
    """AdaKV allocation (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation"), with KVzip's global variant (Kim et al. 2025).

    ``scores`` ``[B, L, H_kv, T]``; ``row_budget`` ``[B, L, H_kv]`` (the uniform budget of every
    head). Every head first keeps its top ``round_half_up(alpha * row_budget)`` positions by its own
    scores (the floor, AdaKV's safeguard); the rest of the pooled budget — the sum of the heads'
    ``row_budget`` over the scope — goes to the highest remaining entries of the scope, compared
    across heads after each head's row is normalised on its own by ``normalize``
    (``normalize_head_scores``: ``"softmax"``, the default, for log-scores such as an aligner's
    output; ``"sum"`` for attention mass; ``"none"`` compares raw scores, the behaviour before
    ``normalize`` existed). Ties: lower head, then lower position (``scope="global"`` orders
    layer, head, position).

    The total kept per scope equals the pooled budget exactly, unless the scope has fewer valid
    positions (then all are kept). Always ragged.
    """

    uniform_allocation = False

    def __init__(self, scope: str = "layer", alpha: float = 0.2, normalize: str = "softmax"):
        check_choice("scope", scope, HEAD_BUDGET_SCOPES)
        self.scope = scope
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0,
                                 meaning="the fraction of the uniform budget every head keeps")
        self.normalize = _check_normalize(normalize)

    def _params(self) -> dict:
        return {"scope": self.scope, "alpha": self.alpha, "normalize": self.normalize}

    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        seq_len = scores.shape[-1]
        valid_count = (scores > NEG_INF).sum(-1)
        floor = torch.minimum(round_half_up(row_budget.double() * self.alpha), valid_count)
        floor_mask = top_count_mask(scores.reshape(-1, seq_len), floor.reshape(-1))
        floor_mask = floor_mask.view(scores.shape)
        compared = _normalized(scores, self.normalize)
        rest_scores = compared.masked_fill(floor_mask, NEG_INF)
        summed = (2,) if self.scope == "layer" else (1, 2)  # dims of [B, L, H] pooled together
        pooled = torch.minimum(row_budget.sum(summed), valid_count.sum(summed))
        rest_count = (pooled - floor.sum(summed)).reshape(-1)
        groups = rest_scores.reshape(rest_count.numel(), -1)
        rest_mask = top_count_mask(groups, rest_count).view(scores.shape)
        return floor_mask | rest_mask


@register_policy("head_budget")
def head_budget(scope: str = "layer", alpha: float = 0.2, normalize: str = "softmax") -> Policy:
    """``head_budget`` (AdaKV; KVzip with ``scope="global"``): one top-k over the heads of a layer
    (``scope="layer"``, default) or over all layers and heads (``"global"``), with a per-head floor
    of ``alpha`` (default 0.2, AdaKV's safeguard) of the uniform budget. Heads are compared after
    ``normalize`` puts each head's scores on one scale (``"softmax"``, default: log-softmax over
    the head's positions, for log-scores such as an aligner's; ``"sum"``: share of the head's
    attention mass; ``"none"``: raw scores). Ragged result whose total equals ``budget * heads``
    per scope."""
    return HeadBudget(scope=scope, alpha=alpha, normalize=normalize)
