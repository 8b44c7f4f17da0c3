"""Naive oracles of the ragged attention ops: one query row at a time, an explicit visibility mask
per segment and a plain softmax, in float64."""

from __future__ import annotations

import torch


def _segment_rows(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None) -> list[range]:
    starts = cu_seqlens.tolist()
    lengths = seq_lens.tolist() if seq_lens is not None else [
        starts[s + 1] - starts[s] for s in range(len(starts) - 1)]
    return [range(starts[s], starts[s] + lengths[s]) for s in range(len(lengths))]


def ragged_attention_reference(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor,
                               cu_seqlens: torch.Tensor, *, seq_lens: torch.Tensor | None = None,
                               scale: float | None = None, return_lse: bool = False):
    """``q [B, H_q, T_new, D]``: query ``t`` of head ``h`` sees the first
    ``len(segment) - T_new + t + 1`` rows of segment ``b * H_kv + h // G``."""
    b, h_q, num_new, d = q.shape
    segments = _segment_rows(cu_seqlens, seq_lens)
    h_kv = len(segments) // b
    group = h_q // h_kv
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, h_q, num_new, d, dtype=torch.float64)
    lse = torch.full((b, h_q, num_new), float("-inf"), dtype=torch.float64)
    for batch in range(b):
        for head in range(h_q):
            rows = segments[batch * h_kv + head // group]
            keys = k_packed[rows.start:rows.stop].double().cpu()
            values = v_packed[rows.start:rows.stop].double().cpu()
            for t in range(num_new):
                visible = len(rows) - num_new + t + 1
                mask = torch.arange(len(rows)) < visible
                if not mask.any():
                    continue  # nothing visible: zeros, LSE -inf
                logits = keys @ q[batch, head, t].double().cpu() * scale
                logits = logits.masked_fill(~mask, float("-inf"))
                lse[batch, head, t] = torch.logsumexp(logits, dim=0)
                out[batch, head, t] = torch.softmax(logits, dim=0) @ values
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out


def ragged_decode_attention_reference(q: torch.Tensor, k_packed: torch.Tensor,
                                      v_packed: torch.Tensor, cu_seqlens: torch.Tensor, *,
                                      seq_lens: torch.Tensor | None = None,
                                      scale: float | None = None) -> torch.Tensor:
    """``q [B, H_q, D]``: every query head sees every valid row of its KV head's segment (written
    on its own, not through ``ragged_attention_reference``, so the two check each other)."""
    b, h_q, d = q.shape
    segments = _segment_rows(cu_seqlens, seq_lens)
    h_kv = len(segments) // b
    group = h_q // h_kv
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, h_q, d, dtype=torch.float64)
    for batch in range(b):
        for head in range(h_q):
            rows = segments[batch * h_kv + head // group]
            keys = k_packed[rows.start:rows.stop].double().cpu()
            if keys.shape[0] == 0:
                continue  # an empty segment outputs zeros
            probabilities = torch.softmax(keys @ q[batch, head].double().cpu() * scale, dim=0)
            out[batch, head] = probabilities @ v_packed[rows.start:rows.stop].double().cpu()
    return out.to(q.dtype)
