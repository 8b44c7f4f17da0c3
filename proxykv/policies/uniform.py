"""Uniform allocation: every head keeps its own top-``budget`` positions (``topk``)."""

from __future__ import annotations

import torch

from proxykv.policies.base import Policy
from proxykv.policies.ranking import top_count_mask
from proxykv.policies.registry import register_policy


class UniformTopK(Policy):
    """Each head keeps its ``row_budget`` highest-scoring positions; ties go to the lower
    position. The plain top-k baseline of every score-based press (H2O, SnapKV, KVzip ...)."""

    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        seq_len = scores.shape[-1]
        rows = scores.reshape(-1, seq_len)
        return top_count_mask(rows, row_budget.reshape(-1)).view(scores.shape)


@register_policy("topk")
def topk() -> Policy:
    """``topk``: the same count for every head, highest scores first, ties to the lower position.

    No parameters. Uniform ``Selection`` (ragged only where a head has fewer valid positions than
    the budget). Example: ``get_policy("topk").select(scores, keep_ratio=0.25)``.
    """
    return UniformTopK()
