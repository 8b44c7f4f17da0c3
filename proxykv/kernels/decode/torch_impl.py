"""CPU implementation of ``ragged_decode_attention``.

One segment (KV head of one batch element) at a time: the ``G`` query heads of its GQA group
attend over its valid rows with a float32 softmax. Temporary memory is O(G · segment length +
segment length · D) — bounded by the longest segment, never by the whole cache — and the segment
bounds are read to the host once per call (a device sync when run on CUDA tensors).
"""

from __future__ import annotations

import torch


def ragged_decode_attention_torch(q, k_packed, v_packed, cu_seqlens, seq_lens, *, scale,
                                  max_seq_len=None):
    b, h_q, d = q.shape
    num_segments = cu_seqlens.numel() - 1
    group = h_q // (num_segments // b)
    starts = cu_seqlens.tolist()
    lengths = seq_lens.tolist() if seq_lens is not None else [
        starts[s + 1] - starts[s] for s in range(num_segments)]
    out = torch.zeros(b, h_q, d, dtype=q.dtype, device=q.device)
    # Query heads h * G ... h * G + G - 1 of batch b share segment b * H_kv + h.
    grouped_q = q.reshape(b, num_segments // b, group, d)
    grouped_out = out.view(b, num_segments // b, group, d)
    for segment, (start, length) in enumerate(zip(starts, lengths)):
        if length == 0:
            continue
        batch, head = divmod(segment, num_segments // b)
        keys = k_packed[start:start + length].float()
        values = v_packed[start:start + length].float()
        logits = grouped_q[batch, head].float() @ keys.T * scale  # [G, length]
        grouped_out[batch, head] = (torch.softmax(logits, dim=-1) @ values).to(q.dtype)
    return out
