"""Tiny random-weight transformers models for tests and examples (no download, no tokenizer).

``tiny_model("qwen3", num_layers=2)`` builds a ``*ForCausalLM`` in float32 with
``initializer_range=0.1`` (clear margins for greedy decoding), in eval mode, with a fixed seed.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

TINY_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def tiny_model(arch: str, *, num_layers: int = 2, hidden_size: int = 64, num_heads: int = 4,
               num_kv_heads: int = 2, head_dim: int = 16, vocab_size: int = 100, seed: int = 0,
               attn_implementation: str = "sdpa", **config) -> PreTrainedModel:
    """A tiny random-weight ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch must be one of {', '.join(TINY_CONFIGS)}, got {arch!r}")
    config.setdefault("max_position_embeddings", 1024)
    cfg = TINY_CONFIGS[arch](
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        vocab_size=vocab_size, initializer_range=0.1, tie_word_embeddings=False, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return model.eval()


def reference_qk(attention: torch.nn.Module, hidden_states: torch.Tensor,
                 position_ids: torch.Tensor, *, rope_theta: float = 10000.0,
                 eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE ``q [B, H_q, T, D]`` and ``k [B, H_kv, T, D]`` of one Llama/Qwen2/Qwen3 attention
    layer, computed by hand from its weights (an oracle independent of the modeling code):
    ``x W^T + b``, per-head RMS norm (Qwen3's ``q_norm`` / ``k_norm``), then default RoPE
    (rotate-half) at ``position_ids [B, T]`` with base ``rope_theta``."""
    batch, length, _ = hidden_states.shape
    head_dim = attention.head_dim

    def project(linear):
        out = hidden_states @ linear.weight.T
        if linear.bias is not None:
            out = out + linear.bias
        return out.view(batch, length, -1, head_dim)

    def rms_norm(x, norm):
        variance = x.pow(2).mean(dim=-1, keepdim=True)
        norm_eps = eps if eps is not None else norm.variance_epsilon
        return x * torch.rsqrt(variance + norm_eps) * norm.weight

    q, k = project(attention.q_proj), project(attention.k_proj)
    if hasattr(attention, "q_norm"):
        q, k = rms_norm(q, attention.q_norm), rms_norm(k, attention.k_norm)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, T, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None].to(q.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None].to(q.dtype)

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    return rotate(q), rotate(k)


def layer_inputs(model, layer_idx: int, **forward_kwargs) -> torch.Tensor:
    """The hidden states entering layer ``layer_idx``'s attention during
    ``model(**forward_kwargs)`` (a forward pre-hook; the model runs once, without grad)."""
    seen = []
    attention = model.model.layers[layer_idx].self_attn

    def hook(module, args, kwargs):
        seen.append((kwargs.get("hidden_states", args[0] if args else None)).detach().clone())

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**forward_kwargs)
    finally:
        handle.remove()
    return seen[0]
