"""Tiny random-weight transformers models for tests and examples (no download, no tokenizer).

``tiny_model("qwen3", num_layers=2)`` builds a ``*ForCausalLM`` in float32 with
``initializer_range=0.1`` (clear margins for greedy decoding), in eval mode, with a fixed seed.
``TINY_CONFIGS`` names every family proxykv supports, with the settings that exercise what the
family adds (``FAMILY_SETTINGS``): sliding-window layers beside full-attention ones (a window
shorter than the tests' contexts), Gemma 2's logit soft-capping, gpt-oss' attention sinks and
mixture of experts.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

#: the window of the tiny models' sliding layers: shorter than the tests' contexts, so it bites
TINY_WINDOW = 16

TINY_CONFIGS = {
    "llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
    "qwen2_sliding": Qwen2Config, "qwen3_sliding": Qwen3Config, "phi3": Phi3Config,
    "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "gpt_oss": GptOssConfig,
}


def _alternating(num_layers: int) -> list[str]:
    """Sliding, full, sliding, ...: every family's hybrid layout, in miniature."""
    kinds = ("sliding_attention", "full_attention")
    return [kinds[index % 2] for index in range(num_layers)]


def family_settings(arch: str, num_layers: int) -> dict:
    """Config settings of ``arch`` beyond the sizes: what the family adds, made to bite at the
    tests' lengths and weights (a ``TINY_WINDOW`` window, a soft-cap of 1 where the logits'
    spread is about 1). Every layout keeps a full-attention layer."""
    window = {"sliding_window": TINY_WINDOW}
    if arch == "mistral":
        return {"sliding_window": None}
    if arch in ("qwen2_sliding", "qwen3_sliding"):  # layers from max_window_layers on slide
        return {**window, "use_sliding_window": True, "max_window_layers": 1}
    if arch == "phi3":
        return {"sliding_window": None, "pad_token_id": 0}
    if arch == "gemma2":
        return {**window, "layer_types": _alternating(num_layers), "query_pre_attn_scalar": 16,
                "attn_logit_softcapping": 1.0, "final_logit_softcapping": 10.0}
    if arch == "gemma3_text":
        return {**window, "layer_types": _alternating(num_layers), "query_pre_attn_scalar": 16}
    if arch == "gpt_oss":
        return {**window, "layer_types": _alternating(num_layers), "num_local_experts": 4,
                "num_experts_per_tok": 2}
    return {}


def tiny_model(arch: str, *, num_layers: int = 2, hidden_size: int = 64, num_heads: int = 4,
               num_kv_heads: int = 2, head_dim: int = 16, vocab_size: int = 100, seed: int = 0,
               attn_implementation: str = "sdpa", **config) -> PreTrainedModel:
    """A tiny random-weight ``*ForCausalLM`` of ``arch`` (a key of ``TINY_CONFIGS``), with the
    family's settings (``family_settings``) unless ``config`` overrides them."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch must be one of {', '.join(TINY_CONFIGS)}, got {arch!r}")
    config.setdefault("max_position_embeddings", 1024)
    config = {**family_settings(arch, num_layers), **config}
    cfg = TINY_CONFIGS[arch](
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        vocab_size=vocab_size, initializer_range=0.1, tie_word_embeddings=False, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
        for layer in model.model.layers:
            sinks = getattr(layer.self_attn, "sinks", None)
            if sinks is not None:  # sinks worth ~exp(2) keys each: they take real mass here
                with torch.no_grad():
                    sinks.normal_(2.0, 1.0)
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
