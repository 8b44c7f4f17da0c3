"""Naive oracle for ``ragged_decode_attention``: one query head at a time, a plain softmax over the
valid rows of its KV head's segment, in float64."""

from __future__ import annotations

import torch


def ragged_decode_attention_reference(q: torch.Tensor, k_packed: torch.Tensor,
                                      v_packed: torch.Tensor, cu_seqlens: torch.Tensor, *,
                                      seq_lens: torch.Tensor | None = None,
                                      scale: float | None = None) -> torch.Tensor:
    b, h_q, d = q.shape
    h_kv = (cu_seqlens.numel() - 1) // b
    group = h_q // h_kv
    scale = d ** -0.5 if scale is None else scale
    starts = cu_seqlens.tolist()
    lengths = seq_lens.tolist() if seq_lens is not None else [
        starts[s + 1] - starts[s] for s in range(b * h_kv)]
    out = torch.zeros(b, h_q, d, dtype=torch.float64)
    for batch in range(b):
        for head in range(h_q):
            segment = batch * h_kv + head // group
            rows = slice(starts[segment], starts[segment] + lengths[segment])
            keys = k_packed[rows].double().cpu()
            if keys.shape[0] == 0:
                continue  # an empty segment outputs zeros
            probabilities = torch.softmax(keys @ q[batch, head].double().cpu() * scale, dim=0)
            out[batch, head] = probabilities @ v_packed[rows].double().cpu()
    return out.to(q.dtype)
