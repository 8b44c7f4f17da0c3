"""Naive oracle for ``attention_scores``: materialises the full softmax in float64."""

from __future__ import annotations

import torch


def attention_scores_reference(q, k, *, scale=None, causal=True, q_offset=None, reduce="mean",
                               group_reduce="mean", key_valid_len=None, lse=None, softcap=None,
                               sinks=None, window=None):
    """Same arguments and defaults as ``attention_scores`` (without ``impl``); runs on the CPU.

    Logits ``scale * q·k``, soft-capped (``softcap * tanh(logit / softcap)``), masked (causal,
    ``window``: keys ``p - window < j <= p``, ``key_valid_len``); the row log-sum-exp over the
    visible keys (or the given ``lse``, keys only) with the sink folded in
    (``logaddexp(lse, sinks[h])``); probabilities ``exp(logit - lse)``."""
    q, k = q.cpu(), k.cpu()
    key_valid_len = None if key_valid_len is None else key_valid_len.cpu()
    lse = None if lse is None else lse.cpu()
    sinks = None if sinks is None else sinks.cpu().double()
    b, h_q, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    scale = d ** -0.5 if scale is None else scale
    q_offset = t_k - t_q if q_offset is None else q_offset
    qd, kd = q.double(), k.double().repeat_interleave(group, dim=1)
    logits = scale * qd @ kd.transpose(-1, -2)  # [B, H_q, T_q, T_k]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    key_pos = torch.arange(t_k)
    visible = torch.ones(b, 1, t_q, t_k, dtype=torch.bool)
    query_pos = q_offset + torch.arange(t_q)
    if causal:
        visible &= key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        visible &= key_pos[None, :] > query_pos[:, None] - window
    key_valid = torch.ones(b, t_k, dtype=torch.bool)
    if key_valid_len is not None:
        key_valid = key_pos[None, :] < key_valid_len.long()[:, None]
        visible &= key_valid[:, None, None, :]
    logits = logits.masked_fill(~visible, float("-inf"))
    row_lse = torch.logsumexp(logits, dim=-1, keepdim=True) if lse is None \
        else lse.double()[..., None]
    if sinks is not None:  # the sink's exp(sinks[h]) joins every row's denominator
        row_lse = torch.logaddexp(row_lse, sinks[None, :, None, None])
    probs = torch.exp(logits - row_lse)
    probs = torch.where(visible & torch.isfinite(row_lse), probs, 0.0)
    if reduce == "sum":
        per_head = probs.sum(dim=2)
    elif reduce == "mean":
        per_head = probs.sum(dim=2) / t_q
    else:
        per_head = probs.amax(dim=2)
    grouped = per_head.view(b, h_kv, group, t_k)
    scores = grouped.mean(dim=2) if group_reduce == "mean" else grouped.amax(dim=2)
    return scores.masked_fill(~key_valid[:, None, :], float("-inf")).float()
