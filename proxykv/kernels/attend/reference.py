"""Naive oracles of the ragged attention ops: one query row at a time, an explicit visibility mask
per segment and a plain softmax, in float64."""

from __future__ import annotations

import torch


def _segment_rows(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None) -> list[range]:
    starts = cu_seqlens.tolist()
    lengths = seq_lens.tolist() if seq_lens is not None else [
        starts[s + 1] - starts[s] for s in range(len(starts) - 1)]
    return [range(starts[s], starts[s] + lengths[s]) for s in range(len(lengths))]


def _softmax_with_sink(logits: torch.Tensor, sink: float | None):
    """(probabilities, LSE of the keys only) of float64 ``logits`` with ``exp(sink)`` as one more
    term of the denominator."""
    lse = torch.logsumexp(logits, dim=0)
    denominator = lse if sink is None else torch.logaddexp(lse, torch.tensor(sink).double())
    return torch.exp(logits - denominator), lse


def _logits(keys, query, scale, softcap):
    logits = keys @ query * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def ragged_attention_reference(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor,
                               cu_seqlens: torch.Tensor, *, seq_lens: torch.Tensor | None = None,
                               scale: float | None = None, return_lse: bool = False,
                               softcap: float | None = None, sinks: torch.Tensor | None = None,
                               window: int | None = None,
                               key_positions: torch.Tensor | None = None):
    """``q [B, H_q, T_new, D]``: query ``t`` of head ``h`` sees the first
    ``len(segment) - T_new + t + 1`` rows of segment ``b * H_kv + h // G`` — with ``window``
    only those at positions ``> p - window``, ``p`` the position of the query's own row
    ``len(segment) - T_new + t``. Logits soft-capped with ``softcap``; ``exp(sinks[h])`` joins
    each denominator; the LSE is over the keys only."""
    b, h_q, num_new, d = q.shape
    segments = _segment_rows(cu_seqlens, seq_lens)
    h_kv = len(segments) // b
    group = h_q // h_kv
    scale = d ** -0.5 if scale is None else scale
    positions = None if key_positions is None else key_positions.long().cpu()
    out = torch.zeros(b, h_q, num_new, d, dtype=torch.float64)
    lse = torch.full((b, h_q, num_new), float("-inf"), dtype=torch.float64)
    for batch in range(b):
        for head in range(h_q):
            rows = segments[batch * h_kv + head // group]
            keys = k_packed[rows.start:rows.stop].double().cpu()
            values = v_packed[rows.start:rows.stop].double().cpu()
            sink = None if sinks is None else float(sinks[head])
            for t in range(num_new):
                visible = len(rows) - num_new + t + 1
                mask = torch.arange(len(rows)) < visible
                if window is not None and visible > 0:
                    row_positions = positions[rows.start:rows.stop]
                    mask &= row_positions > row_positions[visible - 1] - window
                if not mask.any():
                    continue  # nothing visible: zeros, LSE -inf
                logits = _logits(keys, q[batch, head, t].double().cpu(), scale, softcap)
                logits = logits.masked_fill(~mask, float("-inf"))
                probabilities, lse[batch, head, t] = _softmax_with_sink(logits, sink)
                out[batch, head, t] = probabilities @ values
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out


def ragged_decode_attention_reference(q: torch.Tensor, k_packed: torch.Tensor,
                                      v_packed: torch.Tensor, cu_seqlens: torch.Tensor, *,
                                      seq_lens: torch.Tensor | None = None,
                                      scale: float | None = None, softcap: float | None = None,
                                      sinks: torch.Tensor | None = None,
                                      window: int | None = None,
                                      key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """``q [B, H_q, D]``: every query head sees every valid row of its KV head's segment — with
    ``window`` those at positions ``> p - window``, ``p`` the position of the segment's last valid
    row (written on its own, not through ``ragged_attention_reference``, so the two check each
    other)."""
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
            logits = _logits(keys, q[batch, head].double().cpu(), scale, softcap)
            if window is not None:
                row_positions = key_positions[rows.start:rows.stop].long().cpu()
                logits = logits.masked_fill(row_positions <= row_positions[-1] - window,
                                            float("-inf"))
            probabilities, _ = _softmax_with_sink(logits, None if sinks is None
                                                  else float(sinks[head]))
            out[batch, head] = probabilities @ v_packed[rows.start:rows.stop].double().cpu()
    return out.to(q.dtype)
