"""Which transformers architectures proxykv compresses, and which of their layers.

A model's layers are of two kinds, as transformers' own ``DynamicCache(config=...)`` lays out
their caches:

- **full attention** (a plain ``DynamicLayer``): every token sees the whole context, so its cache
  grows with it. These are the *compressible* layers: scoring, alignment, selection and compaction
  act on them, and only them;
- **sliding window** (``DynamicSlidingWindowLayer``, Gemma 2/3, gpt-oss, Qwen2/3 with
  ``use_sliding_window``): the layer keeps only its last ``sliding_window - 1`` tokens. Its cache
  is already bounded; proxykv leaves it untouched.

A model needs at least one compressible layer; one whose every layer slides (Mistral or Phi-3 with
a ``sliding_window``) is refused with what to do instead. The layer features these families add
reach the attention function as keyword arguments and are honoured by the scorers and the
compressed attention: logit soft-capping (``softcap``, Gemma 2) and learned attention sinks
(``s_aux``, gpt-oss).
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``config.model_type`` -> the family's name, for the architectures whose attention goes through
#: transformers' attention-function interface with post-RoPE queries/keys and ``cache.update``.
FAMILIES = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi-3",
    "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "gpt_oss": "gpt-oss",
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class LayerLayout:
    """The kinds of a model's decoder layers.

    Attributes:
        compressible: indices (0-based, ascending) of the full-attention layers, which proxykv
            scores and compresses; the scores' and the aligner's layer axis counts these only.
        sliding: ``{layer index: sliding_window}`` of the layers that keep their own bounded
            cache, untouched.
    """

    compressible: tuple[int, ...]
    sliding: dict[int, int]

    @property
    def num_layers(self) -> int:
        return len(self.compressible) + len(self.sliding)

    def index_of(self, layer_idx: int) -> int | None:
        """The position of model layer ``layer_idx`` among the compressible ones (None: sliding)."""
        return self.compressible.index(layer_idx) if layer_idx in self.compressible else None


def layer_layout(model) -> LayerLayout:
    """The ``LayerLayout`` of ``model``, read from the cache transformers builds for its config.

    Raises:
        ValueError: a layer kind proxykv does not know (chunked attention, shared or MLP-only
            layers), or no full-attention layer at all (naming the window and what to do).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    config = model.config
    layers = DynamicCache(config=config).layers
    compressible, sliding, other = [], {}, []
    for index, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            compressible.append(index)
        elif type(layer) is DynamicSlidingWindowLayer:
            sliding[index] = int(layer.sliding_window)
        else:
            other.append(f"{index} ({type(layer).__name__})")
    name = type(model).__name__
    if other:
        raise ValueError(f"model {name} has layers of a kind proxykv cannot compress or keep "
                         f"untouched: {', '.join(other)}; supported: full-attention and "
                         f"sliding-window layers")
    if len(layers) != int(config.num_hidden_layers):
        raise ValueError(f"model {name}: its cache has {len(layers)} layers but "
                         f"config.num_hidden_layers is {config.num_hidden_layers}")
    if not compressible:
        windows = sorted(set(sliding.values()))
        raise ValueError(f"model {name}: every layer attends through a sliding window "
                         f"({'/'.join(map(str, windows))} tokens, config.sliding_window), whose "
                         f"cache is already bounded, so there is nothing to compress (proxykv "
                         f"compresses full-attention layers); when contexts and answers fit in "
                         f"the window, load it with sliding_window=None: same outputs, "
                         f"compressible")
    return LayerLayout(tuple(compressible), sliding)


def compressible_shape(model) -> tuple[int, int]:
    """``(compressible layers, KV heads)``: the shape of a model's scores and of an aligner's side
    for it."""
    config = model.config
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return len(layer_layout(model).compressible), heads


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "LayerLayout", "compressible_shape",
           "layer_layout"]
