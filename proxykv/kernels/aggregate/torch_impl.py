"""CPU implementations of the aggregation ops (they run on any torch device).

Memory: every temporary is at most the size of one input or output tensor: ``reduce_heads``'
temporaries are output-sized (plus the positions where only part of a group is ``-inf``), and
``combine_layers`` works on ``COMBINE_CHUNK`` positions at a time so its temporaries stay bounded
for 128k-token inputs. The ``.any()`` checks that skip the infinity fix-ups synchronise a CUDA
device; this implementation is meant for the CPU.
"""

from __future__ import annotations

import torch

from proxykv.kernels.pool.torch_impl import pool_scores_torch

NEG_INF = float("-inf")
COMBINE_CHUNK = 8192


def _zero_invalid(scores: torch.Tensor) -> torch.Tensor:
    """A copy with -inf replaced by 0 (NaN and +inf kept): one fast pass, unlike a masked where."""
    return torch.nan_to_num(scores, nan=float("nan"), posinf=float("inf"), neginf=0.0)


def reduce_heads_torch(scores: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    grouped = scores.unflatten(-2, (scores.shape[-2] // group_size, group_size))
    if mode == "max":
        return grouped.amax(dim=-2).contiguous()
    # A plain mean is -inf where some head of the group is -inf (NaN where another head is +inf).
    # Those positions (usually padding, invalid for every head) are few: recompute only them as
    # the mean over the heads that see the position.
    reduced = grouped.mean(dim=-2).contiguous()
    partial = torch.isneginf(reduced) | torch.isnan(reduced)
    if bool(partial.any()):
        members = grouped.movedim(-2, -1)[partial]          # [n_partial, group_size]
        invalid = torch.isneginf(members)
        count = (group_size - invalid.sum(-1)).to(torch.float32)
        fixed = _zero_invalid(members).sum(-1).div_(count.clamp_min(1.0))
        reduced[partial] = fixed.masked_fill_(count == 0, NEG_INF)
    return reduced


def normalize_rows_(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Normalise the contiguous float32 ``scores`` in place along the last axis; returns them."""
    if mode == "none":
        return scores
    magnitude = _zero_invalid(scores).abs_()
    divisor = magnitude.sum(-1, keepdim=True) if mode == "sum" \
        else magnitude.amax(-1, keepdim=True)
    divisor.masked_fill_(divisor == 0, 1.0)
    infinite = torch.isposinf(scores)
    if not bool(infinite.any()):
        # 0 < divisor < inf, so -inf entries stay -inf.
        return scores.div_(divisor)
    # A row holding +inf has divisor +inf (inf / inf and -inf / inf would be NaN): it takes its
    # limit instead, the +inf entries sharing (sum) or reaching (max) 1, the finite ones 0.
    n_infinite = infinite.sum(-1, keepdim=True).to(torch.float32)
    share = n_infinite.reciprocal() if mode == "sum" else torch.ones_like(n_infinite)
    limit = torch.where(infinite, share, torch.where(torch.isneginf(scores), NEG_INF, 0.0))
    return scores.copy_(torch.where(n_infinite > 0, limit, scores / divisor))


def normalize_scores_torch(scores: torch.Tensor, mode: str) -> torch.Tensor:
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    out.copy_(scores)
    return normalize_rows_(out, mode)


def aggregate_scores_torch(scores: torch.Tensor, group_size: int, group_mode: str,
                           pool_kernel_size: int, pool_mode: str,
                           normalize: str) -> torch.Tensor:
    reduced = reduce_heads_torch(scores, group_size, group_mode)
    if pool_kernel_size > 1:
        reduced = pool_scores_torch(reduced, pool_kernel_size, pool_mode)
    return normalize_rows_(reduced, normalize)


def combine_layers_torch(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    batch, _, heads, length = scores.shape
    layers_out = weights.shape[0]
    out = torch.empty((batch, layers_out, heads, length), dtype=torch.float32,
                      device=scores.device)
    takes_part = (weights != 0).float()
    for start in range(0, length, COMBINE_CHUNK):
        chunk = scores[..., start:start + COMBINE_CHUNK]
        combined = torch.einsum("oi,bihc->bohc", weights, _zero_invalid(chunk))
        invalid = torch.isneginf(chunk)
        if bool(invalid.any()):
            # Count, per output, the layers with a non-zero weight that are -inf there.
            poisoned = torch.einsum("oi,bihc->bohc", takes_part, invalid.float()) > 0
            combined.masked_fill_(poisoned, NEG_INF)
        out[..., start:start + COMBINE_CHUNK] = combined
    return out
