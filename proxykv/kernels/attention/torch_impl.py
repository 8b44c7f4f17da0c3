"""CPU implementation of ``attention_scores``: exact softmax over query chunks.

Each chunk holds complete rows of the attention matrix (every key), so one pass gives both the row
log-sum-exp and the probabilities; peak memory is O(H_q · chunk · T_k), never O(T_q · T_k). The
chunk is sized from a byte budget.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 1024 * 1024


def _chunk_size(batch: int, h_q: int, t_k: int, chunk_bytes: int) -> int:
    # logits, probabilities and a mask are alive at once: ~3 float32 [B, H_q, chunk, T_k] arrays.
    per_query = 3 * 4 * batch * h_q * max(t_k, 1)
    return max(1, chunk_bytes // per_query)


def attention_scores_torch(q, k, *, scale, causal, q_offset, reduce, group_reduce,
                           key_valid_len=None, lse=None, softcap=None, sinks=None, window=None,
                           chunk_bytes: int = CHUNK_BYTES):
    b, h_q, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    # [B, H_kv, D, T_k]: one fp32 view/copy of K shared by every chunk and every head of a group.
    keys_t = k.to(torch.float32).transpose(-1, -2)
    key_pos = torch.arange(t_k, device=k.device)
    key_valid = None
    if key_valid_len is not None:
        key_valid = key_pos[None, :] < key_valid_len.to(k.device, torch.int64)[:, None]  # [B, T_k]
    reduce_max = reduce == "max"
    # [1, H_kv, G, 1, 1]: query head h = kv_head * G + g
    sink = None if sinks is None else sinks.to(q.device, torch.float32).view(1, h_kv, group, 1, 1)
    acc = torch.zeros(b, h_kv, group, t_k, dtype=torch.float32, device=q.device)
    step = _chunk_size(b, h_q, t_k, chunk_bytes)
    for start in range(0, t_q, step):
        stop = min(t_q, start + step)
        # Under causal masking no query of this chunk sees keys past its last position.
        seen = min(t_k, q_offset + stop) if causal else t_k
        # With a window no query of the chunk sees keys before its first query's window.
        first = 0 if window is None else min(seen, max(0, q_offset + start - window + 1))
        q_chunk = q[:, :, start:stop].to(torch.float32).reshape(b, h_kv, group * (stop - start), d)
        logits = torch.matmul(q_chunk, keys_t[..., first:seen]).mul_(scale)  # [B, H_kv, G*c, n]
        logits = logits.view(b, h_kv, group, stop - start, seen - first)
        if softcap is not None:
            logits = logits.div_(softcap).tanh_().mul_(softcap)
        hidden = torch.zeros(1, 1, 1, stop - start, seen - first, dtype=torch.bool,
                             device=q.device)
        chunk_keys = key_pos[None, first:seen]
        if causal:
            query_pos = q_offset + torch.arange(start, stop, device=q.device)
            hidden = hidden | (chunk_keys > query_pos[:, None])
            if window is not None:
                hidden = hidden | (chunk_keys <= query_pos[:, None] - window)
        if key_valid is not None:
            hidden = hidden | ~key_valid[:, None, None, None, first:seen]
        logits.masked_fill_(hidden, float("-inf"))
        if lse is None:
            row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        else:
            row_lse = lse[:, :, start:stop].to(torch.float32).reshape(
                b, h_kv, group, stop - start, 1)
        if sink is not None:  # the sink joins the denominator (the given lse is keys only)
            row_lse = torch.logaddexp(row_lse, sink)
        # A row that sees no key has lse = -inf; it contributes nothing (instead of NaN).
        row_lse = row_lse.masked_fill(torch.isneginf(row_lse), float("inf"))
        probs = logits.sub_(row_lse).exp_()
        if reduce_max:
            torch.maximum(acc[..., first:seen], probs.amax(dim=3), out=acc[..., first:seen])
        else:
            acc[..., first:seen] += probs.sum(dim=3)
    if reduce == "mean":
        acc /= t_q
    scores = acc.mean(dim=2) if group_reduce == "mean" else acc.amax(dim=2)
    if key_valid is not None:
        scores.masked_fill_(~key_valid[:, None, :], float("-inf"))
    return scores
