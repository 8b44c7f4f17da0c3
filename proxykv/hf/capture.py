"""Capture of each attention layer's post-RoPE queries and keys while a transformers model runs.

``with capture_attention(model, callback): model(...)`` makes every decoder layer call
``callback(AttentionCall(...))`` as it runs, with the queries of the tokens being fed and all the
keys they attend to (the cached ones, then the new ones), exactly as the model's attention sees
them: after the projections, the per-head q/k norms (Qwen3) and RoPE. Nothing is re-projected.

How: a uniquely named attention function is registered with
``transformers.AttentionInterface`` (and the previous implementation's mask function with
``AttentionMaskInterface`` under the same name, so the model builds the same masks), and the model
is switched to it with ``model.set_attn_implementation``. The function calls the model's previous
implementation (``sdpa`` or ``eager``) with the same arguments and returns its result unchanged,
then hands the layer's tensors to the callback. On exit — also when an exception is raised inside
the block or by the callback — the previous implementation is restored and both registrations are
removed.

The callback runs inside the layer: it must consume the tensors there (e.g. reduce them to scores)
and not keep references to them, so that no layer's queries outlive the layer.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from proxykv.hf.architectures import FAMILIES, SUPPORTED_MODEL_TYPES, layer_layout

#: the attention implementations a capture can wrap (the model's current one must be one of them):
#: the stock ones and their compressed counterparts (``proxykv.hf.compressed``).
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "proxykv_sdpa", "proxykv_eager")
#: the prefix of the names a capture registers (``proxykv_capture_<n>``).
CAPTURE_NAME_PREFIX = "proxykv_capture_"
#: the key under which a compressed cache layer hands itself to the attention function
#: (``proxykv.hf.compressed``); a call carrying it is not a stock attention call
LAYER_KEY = "proxykv_compressed_layer"
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

_counter = itertools.count()
_registry_lock = threading.Lock()


@dataclass(frozen=True)
class AttentionCall:
    """One attention layer's call, as handed to a capture callback.

    Attributes:
        layer_idx: the decoder layer (``module.layer_idx``), 0-based.
        query: ``[B, H_q, T_new, D]`` post-RoPE queries of the tokens being fed.
        key: ``[B, H_kv, T_k, D]`` post-RoPE keys they attend to: the cache's keys followed by the
            new tokens' keys (``T_k = past length + T_new``), not repeated for GQA.
        value: ``[B, H_kv, T_k, D]`` the matching values.
        scaling: the logit scale the layer uses (``module.scaling``, e.g. ``D ** -0.5``).
        num_key_value_groups: ``H_q // H_kv``.
        module: the attention module itself (read-only use).
        softcap: the layer's logit soft-cap (Gemma 2), None without one.
        sinks: float ``[H_q]`` learned sink logits of the layer (gpt-oss), None without.
        sliding_window: the layer's window (a sliding-window layer), None for full attention.
        lse: float32 ``[B, H_q, T_new]`` natural-log log-sum-exp of each query's scaled logits
            over the keys it saw, when the capture was asked for it (``with_lse``) and could take
            it from the attention itself; else None.

    The tensors belong to the running layer: consume them in the callback, do not keep them.
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    num_key_value_groups: int
    module: torch.nn.Module
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    sliding_window: int | None = None
    lse: torch.Tensor | None = None


def check_supported_model(model) -> str:
    """Check that ``model``'s attention can be captured; returns its current attention
    implementation (``"sdpa"`` or ``"eager"``).

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: its architecture is not one of ``SUPPORTED_MODEL_TYPES``, it has no
            full-attention layer or a layer kind proxykv does not know
            (``proxykv.hf.architectures.layer_layout``), it has no ``config._attn_implementation``
            or ``set_attn_implementation``, its attention implementation is not one of
            ``SUPPORTED_ATTN_IMPLEMENTATIONS``, or it is already being captured.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (a decoder of one of "
                        f"{', '.join(FAMILIES.values())}), got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model {type(model).__name__} (model_type {model_type!r}) cannot be "
                         f"captured: supported architectures (config.model_type) are {supported}")
    if not hasattr(config, "_attn_implementation") or not callable(
            getattr(model, "set_attn_implementation", None)):
        raise ValueError(f"model {type(model).__name__} has no config._attn_implementation / "
                         f"set_attn_implementation, so its attention cannot be intercepted through "
                         f"transformers' AttentionInterface (supported: {supported} models of "
                         f"transformers 5.x)")
    layer_layout(model)
    current = config._attn_implementation
    if isinstance(current, str) and current.startswith(CAPTURE_NAME_PREFIX):
        raise ValueError(f"model {type(model).__name__} is already being captured "
                         f"(attention implementation {current!r}); captures do not nest")
    if current not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model {type(model).__name__} uses attention implementation "
                         f"{current!r}, which cannot be captured; supported: "
                         f"{', '.join(SUPPORTED_ATTN_IMPLEMENTATIONS)} (load the model with "
                         f"attn_implementation='sdpa' or call "
                         f"model.set_attn_implementation('sdpa'))")
    return current


def stock_attention_function(implementation: str, module: torch.nn.Module) -> Callable:
    """The attention function ``module`` calls under ``implementation``."""
    if implementation == "eager":
        # Each modeling file defines its own eager function, the one its attention falls back to.
        modeling = sys.modules.get(type(module).__module__)
        function = getattr(modeling, "eager_attention_forward", None)
        if function is None:
            raise ValueError(f"cannot find eager_attention_forward for {type(module).__name__} "
                             f"(module {type(module).__module__})")
        return function
    return AttentionInterface._global_mapping[implementation]


def layer_features(kwargs: dict) -> dict:
    """The layer features a model passes its attention function (``softcap``, ``s_aux``,
    ``sliding_window``), as ``AttentionCall`` fields."""
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    return {"softcap": None if softcap is None else float(softcap), "sinks": kwargs.get("s_aux"),
            "sliding_window": None if window is None else int(window)}


@functools.lru_cache(maxsize=8)
def _causal_square(size: int, device: torch.device) -> torch.Tensor:
    """The boolean causal mask of ``size`` queries over their own ``size`` keys (cached: every
    chunk of a reconstruction has the same size)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def _flash_attention_with_lse(module, query, key, value, attention_mask, scaling: float):
    """``sdpa``'s output of one layer (to float rounding), transposed as transformers'
    ``sdpa_attention_forward`` returns it (``[B, T_new, H_q, D]``), and each query's log-sum-exp
    ``[B, H_q, T_new]``, from torch's CPU flash kernel (the kernel ``sdpa`` runs on the CPU).
    ``attention_mask``: transformers' boolean ``[B, 1, T_new, T_k]`` (True = seen) or None
    (causal, the queries being the last ``T_new`` positions). A plain causal mask runs as two
    unmasked calls merged (the masked kernel cannot skip what the mask hides: 1.4x slower on a
    512-query chunk against 8k keys)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # the kernel takes one KV head per query head
        batch, heads, length, dim = key.shape
        key = key[:, :, None].expand(batch, heads, groups, length, dim).reshape(
            batch, heads * groups, length, dim)
        value = value[:, :, None].expand(batch, heads, groups, length, value.shape[-1]).reshape(
            batch, heads * groups, length, value.shape[-1])
    t_new, t_k = query.shape[2], key.shape[2]
    past = t_k - t_new  # the queries are the last t_new positions
    if attention_mask is None:
        if not getattr(module, "is_causal", True):  # every query sees every key
            output, lse = _FLASH_CPU(query, key, value, 0.0, False, scale=scaling)[:2]
            return output.transpose(1, 2).contiguous(), lse
        plain_causal = True
    else:
        seen = attention_mask[..., :t_k]
        plain_causal = seen.shape[:2] == (1, 1) and bool(seen[0, 0, :, :past].all()) and bool(
            torch.equal(seen[0, 0, :, past:], _causal_square(t_new, query.device)))
    if plain_causal:
        # Unmasked kernels: the keys before the queries, seen by all; then the queries' own
        # square block, causal (the kernel's causal mask is top-left aligned, right for a square).
        # Merged through their log-sum-exps.
        parts = []
        if past > 0:
            parts.append(_FLASH_CPU(query, key[:, :, :past], value[:, :, :past], 0.0, False,
                                    scale=scaling)[:2])
        parts.append(_FLASH_CPU(query, key[:, :, past:], value[:, :, past:], 0.0, t_new > 1,
                                scale=scaling)[:2])
        output, lse = parts[0]
        if len(parts) == 2:
            (front, front_lse), (block, block_lse) = parts
            lse = torch.logaddexp(front_lse, block_lse)
            output = front * (front_lse - lse).exp().unsqueeze(-1).to(front.dtype) + \
                block * (block_lse - lse).exp().unsqueeze(-1).to(block.dtype)
    else:
        mask = torch.zeros(seen.shape, dtype=query.dtype, device=query.device)
        mask.masked_fill_(~seen, float("-inf"))
        output, lse = _FLASH_CPU(query, key, value, 0.0, False, attn_mask=mask, scale=scaling)[:2]
    return output.transpose(1, 2).contiguous(), lse


def kernel_features(softcap: float | None = None, sinks: torch.Tensor | None = None) -> dict:
    """The layer features proxykv's attention kernels take (``softcap``, ``sinks``), only those
    the layer has: keyword arguments for ``attention_scores`` and ``ragged_attention``."""
    features = {"softcap": softcap, "sinks": sinks}
    return {name: value for name, value in features.items() if value is not None}


class AttentionCapture:
    """Context manager installing a capture on ``model`` (see the module docstring).

    Use ``capture_attention(model, callback)``. Attributes: ``name`` (the registered
    implementation name, while active), ``previous_implementation``, ``num_calls`` (layer calls
    seen so far).
    """

    def __init__(self, model, callback: Callable[[AttentionCall], None], *,
                 with_lse: bool = False):
        self.previous_implementation = check_supported_model(model)
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if not isinstance(with_lse, bool):
            raise TypeError(f"with_lse must be a bool, got {type(with_lse).__name__}")
        self.model = model
        self.callback = callback
        self.with_lse = with_lse
        self.name: str | None = None
        self.num_calls = 0
        self._eager_functions: dict[type, Callable] = {}

    def _attention(self, module, query, key, value, attention_mask, *args, **kwargs):
        cls = type(module)
        function = self._eager_functions.get(cls)
        if function is None:
            function = stock_attention_function(self.previous_implementation, module)
            self._eager_functions[cls] = function
        scaling = kwargs.get("scaling", getattr(module, "scaling", None))
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        features = layer_features(kwargs)
        lse = None
        if self.with_lse and self._flash_applies(query, attention_mask, features, args, kwargs):
            attended, lse = _flash_attention_with_lse(module, query, key, value, attention_mask,
                                                      float(scaling))
            output = (attended, None)  # what the stock function returns: (output, weights)
        else:
            output = function(module, query, key, value, attention_mask, *args, **kwargs)
        self.num_calls += 1
        self.callback(AttentionCall(
            layer_idx=int(module.layer_idx), query=query, key=key, value=value,
            scaling=float(scaling), num_key_value_groups=query.shape[1] // key.shape[1],
            module=module, lse=lse, **features))
        return output

    def _flash_applies(self, query, attention_mask, features, args, kwargs) -> bool:
        """Whether this layer's stock attention is plain ``sdpa`` on the CPU, which torch's CPU
        flash kernel computes while returning each row's log-sum-exp (no soft-cap, sink or window,
        no dropout, no position bias, not a non-causal call, no compressed cache layer, a boolean
        or no mask)."""
        return (_FLASH_CPU is not None and query.device.type == "cpu"
                and self.previous_implementation in ("sdpa", "proxykv_sdpa")
                and not args and LAYER_KEY not in kwargs and not kwargs.get("dropout")
                and kwargs.get("is_causal", True) is not False
                and kwargs.get("position_bias") is None
                and all(value is None for value in features.values())
                and query.dtype in (torch.float32, torch.bfloat16)
                and (attention_mask is None or attention_mask.dtype == torch.bool))

    def __enter__(self) -> AttentionCapture:  # noqa: PYI034 (Self needs Python 3.11)
        if self.name is not None:
            raise RuntimeError("this AttentionCapture is already active")
        # Checked again: the model may have changed since the capture was built.
        self.previous_implementation = check_supported_model(self.model)
        name = f"{CAPTURE_NAME_PREFIX}{next(_counter)}"
        mask_function = AttentionMaskInterface._global_mapping[self.previous_implementation]
        with _registry_lock:
            AttentionInterface.register(name, self._attention)
            AttentionMaskInterface.register(name, mask_function)
        self.name = name
        try:
            self.model.set_attn_implementation(name)
            if self.model.config._attn_implementation != name:
                raise ValueError(f"model {type(self.model).__name__} did not accept the attention "
                                 f"implementation {name!r} (set_attn_implementation ignored it), "
                                 f"so its attention cannot be captured; supported: "
                                 f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._restore()

    def _restore(self) -> None:
        name, self.name = self.name, None
        try:
            if self.model.config._attn_implementation != self.previous_implementation:
                self.model.set_attn_implementation(self.previous_implementation)
        finally:
            with _registry_lock:
                AttentionInterface._global_mapping.pop(name, None)
                AttentionMaskInterface._global_mapping.pop(name, None)


def capture_attention(model, callback: Callable[[AttentionCall], None], *,
                      with_lse: bool = False) -> AttentionCapture:
    """Hand every attention layer's post-RoPE queries and keys to ``callback`` while ``model``
    runs inside the ``with`` block.

    Args:
        model: a transformers model of a supported family (``SUPPORTED_MODEL_TYPES``,
            ``*ForCausalLM`` or the base model) whose attention implementation is ``"sdpa"`` or
            ``"eager"``.
        callback: called as ``callback(call: AttentionCall)`` once per layer per forward pass,
            inside the layer, after its attention ran. Its return value is ignored; an exception
            propagates (and the capture is removed).
        with_lse: also hand over each query's log-sum-exp (``call.lse``) where the layer runs
            plain ``sdpa`` on the CPU: the layer's attention is then computed by torch's CPU flash
            kernel directly, which returns it (what ``sdpa`` runs there; outputs agree to float
            rounding, not always bit for bit). Elsewhere ``call.lse`` is None.

    Returns:
        an ``AttentionCapture`` context manager; the model's outputs are unchanged under it.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``, ``callback`` not callable.
        ValueError: the model's attention cannot be captured (see ``check_supported_model``).

    Example::

        seen = {}
        with capture_attention(model, lambda call: seen.__setitem__(call.layer_idx,
                                                                  call.query.shape)):
            model(input_ids)
    """
    return AttentionCapture(model, callback, with_lse=with_lse)
