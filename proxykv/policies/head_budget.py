"""Per-head allocation (AdaKV): heads of a layer — or of the whole model — compete for one pooled
budget, so heads with concentrated scores give positions to heads with spread-out ones."""

from __future__ import annotations

import torch

from proxykv._validation import check_choice, check_float
from proxykv.policies.base import Policy
from proxykv.policies.budget import round_half_up
from proxykv.policies.ranking import top_count_mask
from proxykv.policies.registry import register_policy

HEAD_BUDGET_SCOPES = ("layer", "global")


class HeadBudget(Policy):
    """AdaKV allocation (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation"), with KVzip's global variant (Kim et al. 2025).

    Every head first keeps its top ``round_half_up(alpha * row_budget)`` positions (the floor,
    AdaKV's safeguard); the rest of the pooled budget — the sum of the heads' ``row_budget`` over
    the scope — goes to the highest remaining scores of the scope, compared directly across heads
    (ties: lower head, then lower position; ``scope="global"`` orders layer, head, position).

    The total kept per scope equals the pooled budget exactly, unless the scope has fewer valid
    positions (then all are kept). Always ragged.
    """

    uniform_allocation = False

    def __init__(self, scope: str = "layer", alpha: float = 0.2):
        check_choice("scope", scope, HEAD_BUDGET_SCOPES)
        self.scope = scope
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0,
                                 meaning="the fraction of the uniform budget every head keeps")

    def _params(self) -> dict:
        return {"scope": self.scope, "alpha": self.alpha}

    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        seq_len = scores.shape[-1]
        valid_count = (scores > float("-inf")).sum(-1)
        floor = torch.minimum(round_half_up(row_budget.double() * self.alpha), valid_count)
        floor_mask = top_count_mask(scores.reshape(-1, seq_len), floor.reshape(-1))
        floor_mask = floor_mask.view(scores.shape)
        rest_scores = scores.masked_fill(floor_mask, float("-inf"))
        summed = (2,) if self.scope == "layer" else (1, 2)  # dims of [B, L, H] pooled together
        pooled = torch.minimum(row_budget.sum(summed), valid_count.sum(summed))
        rest_count = (pooled - floor.sum(summed)).reshape(-1)
        groups = rest_scores.reshape(rest_count.numel(), -1)
        rest_mask = top_count_mask(groups, rest_count).view(scores.shape)
        return floor_mask | rest_mask


@register_policy("head_budget")
def head_budget(scope: str = "layer", alpha: float = 0.2) -> Policy:
    """``head_budget`` (AdaKV; KVzip with ``scope="global"``): one top-k over the heads of a layer
    (``scope="layer"``, default) or over all layers and heads (``"global"``), with a per-head floor
    of ``alpha`` (default 0.2, AdaKV's safeguard) of the uniform budget. Ragged result whose total
    equals ``budget * heads`` per scope."""
    return HeadBudget(scope=scope, alpha=alpha)
