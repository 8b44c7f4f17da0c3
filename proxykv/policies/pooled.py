"""Pooled scoring with a protected observation window (SnapKV's ``pooled_window``)."""

from __future__ import annotations

import torch

from proxykv._backend import IMPLS
from proxykv._validation import check_choice, check_int
from proxykv.kernels import POOL_MODES, pool_scores
from proxykv.policies.base import Policy, Wrapper
from proxykv.policies.protection import RecentWindow
from proxykv.policies.registry import register_policy
from proxykv.policies.uniform import UniformTopK


class Pooled(Wrapper):
    """Pools the scores along ``T`` (``proxykv.kernels.pool_scores``: centred odd window, ``max`` or
    ``avg`` over valid entries) before ``inner`` chooses, so neighbours of an important position
    are kept with it. Positions that are ``-inf`` — invalid, or protected by an outer wrapper —
    stay ``-inf`` and do not enter their neighbours' pooled scores."""

    def __init__(self, inner: Policy, kernel_size: int = 5, mode: str = "avg",
                 impl: str | None = None):
        super().__init__(inner)
        self.kernel_size = check_int("kernel_size", kernel_size, minimum=1, odd=True)
        check_choice("mode", mode, POOL_MODES)
        check_choice("impl", impl, (*IMPLS, None))
        self.mode = mode
        self.impl = impl

    def _params(self) -> dict:
        return {"kernel_size": self.kernel_size, "mode": self.mode, "impl": self.impl,
                "inner": self.inner}

    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        pooled = pool_scores(scores, self.kernel_size, mode=self.mode, impl=self.impl)
        return self.inner.keep_mask(pooled, row_budget)


@register_policy("pooled_window")
def pooled_window(window: int = 32, kernel_size: int = 5, mode: str = "avg",
                  inner: Policy | None = None, impl: str | None = None) -> Policy:
    """``pooled_window`` (SnapKV, Li et al. 2024, "SnapKV: LLM Knows What You Are Looking for
    Before Generation"; defaults from its reference code: window 32, kernel 5, average pooling).

    Always keeps the last ``window`` positions (the observation window), pools the other scores
    along ``T`` with ``kernel_size``/``mode`` and lets ``inner`` (default ``topk``; e.g.
    ``head_budget`` for AdaKV+SnapKV) choose the rest of the budget. ``impl`` picks the pooling
    backend (``"triton"``, ``"torch"``, None = automatic).
    """
    chooser = UniformTopK() if inner is None else inner
    return RecentWindow(Pooled(chooser, kernel_size=kernel_size, mode=mode, impl=impl),
                        window=window)
