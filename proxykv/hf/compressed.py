"""A compressed target cache that transformers models use as their own (``generate(cache=...)``).

``CompressedCache`` is a ``transformers.Cache`` whose layers hold only the kept KV pairs of a
compressed context:

- **uniform** selections (every KV head keeps ``k`` positions): dense ``[B, H_kv, k, D]`` tensors
  per layer (``CompressedLayer``), usable by the stock ``sdpa``/``eager`` attention;
- **per-head** selections: one ``proxykv.RaggedKVCache`` (``RaggedCompressedLayer`` views of its
  layers), read by the compressed attention below.

Both report the **logical** length (the context's length plus the tokens appended since), because
``generate`` feeds only the ids past ``get_seq_length()`` and numbers their positions from the
attention mask: pass the full ids (context + question) and a full-length attention mask, or use
``ProxyKV.generate``. ``restore()`` crops the appended tokens (no copy of the kept pairs), so one
compressed context answers several questions in turn.

**Compressed attention.** ``enable_compressed_attention(model)`` switches a model from ``sdpa``
(``eager``) to ``proxykv_sdpa`` (``proxykv_eager``): an attention function that, for a layer of a
``CompressedCache``, attends over the kept pairs with ``proxykv.ragged_attention`` (the new tokens
see every kept pair and, causally, each other) and otherwise calls ``sdpa`` (``eager``) with the
same arguments — outputs of any other cache are unchanged. Per-head caches need it (the stock
attention takes one mask for all heads); ``ProxyKV`` enables it on its target.

How the layer reaches the attention function: the supported families' attention passes one
``kwargs`` dict to ``cache.update(...)`` and then unpacks it into the attention call, so a
compressed layer's ``update`` puts itself in that dict (``HF-NOTES``: an internal of transformers
5.x; the supported range is pinned in ``pyproject.toml`` and a CI test compares keep-everything
with ``generate``).
"""

from __future__ import annotations

import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)
from transformers.masking_utils import AttentionMaskInterface

from proxykv.cache import RaggedKVCache
from proxykv.hf.capture import (
    LAYER_KEY,
    check_supported_model,
    kernel_features,
    layer_features,
    stock_attention_function,
)
from proxykv.kernels import ragged_attention

#: ``{stock implementation: its compressed counterpart}`` registered with transformers.
COMPRESSED_ATTENTION = {"sdpa": "proxykv_sdpa", "eager": "proxykv_eager"}
_STOCK_OF = {name: stock for stock, name in COMPRESSED_ATTENTION.items()}


def _compressed_attention(stock: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        layer = kwargs.pop(LAYER_KEY, None)
        if layer is None:
            function = stock_attention_function(stock, module)
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        layer.check_module(module)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        features = layer_features(kwargs)
        if features["sliding_window"] is not None:
            raise ValueError(f"layer {module.layer_idx} of {type(module).__name__} is a "
                             f"sliding-window layer, but the CompressedCache holds it compressed: "
                             f"the cache was made for another model")
        out = layer.attend(query, float(scaling),  # [B, H_q, T_new, D]
                           **kernel_features(features["softcap"], features["sinks"]))
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = f"{COMPRESSED_ATTENTION[stock]}_attention"
    return attention


_registered = False
_register_lock = threading.Lock()


def register_compressed_attention() -> None:
    """Register ``proxykv_sdpa`` and ``proxykv_eager`` (with their stock mask functions) with
    transformers; idempotent. Done on import of ``proxykv.hf``."""
    global _registered
    with _register_lock:
        if _registered:
            return
        for stock, name in COMPRESSED_ATTENTION.items():
            AttentionInterface.register(name, _compressed_attention(stock))
            AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[stock])
        _registered = True


def enable_compressed_attention(model) -> str:
    """Switch ``model`` (a supported family, ``sdpa`` or ``eager`` attention) to the compressed
    attention (see the module docstring); returns the new implementation's name. Idempotent.
    Other caches give the same outputs as before: it calls the stock function for them."""
    current = check_supported_model(model)
    if current in _STOCK_OF:
        return current
    register_compressed_attention()
    name = COMPRESSED_ATTENTION[current]
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"model {type(model).__name__} did not accept the attention "
                         f"implementation {name!r}")
    return name


def disable_compressed_attention(model) -> None:
    """Switch ``model`` back to the stock implementation it used before (no-op if not enabled)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current in _STOCK_OF:
        model.set_attn_implementation(_STOCK_OF[current])


def stock_implementation(model) -> str | None:
    """The stock attention implementation ``model`` runs, or would without the compressed one."""
    current = getattr(model.config, "_attn_implementation", None)
    return _STOCK_OF.get(current, current)


def is_compressed_attention(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) in _STOCK_OF


def _hand_over(layer, kwargs) -> None:
    """Put ``layer`` where the attention function of this forward will find it."""
    if isinstance(kwargs, dict):
        kwargs[LAYER_KEY] = layer


class _OwnedLayer:
    """What both layer kinds share: the attention modules of the model the cache was made for
    (set by ``CompressedCache.bind``), checked when an attention function reads the layer."""

    owner_modules: frozenset[int] | None = None
    cache_ref = None  # weakref to the CompressedCache holding the layer

    def check_module(self, module) -> None:
        if self.owner_modules is not None and id(module) not in self.owner_modules:
            cache = None if self.cache_ref is None else self.cache_ref()
            if cache is not None:  # this forward's rows go: the cache stays as it was
                cache._roll_back_interrupted_forward()
            raise ValueError(f"this CompressedCache was made for another model: its attention "
                             f"module {type(module).__name__} is not one of the model the cache "
                             f"was compressed for; compress the prompt with this model's ProxyKV")


class SlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer of a hybrid model, kept as the prefill left it (its cache is
    already bounded by the window). Appending drops its oldest rows, which a crop cannot bring
    back, so it remembers its state at compression (``state()``, a few references: the update
    concatenates into new tensors and never writes the old ones) and ``set_state`` returns to it."""

    def __init__(self, prefilled: DynamicSlidingWindowLayer):
        super().__init__(sliding_window=prefilled.sliding_window)
        self.lazy_initialization(prefilled.keys, prefilled.values)
        self.set_state((prefilled.keys, prefilled.values, prefilled.cumulative_length))
        self.compressed_state = self.state()

    def state(self) -> tuple:
        return self.keys, self.values, self.cumulative_length

    def set_state(self, state: tuple) -> None:
        self.keys, self.values, self.cumulative_length = state


class CompressedLayer(_OwnedLayer, DynamicLayer):
    """One layer of a uniform compressed cache: dense ``keys``/``values`` ``[B, H_kv, k + n, D]``
    (``k`` kept rows, then ``n`` appended ones); ``dropped`` positions of the context are gone.

    Usable by the stock attention: ``get_mask_sizes`` returns ``(k + n + q, dropped)``, i.e. the
    mask's columns of the kept rows are the context's last ``k`` ones — all real tokens, since a
    row never keeps more positions than it has tokens.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, dropped: int,
                 impl: str | None = None):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.dropped = int(dropped)
        self.impl = impl

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        _hand_over(self, kwargs.get("kwargs", args[0] if args else None))
        return keys, values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.dropped

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, self.dropped

    def attend(self, query: torch.Tensor, scaling: float, **features) -> torch.Tensor:
        """``[B, H_q, T_new, D]`` attention of the new tokens over the layer; ``features`` are
        the layer's ``softcap``/``sinks`` (``ragged_attention``'s arguments)."""
        batch, heads, rows, dim = self.keys.shape
        # DynamicLayer grows by concatenation, so the storage is contiguous: segment s = b*H + h
        # of the packed view is head h of row b, every segment `rows` long.
        keys = self.keys.contiguous().view(batch * heads * rows, dim)
        values = self.values.contiguous().view(batch * heads * rows, dim)
        cu_seqlens = torch.arange(0, batch * heads + 1, device=keys.device,
                                  dtype=torch.int64) * rows
        return ragged_attention(query, keys, values, cu_seqlens, scale=scaling,
                                max_seq_len=rows, num_kv_heads=heads, impl=self.impl,
                                **features)


class RaggedCompressedLayer(_OwnedLayer, CacheLayerMixin):
    """One layer of a per-head compressed cache: a view of layer ``layer_index`` of a
    ``RaggedKVCache``. ``update`` appends there; only the compressed attention can read it."""

    is_croppable = True
    is_sliding = False

    def __init__(self, ragged: RaggedKVCache, layer_index: int, context_length: int,
                 impl: str | None = None):
        super().__init__()
        self.ragged, self.layer_index, self.impl = ragged, layer_index, impl
        self.context_length = int(context_length)
        self.is_initialized = True
        self.device = ragged.device
        self.unread = False  # appended to, but no compressed attention has read it yet

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.ragged.append(self.layer_index, key_states, value_states)
        self.unread = True
        _hand_over(self, kwargs.get("kwargs", args[0] if args else None))
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float, **features) -> torch.Tensor:
        self.unread = False
        return self.ragged.attend(self.layer_index, query, scale=scaling, impl=self.impl,
                                  **features)

    def get_seq_length(self) -> int:
        return self.ragged.next_position(self.layer_index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The compressed attention ignores the mask; size it to the new tokens only (cheap).
        return query_length, self.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count (tokens to remove), got "
                             f"{tokens_to_remove}")
        if tokens_to_remove:
            self.ragged.crop(-tokens_to_remove, self.layer_index)

    def reset(self) -> None:
        raise NotImplementedError("a per-head compressed cache cannot be reset; compress again")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search over a per-head compressed cache is not "
                                  "supported; use a uniform policy or greedy/sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(None)

    def batch_select_indices(self, indices) -> None:
        self.reorder_cache(None)

    def offload(self):
        raise NotImplementedError("offloading a per-head compressed cache is not supported")

    def prefetch(self):
        pass


class CompressedCache(Cache):
    """The target's cache after compression (see the module docstring).

    Attributes:
        selection: the ``proxykv.Selection`` that made it (``.to_mask()`` is ``[B, L, H_kv, T]``).
        stats: the ``CompressionStats`` of ``ProxyKV.compress`` (None when built directly).
        context_length: ``T``, the compressed prompt's (padded) length.
        valid_lengths: tokens per row of the prompt (``T`` minus its left padding).
        ragged: the ``RaggedKVCache`` holding a per-head cache (None for a uniform one).
    """

    def __init__(self, layers, *, selection, context_length: int, valid_lengths: list[int],
                 ragged: RaggedKVCache | None = None, stats=None):
        super().__init__(layers=list(layers))
        self.selection, self.stats, self.ragged = selection, stats, ragged
        self.context_length = int(context_length)
        self.valid_lengths = [int(v) for v in valid_lengths]
        #: the context's ids ``[B, T]`` (set by ``ProxyKV``; its repetition penalty reads them)
        self.context_ids: torch.Tensor | None = None
        self._owner = None      # weakref to the model it was made for (``bind``)
        self._pipeline = None   # the open/closed state of the ProxyKV that made it
        # Each layer's length when the running forward reached layer 0; None between forwards.
        # A forward that raised part-way leaves it set: the next use rolls the layers back.
        self._forward_start: list[int] | None = None

    def bind(self, model, pipeline_state=None, context_ids: torch.Tensor | None = None) -> None:
        """Tie the cache to ``model`` (and the pipeline that made it): another model's attention,
        a closed pipeline, and a per-head cache read by an attention function that cannot read it
        are then refused by name before anything is appended."""
        self._owner = weakref.ref(model)
        self._pipeline = pipeline_state
        self.context_ids = context_ids
        modules = frozenset(id(module) for module in model.modules())
        for layer in self.layers:
            layer.owner_modules = modules
            layer.cache_ref = weakref.ref(self)

    @property
    def owner(self):
        """The model the cache was made for (None if unbound or gone)."""
        return None if self._owner is None else self._owner()

    def check_usable(self) -> None:
        """Raise ``ValueError`` if the cache cannot be used now: its pipeline was closed, its model
        is gone, or (per-head) its model's attention cannot read it."""
        if self._pipeline is not None and not self._pipeline.open:
            raise ValueError("this CompressedCache belongs to a ProxyKV pipeline that was closed "
                             "(or dropped): keep the pipeline open while its caches are used, e.g. "
                             "'with ProxyKV(...) as pipe:'")
        if self._owner is None:
            return
        owner = self._owner()
        if owner is None:
            raise ValueError("the model this CompressedCache was made for no longer exists")
        if self.is_ragged and not is_compressed_attention(owner):
            raise ValueError(f"a per-head CompressedCache needs the compressed attention, but the "
                             f"model runs {owner.config._attn_implementation!r}: call "
                             f"proxykv.hf.enable_compressed_attention(model) (ProxyKV does while "
                             f"it is open)")

    @classmethod
    def from_selection(cls, past_key_values, selection, *, valid_lengths=None, stats=None,
                       reserve_steps: int = 256, impl: str | None = None) -> CompressedCache:
        """Compact ``past_key_values`` to the positions ``selection`` keeps; the input is not
        modified.

        ``past_key_values``: one entry per model layer — a ``(keys, values)`` pair
        (``[B, H_kv, T, D]``) of a full-attention layer, compacted, or a
        ``DynamicSlidingWindowLayer`` of a hybrid model's sliding-window layer, kept as it is —
        or a ``DynamicCache`` (its layers read that way). The selection's layers are the pairs,
        in order. Uniform selections give dense layers, ragged ones a ``RaggedKVCache`` (with
        ``reserve_steps`` spare rows per head). ``impl`` is the backend of the gather and of the
        attention over the cache (``None``, ``"torch"``, ``"triton"``)."""
        from proxykv.kernels import gather_kv

        entries = list(getattr(past_key_values, "layers", past_key_values))
        sliding = {index: entry for index, entry in enumerate(entries)
                   if isinstance(entry, DynamicSlidingWindowLayer)}
        compressible = [index for index in range(len(entries)) if index not in sliding]
        pairs = []
        for index in compressible:
            entry = entries[index]
            pairs.append((entry.keys, entry.values) if isinstance(entry, DynamicLayer)
                         else tuple(entry))
        if len(pairs) != selection.num_layers:
            raise ValueError(f"past_key_values has {len(pairs)} full-attention layers, the "
                             f"selection {selection.num_layers}")
        batch, _, _, length = selection.shape
        valid = [length] * batch if valid_lengths is None else list(valid_lengths)
        ragged = None
        if selection.is_ragged:
            ragged = RaggedKVCache.from_selection(pairs, selection, reserve_steps=reserve_steps,
                                                  check_indices=False, impl=impl)
            kept = [RaggedCompressedLayer(ragged, index, length, impl)
                    for index in range(ragged.num_layers)]
        else:
            kept = []
            for index, (keys, values) in enumerate(pairs):
                kept_keys, kept_values = gather_kv(keys, values, selection.layer(index).indices,
                                                   check_indices=False, impl=impl)
                kept.append(CompressedLayer(kept_keys, kept_values, length - kept_keys.shape[-2],
                                            impl))
        layers = [None] * len(entries)
        for index, layer in zip(compressible, kept):
            layers[index] = layer
        for index, layer in sliding.items():
            layers[index] = SlidingLayer(layer)
        return cls(layers, selection=selection, context_length=length, valid_lengths=valid,
                   ragged=ragged, stats=stats)

    @property
    def is_ragged(self) -> bool:
        return self.ragged is not None

    @property
    def appended(self) -> int:
        """Tokens appended since compression (a question and its answer so far)."""
        return self.get_seq_length() - self.context_length

    @property
    def batch_size(self) -> int:
        return self.selection.batch_size

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self._roll_back_interrupted_forward()
            self.check_usable()
            self._check_new_rows(key_states)
            self._forward_start = [layer.state() if isinstance(layer, SlidingLayer)
                                   else layer.get_seq_length() for layer in self.layers]
        else:
            previous = self.layers[layer_idx - 1]
            if getattr(previous, "unread", False):
                raise RuntimeError(
                    "a per-head CompressedCache was used by an attention function that does not "
                    f"read it (layer {layer_idx - 1}): call "
                    "proxykv.hf.enable_compressed_attention(model) first")
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._forward_start = None  # every layer has its rows: the forward's appends hold
        return out

    def _check_new_rows(self, key_states: torch.Tensor) -> None:
        """The new tokens' keys ``[B, H_kv, t, D]`` must fit the cache (checked before any layer
        grows): another batch size is what beam search and ``num_return_sequences`` feed."""
        batch, heads, _, dim = key_states.shape
        if batch != self.batch_size:
            raise ValueError(f"this CompressedCache holds {self.batch_size} row(s) but the forward "
                             f"feeds {batch}: beam search (num_beams > 1), num_return_sequences > "
                             f"1 and other batch expansions are not supported over a compressed "
                             f"cache; use greedy decoding or sampling, one sequence per row")
        expected = (self.selection.num_kv_heads, self.head_dim)
        if (heads, dim) != expected:
            raise ValueError(f"this CompressedCache holds (KV heads, head_dim) {expected}, the "
                             f"model feeds {(heads, dim)}: it was made for another model")

    @property
    def head_dim(self) -> int:
        if self.ragged is not None:
            return self.ragged.head_dim
        return self.layers[self.compressed_layers[0]].keys.shape[-1]

    def _roll_back_interrupted_forward(self) -> None:
        """Remove the rows a forward that raised part-way appended to its first layers, so every
        layer holds the same tokens again."""
        start, self._forward_start = self._forward_start, None
        if start is None:
            return
        for layer, mark in zip(self.layers, start):
            if isinstance(layer, SlidingLayer):
                layer.set_state(mark)
                continue
            extra = layer.get_seq_length() - mark
            if extra > 0:
                layer.crop(-extra)
            if isinstance(layer, RaggedCompressedLayer):
                layer.unread = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self._roll_back_interrupted_forward()
        return super().get_seq_length(layer_idx)

    def restore(self) -> None:
        """Remove every token appended since compression (no copy of the kept pairs); also the
        rows of a forward that raised part-way."""
        self._roll_back_interrupted_forward()
        for layer in self.layers:
            if isinstance(layer, SlidingLayer):
                layer.set_state(layer.compressed_state)
                continue
            extra = layer.get_seq_length() - self.context_length
            if extra > 0:
                layer.crop(-extra)
            if isinstance(layer, RaggedCompressedLayer):
                layer.unread = False

    @property
    def nbytes(self) -> int:
        """Bytes of the cache's storage (keys, values and, per-head, the metadata)."""
        sliding = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.sliding_layers)
        if self.ragged is not None:
            return self.ragged.nbytes + sliding
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    @property
    def compressed_layers(self) -> tuple[int, ...]:
        """The model layers the cache holds compressed (its full-attention layers), ascending;
        the selection's layer ``i`` is model layer ``compressed_layers[i]``."""
        return tuple(index for index, layer in enumerate(self.layers)
                     if not isinstance(layer, SlidingLayer))

    @property
    def sliding_layers(self) -> list[SlidingLayer]:
        """The sliding-window layers of a hybrid model, kept as the prefill left them."""
        return [layer for layer in self.layers if isinstance(layer, SlidingLayer)]

    def __repr__(self) -> str:
        kind = "per-head" if self.is_ragged else "uniform"
        return (f"CompressedCache({kind}, layers={len(self.layers)}, B={self.batch_size}, "
                f"context={self.context_length}, appended={self.appended}, "
                f"kept={self.selection.total_kept}, nbytes={self.nbytes})")


__all__ = ["COMPRESSED_ATTENTION", "CompressedCache", "CompressedLayer", "RaggedCompressedLayer",
           "disable_compressed_attention", "enable_compressed_attention",
           "is_compressed_attention", "register_compressed_attention"]
