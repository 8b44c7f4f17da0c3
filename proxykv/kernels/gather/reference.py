"""Naive oracles for the KV gathers: plain indexing, one head (or one segment) at a time."""

from __future__ import annotations

import torch


def gather_kv_reference(k: torch.Tensor, v: torch.Tensor,
                        indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n = indices.shape
    k_sel = k.new_zeros(b, h, n, k.shape[-1])
    v_sel = v.new_zeros(b, h, n, v.shape[-1])
    for batch in range(b):
        for head in range(h):
            kept = indices[batch, head].long()
            k_sel[batch, head] = k[batch, head, kept]
            v_sel[batch, head] = v[batch, head, kept]
    return k_sel, v_sel


def gather_kv_ragged_reference(k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                               cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h_kv = k.shape[1]
    bounds = cu_seqlens.tolist()
    k_parts, v_parts = [], []
    for segment in range(len(bounds) - 1):
        batch, head = divmod(segment, h_kv)
        kept = indices[bounds[segment]:bounds[segment + 1]].long()
        k_parts.append(k[batch, head, kept])
        v_parts.append(v[batch, head, kept])
    return torch.cat(k_parts), torch.cat(v_parts)
