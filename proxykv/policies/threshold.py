"""Adaptive selection: keep what scores above a threshold; the budget follows the input."""

from __future__ import annotations

import torch

from proxykv._validation import check_float, check_int
from proxykv.policies.base import Policy
from proxykv.policies.protection import RecentWindow
from proxykv.policies.ranking import top_count_mask
from proxykv.policies.registry import register_policy


class Threshold(Policy):
    """Keeps every position whose score is strictly above ``tau``; a head keeping fewer than
    ``min_per_head`` instead keeps its top ``min_per_head`` (ties to the lower position; never an
    invalid position). Takes no budget. Always ragged."""

    needs_budget = False
    uniform_allocation = False

    def __init__(self, tau: float, min_per_head: int = 0):
        self.tau = check_float("tau", tau, meaning="scores above it are kept")
        self.min_per_head = check_int("min_per_head", min_per_head, minimum=0)

    def _params(self) -> dict:
        return {"tau": self.tau, "min_per_head": self.min_per_head}

    def check_seq_len(self, seq_len: int) -> None:
        if self.min_per_head > seq_len:
            raise ValueError(f"min_per_head={self.min_per_head} exceeds the T={seq_len} positions "
                             "of the scores")

    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        keep = scores > self.tau
        if self.min_per_head:
            seq_len = scores.shape[-1]
            rows = scores.reshape(-1, seq_len)
            minimum = torch.full((rows.shape[0],), self.min_per_head, dtype=torch.int64,
                                 device=scores.device)
            keep = keep | top_count_mask(rows, minimum).view(scores.shape)
        return keep


@register_policy("threshold")
def threshold(tau: float, min_per_head: int = 0, window: int = 0) -> Policy:
    """``threshold`` (KVzap / DMS style): keep every position scoring above ``tau`` (required), at
    least ``min_per_head`` chosen positions per head besides the window, and always the last
    ``window`` positions. Takes neither ``keep_ratio`` nor ``budget``; ``Selection.budget`` records
    the mean count kept."""
    check_int("window", window, minimum=0)
    chooser = Threshold(tau, min_per_head=min_per_head)
    return RecentWindow(chooser, window=window) if window else chooser
