"""CPU implementation of ``ragged_attention``.

One segment (KV head of one batch element) at a time: the ``G`` query heads of its GQA group and
a chunk of the new tokens attend over the segment's visible rows with a float32 softmax. A chunk
holds at most ``CHUNK_ELEMENTS`` logits (``G × tokens × rows``), so temporary memory is bounded by
the chunk and the longest segment (``rows × D`` for its K/V in float32), never by the whole cache
or by ``T_new × rows``. The segment bounds are read to the host once per call (a device sync when
run on CUDA tensors).
"""

from __future__ import annotations

import torch

# 4M float32 logits (16 MiB) per chunk: large enough that a decode step or a 128-token question
# over a 32k-row segment is one matrix product per segment.
CHUNK_ELEMENTS = 1 << 22


def ragged_attention_torch(q, k_packed, v_packed, cu_seqlens, seq_lens, *, scale, return_lse,
                           max_seq_len=None, softcap=None, sinks=None, window=None,
                           key_positions=None):
    b, h_q, num_new, d = q.shape
    num_segments = cu_seqlens.numel() - 1
    h_kv = num_segments // b
    group = h_q // h_kv
    starts = cu_seqlens.tolist()
    lengths = seq_lens.tolist() if seq_lens is not None else [
        starts[s + 1] - starts[s] for s in range(num_segments)]
    out = torch.zeros(b, h_q, num_new, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, h_q, num_new), float("-inf"), dtype=torch.float32, device=q.device)
    # Query heads h * G ... h * G + G - 1 of batch b share segment b * H_kv + h.
    grouped_q = q.reshape(b, h_kv, group, num_new, d)
    grouped_out = out.view(b, h_kv, group, num_new, d)
    grouped_lse = lse.view(b, h_kv, group, num_new)
    # [H_kv, G, 1]: the sink logit of every query head, by segment head
    grouped_sinks = None if sinks is None else sinks.to(q.device, torch.float32).view(
        h_kv, group, 1)
    for segment, (start, length) in enumerate(zip(starts, lengths)):
        context = length - num_new  # rows before the new tokens' own
        first_seeing = max(0, -context)  # tokens before it see no row (only without new rows)
        if first_seeing >= num_new:
            continue
        batch, head = divmod(segment, h_kv)
        keys = k_packed[start:start + length].float()
        values = v_packed[start:start + length].float()
        if window is not None:
            row_positions = key_positions[start:start + length].to(q.device, torch.int64)
        tokens_per_chunk = max(1, CHUNK_ELEMENTS // max(1, group * length))
        for lo in range(first_seeing, num_new, tokens_per_chunk):
            hi = min(num_new, lo + tokens_per_chunk)
            visible_rows = context + hi  # the chunk's last token sees this many rows
            logits = grouped_q[batch, head, :, lo:hi].float() @ keys[:visible_rows].T * scale
            if softcap is not None:
                logits = logits.div_(softcap).tanh_().mul_(softcap)
            if hi - lo > 1:  # a single token sees every row of its chunk
                token = torch.arange(lo, hi, device=q.device)[:, None]
                row = torch.arange(visible_rows, device=q.device)[None, :]
                logits = logits.masked_fill(row > context + token, float("-inf"))
            if window is not None:  # each token's own row holds its position
                query_positions = row_positions[context + lo:context + hi]
                logits = logits.masked_fill(
                    row_positions[None, :visible_rows] <= query_positions[:, None] - window,
                    float("-inf"))
            chunk_lse = torch.logsumexp(logits, dim=-1)  # [G, tokens], the keys only
            denominator = chunk_lse if grouped_sinks is None else torch.logaddexp(
                chunk_lse, grouped_sinks[head])
            probabilities = torch.exp(logits - denominator[..., None])
            grouped_out[batch, head, :, lo:hi] = (probabilities @ values[:visible_rows]).to(q.dtype)
            grouped_lse[batch, head, :, lo:hi] = chunk_lse
    return (out, lse) if return_lse else out


def ragged_decode_attention_torch(q, k_packed, v_packed, cu_seqlens, seq_lens, *, scale,
                                  max_seq_len=None, softcap=None, sinks=None, window=None,
                                  key_positions=None):
    """``q [B, H_q, D]``: the one-token case (every valid row visible) → ``[B, H_q, D]``."""
    return ragged_attention_torch(q[:, :, None], k_packed, v_packed, cu_seqlens, seq_lens,
                                  scale=scale, return_lse=False, softcap=softcap, sinks=sinks,
                                  window=window, key_positions=key_positions)[:, :, 0]
