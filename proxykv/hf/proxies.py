"""Proxies built from the target itself, for when no smaller sibling model is at hand.

``early_layers_proxy(target, n)`` is the target's first ``n`` decoder layers with its embeddings,
final norm and head: a model of the target's own class whose parameters *are* the target's
tensors (no copy, no extra memory) but whose modules and config are its own. So a capture or an
attention switch on the proxy never reaches the target's modules, and both can run at once
(``ProxyKV(target, early_layers_proxy(target, 6), aligner=..., concurrent=True)``): inference
only reads the shared tensors.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from proxykv._validation import check_int
from proxykv.hf.architectures import layer_layout
from proxykv.hf.capture import check_supported_model
from proxykv.hf.compressed import stock_implementation

#: the attribute path of the decoder layers of the supported families (``model.model.layers``)
_LAYERS = "layers"


def early_layers_proxy(model, num_layers: int) -> PreTrainedModel:
    """The first ``num_layers`` decoder layers of ``model`` as a model of its own class, sharing
    ``model``'s parameters and buffers (no copy).

    Args:
        model: a ``*ForCausalLM`` of a supported family (``proxykv.hf.SUPPORTED_MODEL_TYPES``).
        num_layers: ``1 <= num_layers < model.config.num_hidden_layers``; the first layers must
            include a full-attention layer (the proxy's scores come from those only).

    Returns:
        a model in eval mode on ``model``'s device, dtype and (stock) attention implementation,
        whose config is a copy of ``model``'s with ``num_hidden_layers = num_layers`` (and
        ``layer_types`` cut to them), and whose ``generation_config`` is a copy of ``model``'s.
        Changing a parameter of either model changes the other's: they are the same tensors.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel`` with ``model.model.layers``, or
            ``num_layers`` is not an int.
        ValueError: an unsupported model, ``num_layers`` out of range, or first layers that are all
            sliding-window layers (naming the first full-attention layer).
    """
    check_supported_model(model)
    total = int(model.config.num_hidden_layers)
    check_int("num_layers", num_layers, minimum=1, maximum=total - 1)
    decoder = getattr(model, "model", None)
    if decoder is None or not isinstance(getattr(decoder, _LAYERS, None), torch.nn.ModuleList):
        raise TypeError(f"model must be a *ForCausalLM whose decoder layers are model.model."
                        f"{_LAYERS}, got {type(model).__name__}")
    full_layers = layer_layout(model).compressible
    if full_layers[0] >= num_layers:
        raise ValueError(f"num_layers = {num_layers}: the first {num_layers} layers of "
                         f"{type(model).__name__} all use a sliding window, whose cache proxykv "
                         f"does not score; its first full-attention layer is layer "
                         f"{full_layers[0]}, so num_layers must be >= {full_layers[0] + 1}")

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:num_layers])
    # The target may run proxykv's compressed attention; the proxy starts from the stock one.
    config._attn_implementation = stock_implementation(model)
    with torch.device("meta"):
        proxy = type(model)(config)
    kept = {f"model.{_LAYERS}.{index}." for index in range(num_layers)}

    def belongs(name: str) -> bool:
        prefix = f"model.{_LAYERS}."
        return not name.startswith(prefix) or any(name.startswith(k) for k in kept)

    tensors = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()
               if belongs(name)}
    proxy.load_state_dict(tensors, strict=True, assign=True)
    # Buffers left out of the state dict (e.g. RoPE's inverse frequencies) are shared too.
    own_buffers = dict(model.named_buffers())
    for name, buffer in list(proxy.named_buffers()):
        if buffer.is_meta:
            module_name, _, attribute = name.rpartition(".")
            owner = proxy.get_submodule(module_name) if module_name else proxy
            owner._buffers[attribute] = own_buffers[name]
    left = [name for name, tensor in [*proxy.named_parameters(), *proxy.named_buffers()]
            if tensor.is_meta]
    if left:  # pragma: no cover - a modeling file with state outside parameters and buffers
        raise ValueError(f"early_layers_proxy: {type(model).__name__} holds state that could not "
                         f"be shared: {', '.join(left[:5])}")
    proxy.generation_config = copy.deepcopy(model.generation_config)
    return proxy.eval()


__all__ = ["early_layers_proxy"]
