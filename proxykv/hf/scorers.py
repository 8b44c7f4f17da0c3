"""Scorers: per-layer, per-KV-head importance scores of a prompt's KV pairs, from a real model.

A scorer runs the prompt's prefill itself — so the same code scores a target alone (the
baselines) or a proxy — and returns the scores together with the prefill's ``DynamicCache``:

    scorer = get_scorer("reconstruction", chunk_size=256)
    scores, cache = scorer.score(model, input_ids, attention_mask)
    # scores: float32 [B, L, H_kv, T] (larger = more important, -inf at padded positions)
    # cache:  the prefill's DynamicCache, exactly as a plain prefill leaves it

Registered scorers:

- ``random``: a plain prefill and seeded uniform random scores (the ``random`` baseline; the
  prefill of policies that ignore scores).
- ``window`` (SnapKV): the last ``window`` prompt positions' queries against all keys of the
  prompt, ``attention_scores(reduce=..., group_reduce=...)`` (``"mean"``/``"mean"`` by default),
  computed during the prefill.
- ``reconstruction`` (KVzip): after the prefill, the model is fed a repeat prompt and then the
  context again, in chunks; every context key scores the largest attention any reconstruction
  query (repeat-prompt tokens and context copy alike) gives it, under the exact softmax over
  everything that query attends to (context + reconstruction tokens so far),
  ``attention_scores(reduce="max", group_reduce="max")``, max-accumulated over chunks. The
  reconstruction tokens' KV is then dropped: the returned cache holds exactly the prefill's
  tensors.

Memory per layer is bounded: scores come from ``proxykv.attention_scores`` on the captured Q/K
(never a ``[T_q, T_k]`` attention matrix of the whole context), consumed inside the layer.

Batches: ``B > 1`` takes a left-padding ``attention_mask`` (``[B, T]``, 1 = token, 0 = padding;
each row's tokens are a suffix). Position ids come from the running sum of the mask (as
``generate`` builds them), so each row is scored as if it ran alone; padded positions score
``-inf``.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from proxykv._registry import Factory, Registry
from proxykv._validation import INDEX_DTYPES, check_choice, check_int, check_tensor
from proxykv.hf.architectures import compressible_shape, layer_layout
from proxykv.hf.capture import (
    AttentionCall,
    capture_attention,
    check_supported_model,
    kernel_features,
)
from proxykv.kernels import attention_scores
from proxykv.kernels.attention.api import QUERY_REDUCTIONS

GROUP_REDUCTIONS = ("mean", "max")
IMPLS = (None, "torch", "triton")

#: the repeat prompt's text when a tokenizer is given and no ``repeat_prompt``
DEFAULT_REPEAT_PROMPT_TEXT = "\n\nRepeat the previous context exactly.\n\n"
#: the repeat prompt's token ids when there is no tokenizer (e.g. a random-weight model): the
#: model's ``bos_token_id`` if its config has one inside the vocabulary, else these ids.
DEFAULT_REPEAT_PROMPT_IDS = (0,)


class ScorerOutput(NamedTuple):
    """What ``Scorer.score`` returns (unpacks as ``scores, cache``)."""

    #: float32 ``[B, L, H_kv, T]``, larger = more important, ``-inf`` at padded positions
    scores: torch.Tensor
    #: the prefill's ``DynamicCache`` (``L`` layers of ``[B, H_kv, T, D]`` keys and values)
    cache: DynamicCache


# ----------------------------------------------------------------------------------------------
# registry


_REGISTRY = Registry("scorer", "scorers")


def register_scorer(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a factory (a function or ``Scorer`` subclass) under ``name``;
    ``get_scorer(name, **params)`` calls it. Raises ``ValueError`` if ``name`` is empty or
    already taken."""
    return _REGISTRY.register(name)


def unregister_scorer(name: str) -> None:
    """Remove ``name`` from the registry."""
    _REGISTRY.unregister(name)


def available_scorers() -> list[str]:
    """The registered scorer names, sorted."""
    return _REGISTRY.names()


def get_scorer(name: str, **params) -> Scorer:
    """Build the scorer registered as ``name`` with ``params`` (validated now).

    Raises ``ValueError`` for an unknown name (listing the available ones), ``TypeError`` for a
    parameter the scorer does not take (listing the ones it does), and the scorer's own
    ``TypeError``/``ValueError`` for a bad parameter value.
    """
    return _REGISTRY.build(name, **params)


def scorer_takes(name: str, parameter: str) -> bool:
    """Whether the scorer registered as ``name`` takes the keyword ``parameter``."""
    return _REGISTRY.takes(name, parameter)


# ----------------------------------------------------------------------------------------------
# shared prefill machinery


class _Prompt:
    """The validated prompt: ids, mask, per-row padding, position ids."""

    def __init__(self, model, input_ids, attention_mask):
        check_tensor("input_ids", input_ids, ndim=2, layout="[B, T]", dtypes=INDEX_DTYPES)
        device = model.get_input_embeddings().weight.device
        if input_ids.device != device:
            raise ValueError(f"input_ids must be on the model's device {device}, got "
                             f"{input_ids.device}")
        batch, length = input_ids.shape
        if batch < 1 or length < 1:
            raise ValueError(f"input_ids must have B >= 1 and T >= 1, got shape "
                             f"{tuple(input_ids.shape)} [B, T]")
        config = model.config
        vocab = getattr(config, "vocab_size", None)
        _check_ids_in_vocab("input_ids", input_ids, vocab)
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_positions is not None and length > max_positions:
            raise ValueError(f"input_ids has T = {length} tokens, more than the model's "
                             f"max_position_embeddings = {max_positions}")
        self.ids = input_ids.long()
        self.batch, self.length, self.device = batch, length, device
        if attention_mask is None:
            self.mask = None
            self.pad = [0] * batch
        else:
            check_tensor("attention_mask", attention_mask, ndim=2, layout="[B, T]",
                         dtypes=(torch.bool, torch.int32, torch.int64, torch.uint8))
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(f"attention_mask must have the shape of input_ids "
                                 f"{(batch, length)} [B, T], got {tuple(attention_mask.shape)}")
            if attention_mask.device != device:
                raise ValueError(f"attention_mask must be on the model's device {device}, got "
                                 f"{attention_mask.device}")
            mask = attention_mask.long()
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
            if bool((mask[:, 1:] < mask[:, :-1]).any()):
                row = int((mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero()[0])
                raise ValueError(f"attention_mask must be left-padded (each row's tokens a "
                                 f"suffix: 0...0 1...1); row {row} is not")
            counts = mask.sum(dim=1).tolist()
            if min(counts) < 1:
                raise ValueError(f"attention_mask row {counts.index(min(counts))} has no token; "
                                 f"every row needs at least one")
            self.pad = [length - int(c) for c in counts]
            # An all-ones mask changes nothing: run as unpadded (the model's fastest mask path).
            self.mask = mask if any(self.pad) else None
        self.valid = [length - p for p in self.pad]

    def positions(self, full_mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """Position ids of columns ``[start, stop)`` of a sequence whose mask is ``full_mask``."""
        if full_mask is None:
            return torch.arange(start, stop, device=self.device).unsqueeze(0).expand(
                self.batch, -1)
        positions = full_mask.cumsum(dim=1) - 1
        positions = positions.masked_fill(full_mask == 0, 1)
        return positions[:, start:stop]


def _check_ids_in_vocab(name: str, ids: torch.Tensor, vocab: int | None) -> None:
    if vocab is None or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must hold token ids in [0, vocab_size={vocab}), got "
                         f"{int(ids[where])} at position {list(where)}")


def _cache_argument(model) -> str:
    """The forward keyword of the cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _new_cache(model, past_key_values) -> DynamicCache:
    if past_key_values is None:
        return DynamicCache(config=model.config)
    if not isinstance(past_key_values, DynamicCache):
        raise TypeError(f"past_key_values must be None or an empty transformers DynamicCache, "
                        f"got {type(past_key_values).__name__}")
    if past_key_values.get_seq_length() != 0:
        raise ValueError(f"past_key_values must be empty (the scorer runs the prompt's prefill "
                         f"into it), got one holding {past_key_values.get_seq_length()} tokens")
    return past_key_values


def _forward(model, cache_kw: str, ids, mask, positions, cache) -> None:
    kwargs = {cache_kw: cache}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the scorers need no logits; keep the head's work minimal
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)


def _layer_scorer(model, scores: torch.Tensor, score_layer: Callable) -> Callable:
    """A capture callback running ``score_layer(call, scores_of_the_layer)`` for the compressible
    layers (``scores[:, i]`` of the ``i``-th one) and skipping the sliding-window ones."""
    layout = layer_layout(model)

    def on_attention(call: AttentionCall) -> None:
        index = layout.index_of(call.layer_idx)
        if index is not None:
            score_layer(call, scores[:, index])

    return on_attention


class Scorer(ABC):
    """Base of the scorers: ``score(model, input_ids, attention_mask=None, past_key_values=None)``.

    Subclasses implement ``_run(model, prompt, cache, scores)``; the base validates the inputs,
    allocates the scores (``-inf`` at padded positions, 0 elsewhere) and runs under
    ``torch.no_grad()``.
    """

    name: str = "scorer"

    def score(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              past_key_values: DynamicCache | None = None) -> ScorerOutput:
        """Prefill ``input_ids`` on ``model`` and score every prompt position's KV pair.

        Args:
            model: a transformers model of a supported family (``*ForCausalLM`` or base, see
                ``proxykv.hf.architectures``), with ``sdpa`` or ``eager`` attention.
            input_ids: int32/int64 ``[B, T]`` on the model's device, ids in the vocabulary,
                ``T <= max_position_embeddings``.
            attention_mask: optional ``[B, T]`` (bool or 0/1 ints), left padding only.
            past_key_values: optional empty ``DynamicCache`` to prefill into (default: a new one).

        Returns:
            ``ScorerOutput(scores, cache)``: float32 ``[B, L, H_kv, T]`` scores (``-inf`` at
            padded positions) on the model's device — ``L`` counts the model's full-attention
            (compressible) layers only, in order (``proxykv.hf.architectures.layer_layout``);
            sliding-window layers are not scored — and the prefill's ``DynamicCache`` (every
            layer, sliding ones included).
        """
        check_supported_model(model)
        prompt = _Prompt(model, input_ids, attention_mask)
        cache = _new_cache(model, past_key_values)
        num_layers, num_kv_heads = compressible_shape(model)
        scores = torch.zeros(prompt.batch, num_layers, num_kv_heads,
                             prompt.length, dtype=torch.float32, device=prompt.device)
        for row, pad in enumerate(prompt.pad):
            scores[row, :, :, :pad] = float("-inf")
        with torch.no_grad():
            self._run(model, prompt, cache, scores)
        return ScorerOutput(scores, cache)

    @abstractmethod
    def _run(self, model, prompt: _Prompt, cache: DynamicCache, scores: torch.Tensor) -> None:
        """Prefill into ``cache`` and fill ``scores`` in place."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict:
        return {}


def _row_groups(prompt: _Prompt):
    """Rows that can be scored in one ``attention_scores`` call: all rows when no row is padded,
    else each row alone (its valid keys are a different slice)."""
    if not any(prompt.pad):
        return [slice(0, prompt.batch)]
    return [slice(row, row + 1) for row in range(prompt.batch)]


def _check_impl(impl) -> None:
    check_choice("impl", impl, IMPLS)


# ----------------------------------------------------------------------------------------------
# random (a baseline; also the prefill of policies that ignore the scores)


@register_scorer("random")
class RandomScorer(Scorer):
    """A plain prefill and scores drawn uniformly from ``[0, 1)`` with a fixed ``seed`` (the same
    prompt shape gives the same scores): the ``random`` baseline, and the scorer of policies that
    ignore scores (``sink_recent``) or of keeping everything, at the cost of the prefill alone."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = check_int("seed", seed)

    def _params(self) -> dict:
        return {"seed": self.seed}

    def _run(self, model, prompt, cache, scores):
        _forward(model, _cache_argument(model), prompt.ids, prompt.mask,
                 prompt.positions(prompt.mask, 0, prompt.length), cache)
        generator = torch.Generator().manual_seed(self.seed)
        drawn = torch.rand(scores.shape, generator=generator).to(scores.device)
        torch.where(scores.isneginf(), scores, drawn, out=scores)


# ----------------------------------------------------------------------------------------------
# window (SnapKV)


@register_scorer("window")
class WindowScorer(Scorer):
    """SnapKV's observation-window scores, computed during the prefill.

    Each layer's scores are ``attention_scores(q_window, k, reduce=reduce,
    group_reduce=group_reduce)``: the queries of the row's last ``min(window, valid length)``
    prompt positions against all its keys (causal inside the window). A key in the window is
    seen only by the window queries at or after it.

    Args:
        window: the number of observation queries, an int >= 1 (default 64, as kvpress).
        reduce: over the window's queries: ``"mean"`` (default), ``"sum"`` or ``"max"``.
        group_reduce: over the query heads of a GQA group: ``"mean"`` (default) or ``"max"``.
        impl: the ``attention_scores`` backend (``None``, ``"torch"``, ``"triton"``).
    """

    name = "window"

    def __init__(self, window: int = 64, reduce: str = "mean", group_reduce: str = "mean",
                 impl: str | None = None):
        self.window = check_int("window", window, minimum=1)
        check_choice("reduce", reduce, QUERY_REDUCTIONS)
        check_choice("group_reduce", group_reduce, GROUP_REDUCTIONS)
        _check_impl(impl)
        self.reduce, self.group_reduce, self.impl = reduce, group_reduce, impl

    def _params(self) -> dict:
        return {"window": self.window, "reduce": self.reduce,
                "group_reduce": self.group_reduce, "impl": self.impl}

    def _run(self, model, prompt, cache, scores):
        groups = _row_groups(prompt)
        length = prompt.length

        def score_layer(call: AttentionCall, layer_scores: torch.Tensor) -> None:
            for rows in groups:
                pad = prompt.pad[rows.start]
                window = min(self.window, length - pad)
                layer_scores[rows, :, pad:] = attention_scores(
                    call.query[rows, :, length - window:], call.key[rows, :, pad:length],
                    scale=call.scaling, reduce=self.reduce, group_reduce=self.group_reduce,
                    impl=self.impl, **kernel_features(call.softcap, call.sinks))

        with capture_attention(model, _layer_scorer(model, scores, score_layer)):
            _forward(model, _cache_argument(model), prompt.ids, prompt.mask,
                     prompt.positions(prompt.mask, 0, length), cache)


# ----------------------------------------------------------------------------------------------
# reconstruction (KVzip)


@register_scorer("reconstruction")
class ReconstructionScorer(Scorer):
    """KVzip's context-reconstruction scores.

    After the prefill (whose KV is kept), the model is fed the repeat prompt, then the context
    again in chunks of ``chunk_size`` tokens, each forward appending to the cache. For every layer
    and chunk, ``attention_scores(q_chunk, k, q_offset=..., reduce="max", group_reduce="max")``
    over the keys context + reconstruction tokens so far gives each context key the largest
    probability any query of the chunk (any head of its GQA group) puts on it; scores are the
    maximum over chunks. Afterwards the cache's layers are reset to the prefill's own tensors
    (bit-identical to a plain prefill; the reconstruction's KV is freed).

    In a left-padded batch, row ``b``'s reconstruction is ``repeat prompt + its own tokens``
    followed by as many padding slots as it has padding, so every row sees exactly what it would
    see alone (same positions, same chunk boundaries).

    Args:
        chunk_size: context tokens per reconstruction forward, an int >= 1 (default 512). Memory
            per forward grows with ``chunk_size × (2T + P)``; the scores do not depend on it.
        repeat_prompt: the prompt asking the model to repeat its context: text (needs
            ``tokenizer``), a sequence of token ids, or a 1-D int tensor of ids. Default: with a
            tokenizer ``DEFAULT_REPEAT_PROMPT_TEXT``; without one the model's ``bos_token_id``
            if it has one, else ``DEFAULT_REPEAT_PROMPT_IDS`` — so it runs on any model.
        tokenizer: a transformers tokenizer of the model (used only to encode a text prompt,
            without special tokens).
        impl: the ``attention_scores`` backend (``None``, ``"torch"``, ``"triton"``).

    The reconstruction extends positions to ``2T + P``; RoPE has no hard limit there.

    Cost: on the CPU, for a model running ``sdpa`` and an unpadded batch, each reconstruction
    forward's attention is computed by torch's CPU flash kernel, which also returns every query's
    log-sum-exp (``capture_attention(with_lse=True)``); the scores then need one GEMM of the
    queries against the context's keys only and a running max, no softmax pass of their own
    (about 3.4x a plain prefill at 2k tokens, ``perf/bench_pipeline.py``). Elsewhere (GPU, eager,
    soft-capping, sinks, padding) ``attention_scores`` computes its own log-sum-exp over the
    context and reconstruction keys, as the forward saw them.
    """

    name = "reconstruction"

    def __init__(self, chunk_size: int = 512, repeat_prompt: str | Sequence[int] | torch.Tensor |
                 None = None, tokenizer=None, impl: str | None = None):
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        _check_impl(impl)
        self.impl = impl
        self.tokenizer = tokenizer
        self.repeat_prompt = repeat_prompt
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be a callable transformers tokenizer, got "
                            f"{type(tokenizer).__name__}")
        if repeat_prompt is None and tokenizer is not None:
            repeat_prompt = DEFAULT_REPEAT_PROMPT_TEXT
        if isinstance(repeat_prompt, str):
            if tokenizer is None:
                raise ValueError("repeat_prompt is text, which needs tokenizer=; pass the model's "
                                 "tokenizer or give repeat_prompt as token ids")
            if not repeat_prompt:
                raise ValueError("repeat_prompt must not be empty")
            encoded = tokenizer(repeat_prompt, add_special_tokens=False)["input_ids"]
            self._ids: tuple[int, ...] | None = _as_id_tuple("the encoded repeat_prompt", encoded)
        elif repeat_prompt is None:
            self._ids = None  # the model's default, resolved in score()
        else:
            self._ids = _as_id_tuple("repeat_prompt", repeat_prompt)

    def _params(self) -> dict:
        return {"chunk_size": self.chunk_size, "repeat_prompt": self.repeat_prompt,
                "impl": self.impl}

    def repeat_prompt_ids(self, model) -> tuple[int, ...]:
        """The repeat prompt's token ids this scorer feeds ``model``."""
        if self._ids is not None:
            return self._ids
        bos = getattr(model.config, "bos_token_id", None)
        vocab = getattr(model.config, "vocab_size", None)
        if isinstance(bos, int) and not isinstance(bos, bool) and 0 <= bos < (vocab or math.inf):
            return (bos,)
        return DEFAULT_REPEAT_PROMPT_IDS

    def _run(self, model, prompt, cache, scores):
        cache_kw = _cache_argument(model)
        length, batch, device = prompt.length, prompt.batch, prompt.device
        repeat = torch.tensor(self.repeat_prompt_ids(model), dtype=torch.long, device=device)
        _check_ids_in_vocab("repeat_prompt", repeat, getattr(model.config, "vocab_size", None))
        n_prompt = repeat.numel()

        # 1. The prefill, untouched.
        _forward(model, cache_kw, prompt.ids, prompt.mask,
                 prompt.positions(prompt.mask, 0, length), cache)
        layers = cache.layers
        if not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
            raise ValueError(f"the reconstruction scorer needs a DynamicCache of plain "
                             f"DynamicLayer (and DynamicSlidingWindowLayer) layers, got "
                             f"{sorted({type(layer).__name__ for layer in layers})}")
        saved = [(layer.keys, layer.values, getattr(layer, "cumulative_length", None))
                 for layer in layers]

        # 2. Reconstruction sequence per row: repeat prompt + the row's tokens + its padding.
        recon_length = n_prompt + length
        recon_ids = torch.zeros(batch, recon_length, dtype=torch.long, device=device)
        recon_ids[:, :n_prompt] = repeat
        for row, pad in enumerate(prompt.pad):
            recon_ids[row, n_prompt:n_prompt + length - pad] = prompt.ids[row, pad:]
        if prompt.mask is None:
            full_mask = None
        else:
            recon_mask = torch.zeros(batch, recon_length, dtype=torch.long, device=device)
            for row, valid in enumerate(prompt.valid):
                recon_mask[row, :n_prompt + valid] = 1
            full_mask = torch.cat([prompt.mask, recon_mask], dim=1)
        groups = _row_groups(prompt)
        state = {"start": 0, "stop": 0}

        def score_layer(call: AttentionCall, layer_scores: torch.Tensor) -> None:
            start, stop = state["start"], state["stop"]  # reconstruction columns of this forward
            for rows in groups:
                pad = prompt.pad[rows.start]
                valid = length - pad
                end = min(stop, n_prompt + valid)  # the row's last real reconstruction column
                n_queries = end - start
                if n_queries <= 0:
                    continue
                queries = call.query[rows, :, :n_queries]
                features = kernel_features(call.softcap, call.sinks)
                if call.lse is not None and prompt.mask is None:
                    # The forward's own log-sum-exps (an unpadded batch): they cover every key
                    # the queries saw, so only the context's keys need logits, and every query
                    # sees all of them (no causal mask, no first pass).
                    chunk_scores = attention_scores(
                        queries, call.key[rows, :, :length], scale=call.scaling, causal=False,
                        reduce="max", group_reduce="max", lse=call.lse[rows, :, :n_queries],
                        impl=self.impl, **features)
                else:
                    keys = call.key[rows, :, pad:length + end]
                    chunk_scores = attention_scores(
                        queries, keys, scale=call.scaling, q_offset=keys.shape[2] - n_queries,
                        reduce="max", group_reduce="max", impl=self.impl,
                        **features)[..., :valid]
                target = layer_scores[rows, :, pad:]
                torch.maximum(target, chunk_scores, out=target)

        bounds = [(0, n_prompt)] + [
            (start, min(start + self.chunk_size, recon_length))
            for start in range(n_prompt, recon_length, self.chunk_size)]
        try:
            with capture_attention(model, _layer_scorer(model, scores, score_layer),
                                   with_lse=prompt.mask is None):
                for start, stop in bounds:
                    state["start"], state["stop"] = start, stop
                    mask = None if full_mask is None else full_mask[:, :length + stop]
                    positions = prompt.positions(full_mask, length + start, length + stop)
                    _forward(model, cache_kw, recon_ids[:, start:stop], mask, positions, cache)
        finally:
            # 3. Drop the reconstruction's KV: back to the prefill's own tensors (what
            #    cache.crop(length) gives, without keeping the longer storage alive; a sliding
            #    layer has dropped its oldest rows meanwhile and cannot be cropped back).
            for layer, (keys, values, cumulative_length) in zip(layers, saved):
                layer.keys, layer.values = keys, values
                if cumulative_length is not None:
                    layer.cumulative_length = cumulative_length


def _as_id_tuple(name: str, ids) -> tuple[int, ...]:
    if isinstance(ids, torch.Tensor):
        check_tensor(name, ids, ndim=1, layout="[P]", dtypes=INDEX_DTYPES)
        values = ids.tolist()
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        values = list(ids)
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must hold int token ids, got {type(value).__name__} "
                                f"{value!r} at index {index}")
    else:
        raise TypeError(f"{name} must be text, a sequence of token ids or a 1-D int tensor, got "
                        f"{type(ids).__name__}")
    if not values:
        raise ValueError(f"{name} must hold at least one token id")
    negative = [v for v in values if v < 0]
    if negative:
        raise ValueError(f"{name} must hold token ids >= 0, got {negative[0]}")
    return tuple(int(v) for v in values)
