"""Inputs of transformers' own eager attention functions (Gemma 2's soft-capping, gpt-oss's sinks)
with a sliding-window mask from transformers' mask functions: the cases the kernels' tests compare
``attention_scores`` and ``ragged_attention`` against."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def eager_attention_case(seed: int, *, batch: int = 2, heads: int = 4, kv_heads: int = 2,
                         length: int = 37, head_dim: int = 16, window: int = 9,
                         sink_scale: float = 1.0) -> SimpleNamespace:
    """float64 ``q [B, H_q, T, D]``, ``k``/``v [B, H_kv, T, D]`` (keys doubled: sharper
    attention), the additive sliding-window causal ``mask [T, T]`` transformers builds, ``sinks
    [H_q]`` and a ``module`` stand-in that both eager functions accept (with the sizes as
    attributes ``b, h_q, h_kv, t, d``)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, length, head_dim)
    kv_shape = (batch, kv_heads, length, head_dim)
    q = torch.randn(shape, generator=generator, dtype=torch.float64)
    k = torch.randn(kv_shape, generator=generator, dtype=torch.float64) * 2
    v = torch.randn(kv_shape, generator=generator, dtype=torch.float64)
    positions = torch.arange(length)
    allowed = sliding_window_causal_mask_function(window)(0, 0, positions[:, None],
                                                          positions[None, :])
    mask = torch.zeros(length, length, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    sinks = torch.randn(heads, generator=generator, dtype=torch.float64) * sink_scale
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, head_dim=head_dim,
                             training=False, sinks=sinks)
    return SimpleNamespace(q=q, k=k, v=v, mask=mask, sinks=sinks, module=module, b=batch,
                           h_q=heads, h_kv=kv_heads, t=length, d=head_dim, window=window)
