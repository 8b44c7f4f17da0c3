"""Naive oracles for the aggregation ops: explicit loops, float64 arithmetic, float32 results.

Each function spells out the documented semantics (see ``api.py``) as directly as possible; the
fused ``aggregate_scores`` oracle is literally the chain of the separate oracles.
"""

from __future__ import annotations

import torch

from proxykv.kernels.pool.reference import pool_scores_reference

NEG_INF = float("-inf")


def reduce_heads_reference(scores: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    x = scores.double()
    n_groups = x.shape[-2] // group_size
    out = torch.empty((*x.shape[:-2], n_groups, x.shape[-1]), dtype=torch.float64)
    for group in range(n_groups):
        members = [x[..., group * group_size + j, :] for j in range(group_size)]
        if mode == "max":
            reduced = members[0]
            for member in members[1:]:
                reduced = torch.maximum(reduced, member)
        else:
            total = torch.zeros_like(members[0])
            count = torch.zeros_like(members[0])
            for member in members:
                valid = member != NEG_INF
                total += torch.where(valid, member, 0.0)
                count += valid.double()
            # Mean over the heads that see the position; -inf only when no head does.
            reduced = torch.where(count > 0, total / count.clamp_min(1.0), NEG_INF)
        out[..., group, :] = reduced
    return out.float()


def normalize_scores_reference(scores: torch.Tensor, mode: str) -> torch.Tensor:
    x = scores.double()
    if mode == "none":
        return x.float()
    valid = x != NEG_INF
    magnitude = torch.where(valid, x.abs(), 0.0)
    divisor = magnitude.sum(-1, keepdim=True) if mode == "sum" \
        else magnitude.amax(-1, keepdim=True)
    # A row with nothing to scale by (all valid entries zero, or none valid) is left as it is.
    divisor = torch.where(divisor == 0, 1.0, divisor)
    scaled = torch.where(valid, x / divisor, NEG_INF)
    # A row holding +inf takes its limit: the +inf entries share (sum) or reach (max) 1, the
    # finite ones vanish next to them.
    infinite = x == float("inf")
    n_infinite = infinite.sum(-1, keepdim=True).double()
    share = 1.0 / n_infinite if mode == "sum" else torch.ones_like(n_infinite)
    limit = torch.where(infinite, share, torch.where(valid, 0.0, NEG_INF))
    return torch.where(n_infinite > 0, limit, scaled).float()


def aggregate_scores_reference(scores: torch.Tensor, group_size: int, group_mode: str,
                               pool_kernel_size: int, pool_mode: str,
                               normalize: str) -> torch.Tensor:
    reduced = reduce_heads_reference(scores, group_size, group_mode)
    pooled = pool_scores_reference(reduced, pool_kernel_size, pool_mode)
    return normalize_scores_reference(pooled, normalize)


def combine_layers_reference(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    x, w = scores.double(), weights.double()
    batch, _, heads, length = x.shape
    layers_out, layers_in = w.shape
    out = torch.zeros((batch, layers_out, heads, length), dtype=torch.float64)
    for target in range(layers_out):
        invalid = torch.zeros((batch, heads, length), dtype=torch.bool)
        for source in range(layers_in):
            weight = float(w[target, source])
            if weight == 0.0:
                continue  # a layer with weight 0 does not take part, even where it is -inf
            layer = x[:, source]
            layer_invalid = layer == NEG_INF
            invalid |= layer_invalid
            out[:, target] += weight * torch.where(layer_invalid, 0.0, layer)
        out[:, target] = torch.where(invalid, NEG_INF, out[:, target])
    return out.float()
