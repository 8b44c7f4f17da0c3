"""Layer-wise allocation (PyramidKV): budgets that shrink linearly with depth, total conserved."""

from __future__ import annotations

import torch

from proxykv._validation import check_float
from proxykv.policies.base import Policy, Wrapper
from proxykv.policies.budget import pyramid_budgets
from proxykv.policies.registry import register_policy
from proxykv.policies.uniform import UniformTopK


class Pyramid(Wrapper):
    """Moves budget from deep layers to shallow ones before ``inner`` chooses (Cai et al. 2024,
    "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling").

    Layer ``l`` of ``L`` gets ``w_l`` times the mean budget, ``w`` linear from ``2 - 1/beta`` (layer
    0) to ``1/beta`` (last layer), mean 1; for each (batch, KV head) the sum over layers is
    conserved exactly (integer shares by largest remainder). A layer's share never exceeds its
    valid positions: the excess goes to the other layers in proportion to their weights. Every
    layer keeps at least what ``inner`` always keeps (its protected positions). Always ragged.
    """

    uniform_allocation = False

    def __init__(self, inner: Policy, beta: float = 20.0):
        super().__init__(inner, inner_needs_budget=True)
        self.beta = check_float("beta", beta, minimum=1.0,
                                meaning="mean budget / deepest layer's budget; 1 = uniform")

    def _params(self) -> dict:
        return {"beta": self.beta, "inner": self.inner}

    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        capacity = (scores > float("-inf")).sum(-1)
        layer_budget = pyramid_budgets(row_budget, capacity, self.beta,
                                       lower=self.inner.required_budget(scores.shape[-1]))
        return self.inner.keep_mask(scores, layer_budget)


@register_policy("pyramid")
def pyramid(beta: float = 20.0, inner: Policy | None = None) -> Policy:
    """``pyramid`` (PyramidKV; ``beta`` = 20 as in its reference code): per-layer budgets decreasing
    linearly with depth, the deepest layer keeping ``1/beta`` of the mean budget and the first
    ``2 - 1/beta``; total over layers conserved. ``inner`` (default ``topk``) chooses within each
    layer's budget; wrap the result in ``protect`` to keep a window in every layer."""
    return Pyramid(UniformTopK() if inner is None else inner, beta=beta)
