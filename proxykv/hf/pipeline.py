"""``ProxyKV``: compress a transformers target's KV cache with scores from a small proxy (or from
the target itself, for the baselines), then generate from the compressed cache.

    pipe = ProxyKV(target, proxy, aligner="depth_interp", policy="topk", keep_ratio=0.3)
    cache = pipe.compress(context_ids)                  # a CompressedCache (.selection, .stats)
    answer = pipe.generate(question_ids, 32, cache=cache)   # cache is back to the context after

Stages of ``compress`` (each timed in ``cache.stats``):

1. **target prefill** — the target's plain prefill into a ``DynamicCache``; with ``proxy=None``
   the scorer runs on the target and this is its prefill (the baselines: SnapKV = ``window``,
   KVzip = ``reconstruction``).
2. **proxy prefill + scoring** — the scorer on the proxy, *concurrently* with stage 1: in a
   worker thread, on a second CUDA stream when both models share one GPU, on the proxy's own
   device when it has one (``proxy_device``).
3. **align** — the proxy's per-KV-head attention mass ``[B, Lp, Hp, T]`` -> log-scores ->
   the aligner -> target scores ``[B, Lt, Ht, T]``.
4. **select** — the policy (per row of a padded batch, on its own tokens, so each row is selected
   as if it ran alone; padded positions are never kept).
5. **compact** — the gather kernels copy the kept pairs out; the full cache is released.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proxykv._validation import check_float, check_int
from proxykv.align import Aligner, available_aligners, get_aligner, to_log_scores
from proxykv.align import load as load_aligner
from proxykv.hf.architectures import compressible_shape
from proxykv.hf.capture import check_supported_model
from proxykv.hf.compressed import (
    CompressedCache,
    disable_compressed_attention,
    enable_compressed_attention,
)
from proxykv.hf.scorers import (
    Scorer,
    _cache_argument,
    _forward,
    _Prompt,
    get_scorer,
    scorer_takes,
)
from proxykv.policies import Policy, get_policy
from proxykv.policies.budget import check_budget_choice
from proxykv.selection import Selection

STAGES = ("target_prefill", "proxy_scoring", "align", "select", "compact")
#: open ProxyKV pipelines per target model: the last one to close restores the stock attention
_open_pipelines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_open_lock = threading.Lock()
#: what ``proxykv align-train`` makes (said by every error about a missing aligner)
ALIGN_TRAIN_COMMAND = ("proxykv align-train --target TARGET_DIR --proxy PROXY_DIR --prompts "
                       "PROMPTS.txt --out ALIGNER_DIR")
#: generation-config fields ``ProxyKV.generate`` does not apply, with the value that is a no-op
_UNSUPPORTED_GENERATION = {
    "num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None, "min_length": 0,
    "min_new_tokens": None, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "force_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
    "encoder_repetition_penalty": 1.0, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "watermarking_config": None, "renormalize_logits": False,
    "remove_invalid_values": False, "dola_layers": None, "top_h": None,
}


class _PipelineState:
    """Whether a ``ProxyKV`` is open; shared with its caches (which must not keep the pipeline
    alive) and closed by ``close()`` or by the pipeline's finalizer."""

    def __init__(self, target):
        self.open = True
        self._target = weakref.ref(target)
        with _open_lock:
            _open_pipelines[target] = _open_pipelines.get(target, 0) + 1

    def close(self) -> None:
        """Switch the target back to its stock attention once no other open pipeline uses it."""
        if not self.open:
            return
        self.open = False
        target = self._target()
        if target is None:
            return
        with _open_lock:
            remaining = _open_pipelines.get(target, 1) - 1
            if remaining > 0:
                _open_pipelines[target] = remaining
                return
            _open_pipelines.pop(target, None)
        disable_compressed_attention(target)


@dataclass
class CompressionStats:
    """What ``ProxyKV.compress`` did.

    Attributes:
        seconds: wall time per stage (``STAGES``) and ``total``. ``target_prefill`` and
            ``proxy_scoring`` overlap when they run concurrently; with ``proxy=None``
            ``proxy_scoring`` is 0 and ``target_prefill`` includes the target's own scoring.
        concurrent: whether the proxy ran concurrently with the target's prefill.
        kv_bytes_before: bytes of the target's KV cache after its prefill (keys + values of
            every layer; a sliding-window layer holds at most its window).
        kv_bytes_after: bytes of the kept pairs of the compressed layers plus the untouched
            sliding-window layers (keys + values).
        cache_bytes: bytes the compressed cache holds: the above, and for a per-head cache
            its positions, metadata and the spare rows reserved for appended tokens.
        kept: int64 ``[B, Lt, Ht]`` positions kept per row, compressed layer and KV head (CPU).
        context_length: ``T``; valid_lengths: tokens per row.
        compressed_layers: the target's layers that were compressed (its full-attention ones);
            ``kept[:, i]`` is layer ``compressed_layers[i]``. The others slide and were kept.
    """

    seconds: dict[str, float]
    concurrent: bool
    kv_bytes_before: int
    kv_bytes_after: int
    cache_bytes: int
    kept: torch.Tensor
    context_length: int
    valid_lengths: list[int] = field(default_factory=list)
    compressed_layers: tuple[int, ...] = ()

    @property
    def kept_fraction(self) -> torch.Tensor:
        """float ``[B, Lt, Ht]``: kept positions over each row's tokens."""
        valid = torch.tensor(self.valid_lengths, dtype=torch.float64).view(-1, 1, 1)
        return self.kept.double() / valid

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"context {self.context_length} tokens, KV {self.kv_bytes_before / 2**20:.2f} MiB "
                 f"-> {self.kv_bytes_after / 2**20:.2f} MiB "
                 f"({100 * (1 - self.kv_bytes_after / max(1, self.kv_bytes_before)):.1f}% saved; "
                 f"layers compressed: {_ranges(self.compressed_layers)})"]
        timing = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.seconds.items())
        lines.append(f"{'concurrent' if self.concurrent else 'sequential'}: {timing}")
        return "\n".join(lines)


@dataclass
class ScoredPrompt:
    """A prompt after ``ProxyKV.score``: target-aligned ``scores`` float32 ``[B, Lt, Ht, T]``,
    the target's full prefill ``cache`` (a ``DynamicCache``), the stage ``seconds`` so far."""

    prompt: _Prompt
    scores: torch.Tensor
    cache: object
    seconds: dict[str, float]
    concurrent: bool

    def release(self) -> None:
        """Drop the full cache (its memory goes back once no compressed cache shares it)."""
        self.cache = None


class ProxyKV:
    """Cross-model proxy KV-cache compression over transformers models.

    Args:
        target: the model whose cache is compressed (a family of
            ``proxykv.hf.SUPPORTED_MODEL_TYPES``, ``sdpa`` or ``eager`` attention; its
            full-attention layers are compressed, its sliding-window layers kept as they are).
            Its attention is switched to the compressed attention
            (``enable_compressed_attention``), which equals the stock one for every other cache;
            ``close()`` switches it back.
        proxy: a smaller model of the same family (same vocabulary and tokenizer), or None to
            score with the target itself (the baselines).
        aligner: proxy -> target score aligner, required with a proxy: an ``Aligner``, the folder
            of a saved one (``proxykv align-train`` trains one for a model pair), or a registered
            name built for the two models' shapes (``"depth_interp"`` needs no training but ranks
            worse than random selection on the zoo: 0.16 accuracy at keep 0.3 against random's
            0.22 and the trained ``axial``'s 0.97, ``docs/eval``). A saved aligner records the
            model pair it was trained on; another pair of the same shapes gets a
            ``UserWarning``. Must be None without a proxy.
        policy: a ``Policy`` or a registered name (``get_policy(name)``), default ``"topk"``.
        scorer: a ``Scorer`` or a registered name (``get_scorer(name)``), default
            ``"reconstruction"`` (KVzip).
        keep_ratio, budget: the policy's budget (exactly one, unless the policy picks its own).
        proxy_device: where the proxy runs (the proxy is moved there); default: where it is.
        concurrent: run the proxy concurrently with the target's prefill. Default (None):
            concurrently unless the proxy runs modules of the target (e.g. the target itself),
            which run sequentially — two threads cannot drive the same modules; ``True`` with
            such a proxy raises ``ValueError``. ``early_layers_proxy`` shares the target's
            parameters but not its modules, so it runs concurrently.
        impl: backend of the kernels (``None``, ``"torch"``, ``"triton"``): the gather, the
            attention over the compressed cache and a scorer given by name.

    Raises:
        TypeError, ValueError: unsupported models, a proxy whose vocabulary or tokenizer differs,
            a proxy without an aligner, an aligner whose shapes do not match the models, a bad
            budget — before any change to the models. ``FileNotFoundError``: an aligner folder
            that does not exist.

    ``close()`` (or leaving a ``with`` block) switches the target back for good; a closed
    pipeline, and every cache it made, refuse further use. A pipeline dropped without ``close()``
    is closed by its finalizer.
    """

    def __init__(self, target, proxy=None, *, aligner=None, policy="topk",
                 scorer="reconstruction", keep_ratio: float | None = None,
                 budget: int | None = None, proxy_device=None, concurrent: bool | None = None,
                 reserve_steps: int = 256, impl: str | None = None):
        self._state = None  # a failed construction has nothing to close
        check_supported_model(target)
        self.target, self.proxy = target, proxy
        self.target_shape = compressible_shape(target)
        shares_modules = False
        if proxy is not None:
            check_supported_model(proxy)
            check_same_vocabulary(target, proxy)
            self.proxy_shape = compressible_shape(proxy)
            shares_modules = shares_modules_with(target, proxy)
        elif aligner is not None:
            raise ValueError("aligner needs a proxy: with proxy=None the target scores itself")
        if concurrent is not None and not isinstance(concurrent, bool):
            raise TypeError(f"concurrent must be a bool or None, got {type(concurrent).__name__}")
        if concurrent and shares_modules:
            raise ValueError("concurrent=True needs a proxy with modules of its own, but this "
                             "proxy shares modules with the target (two threads would drive the "
                             "same modules and capture hooks at once): pass concurrent=False or "
                             "leave it None")
        self.aligner = self._build_aligner(aligner) if proxy is not None else None
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        if not isinstance(self.policy, Policy):
            raise TypeError(f"policy must be a Policy or a registered name, got "
                            f"{type(policy).__name__}")
        if isinstance(scorer, str):
            scorer = get_scorer(scorer, **({"impl": impl} if scorer_takes(scorer, "impl")
                                           else {}))
        self.scorer = scorer
        if not isinstance(self.scorer, Scorer):
            raise TypeError(f"scorer must be a proxykv.hf.Scorer or a registered name, got "
                            f"{type(scorer).__name__}")
        self._check_budget(keep_ratio, budget)
        self.keep_ratio, self.budget = keep_ratio, budget
        self.concurrent = (proxy is not None and not shares_modules) if concurrent is None \
            else concurrent
        self.reserve_steps = check_int("reserve_steps", reserve_steps, minimum=0)
        self.impl = impl
        if proxy is not None and proxy_device is not None:
            proxy.to(torch.device(proxy_device))
        if self.aligner is not None and proxy is not None:
            self.aligner.to(_device(proxy))
        enable_compressed_attention(target)
        self._state = _PipelineState(target)
        self._finalizer = weakref.finalize(self, self._state.close)

    # ------------------------------------------------------------------ construction helpers
    def _build_aligner(self, aligner) -> Aligner:
        if aligner is None:
            raise ValueError(f"a proxy needs an aligner that maps its scores onto the target's "
                             f"layers and heads: train one for this pair with '"
                             f"{ALIGN_TRAIN_COMMAND}' and pass aligner='ALIGNER_DIR' (or "
                             f"aligner='depth_interp', which needs no training but can rank worse "
                             f"than random selection)")
        if isinstance(aligner, Path) or (isinstance(aligner, str)
                                         and aligner not in available_aligners()):
            if not Path(aligner).is_dir():
                if isinstance(aligner, Path) or any(sep in aligner for sep in ("/", "\\", ".")):
                    raise FileNotFoundError(f"aligner {str(aligner)!r}: no such folder")
                raise ValueError(f"aligner {aligner!r} is neither a registered aligner ("
                                 f"{', '.join(available_aligners())}) nor a folder")
            built = load_aligner(aligner)
            built.source = str(aligner)
        elif isinstance(aligner, str):
            built = get_aligner(aligner, self.proxy_shape, self.target_shape)
        elif isinstance(aligner, Aligner):
            built = aligner
        else:
            raise TypeError(f"aligner must be an Aligner, a registered name or a directory, got "
                            f"{type(aligner).__name__}")
        if built.proxy_shape != self.proxy_shape or built.target_shape != self.target_shape:
            raise ValueError(f"aligner maps (layers, KV heads) {built.proxy_shape} -> "
                             f"{built.target_shape}, but the proxy has {self.proxy_shape} and the "
                             f"target {self.target_shape}")
        warn_if_trained_for_another_pair(built, self.target, self.proxy)
        return built.eval()

    def _check_budget(self, keep_ratio, budget) -> None:
        check_budget_choice(keep_ratio, budget, needs_budget=self.policy.needs_budget,
                            policy_name=f"policy {self.policy!r}")

    def close(self) -> None:
        """Close the pipeline for good (idempotent): it and its caches refuse further use; the
        target goes back to its stock attention once no other open ``ProxyKV`` uses it."""
        if self._state is not None:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._state is None or not self._state.open

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this ProxyKV was closed; make a new one")

    def __enter__(self) -> ProxyKV:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        budget = f"keep_ratio={self.keep_ratio}" if self.keep_ratio is not None else \
            f"budget={self.budget}"
        proxy = f"{type(self.proxy).__name__}{self.proxy_shape}" if self.proxy else None
        return (f"ProxyKV(target={type(self.target).__name__}{self.target_shape}, proxy={proxy}, "
                f"aligner={getattr(self.aligner, 'name', None)}, policy={self.policy!r}, "
                f"scorer={self.scorer!r}, {budget})")

    # ------------------------------------------------------------------ compress
    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 keep_ratio: float | None = None, budget: int | None = None) -> CompressedCache:
        """Prefill ``input_ids`` ``[B, T]`` (left padding via ``attention_mask``), score, align,
        select and compact; returns the ``CompressedCache`` (with ``.selection`` and ``.stats``).
        ``keep_ratio``/``budget`` override the pipeline's for this call (``score`` +
        ``compact``).

        Raises ``ValueError`` for ids outside the vocabulary, a prompt longer than either model's
        ``max_position_embeddings``, a mask that is not left padding, a row too short for the
        budget or the policy (naming the row) — all before the prefill; nothing is modified then.
        """
        self._check_open()
        if keep_ratio is not None or budget is not None:
            self._check_budget(keep_ratio, budget)
        self._check_fits(_Prompt(self.target, input_ids, attention_mask).valid, keep_ratio,
                         budget)
        scored = self.score(input_ids, attention_mask)
        cache = self.compact(scored, keep_ratio=keep_ratio, budget=budget)
        scored.release()
        return cache

    def score(self, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> ScoredPrompt:
        """The first stages of ``compress``: the target's prefill, the scores (the proxy's,
        aligned to the target, or the target's own) — a ``ScoredPrompt`` to ``compact`` at one or
        several budgets. It holds the full cache until ``release()``."""
        self._check_open()
        prompt = _Prompt(self.target, input_ids, attention_mask)
        for row, length in enumerate(prompt.valid):
            try:
                self.policy.check_seq_len(length)
            except ValueError as error:
                raise ValueError(f"row {row} of input_ids ({length} tokens): {error}") from None
        if self.proxy is not None:
            proxy_device = _device(self.proxy)
            proxy_ids = input_ids.to(proxy_device)
            proxy_mask = None if attention_mask is None else attention_mask.to(proxy_device)
            _Prompt(self.proxy, proxy_ids, proxy_mask)  # validated before anything runs
        seconds = dict.fromkeys(STAGES, 0.0)
        start = time.perf_counter()
        if self.proxy is None:
            scores, full_cache = self.scorer.score(self.target, input_ids, attention_mask)
            check_no_nan(scores, f"the target ({_describe(self.target)}) scored by {self.scorer!r}")
            _synchronize(prompt.device)
            seconds["target_prefill"] = time.perf_counter() - start
            concurrent = False
        else:
            concurrent = self.concurrent
            full_cache, proxy_scores = self._prefill_and_score(
                prompt, input_ids, attention_mask, proxy_ids, proxy_mask, seconds)
            check_no_nan(proxy_scores,
                         f"the proxy ({_describe(self.proxy)}) scored by {self.scorer!r}")
            tick = time.perf_counter()
            with torch.no_grad():
                scores = self.aligner(to_log_scores(proxy_scores)).to(prompt.device)
            check_no_nan(scores, f"the aligner {self.aligner.name!r}")
            _synchronize(prompt.device)
            seconds["align"] = time.perf_counter() - tick
        seconds["total"] = time.perf_counter() - start
        return ScoredPrompt(prompt, scores, full_cache, seconds, concurrent)

    def compact(self, scored: ScoredPrompt, *, keep_ratio: float | None = None,
                budget: int | None = None) -> CompressedCache:
        """The last stages of ``compress``: select (at ``keep_ratio``/``budget``, default the
        pipeline's) and gather the kept pairs of ``scored``'s full cache (left intact)."""
        self._check_open()
        if keep_ratio is None and budget is None:
            keep_ratio, budget = self.keep_ratio, self.budget
        else:
            self._check_budget(keep_ratio, budget)
        if scored.cache is None:
            raise ValueError("this ScoredPrompt was released; score the prompt again")
        prompt, seconds = scored.prompt, dict(scored.seconds)
        self._check_fits(prompt.valid, keep_ratio, budget)
        start = time.perf_counter()
        selection = self.select(scored.scores, prompt.pad, keep_ratio=keep_ratio, budget=budget)
        _synchronize(prompt.device)
        seconds["select"] = time.perf_counter() - start
        tick = time.perf_counter()
        layers = scored.cache.layers
        bytes_before = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
        cache = CompressedCache.from_selection(scored.cache, selection, valid_lengths=prompt.valid,
                                               reserve_steps=self.reserve_steps, impl=self.impl)
        compressed = cache.compressed_layers
        bytes_per_row = 2 * layers[compressed[0]].keys.shape[-1] * \
            layers[compressed[0]].keys.element_size()
        bytes_sliding = sum(layer.keys.nbytes + layer.values.nbytes
                            for layer in cache.sliding_layers)
        cache.bind(self.target, self._state, prompt.ids)
        _synchronize(prompt.device)
        seconds["compact"] = time.perf_counter() - tick
        seconds["total"] += time.perf_counter() - start
        kept = selection.counts().cpu()
        cache.stats = CompressionStats(seconds, scored.concurrent, bytes_before,
                                       int(kept.sum()) * bytes_per_row + bytes_sliding,
                                       cache.nbytes, kept, prompt.length, prompt.valid, compressed)
        return cache

    def _check_fits(self, valid_lengths: list[int], keep_ratio, budget) -> None:
        """Every row's tokens can take the budget and the policy (checked before a prefill)."""
        if keep_ratio is None and budget is None:
            keep_ratio, budget = self.keep_ratio, self.budget
        for row, length in enumerate(valid_lengths):
            try:
                self.policy.check_applicable(length, keep_ratio=keep_ratio, budget=budget)
            except ValueError as error:
                raise ValueError(f"row {row} of input_ids ({length} tokens): {error}") from None

    def _prefill_and_score(self, prompt, input_ids, attention_mask, proxy_ids, proxy_mask,
                           seconds):
        """Target prefill and proxy scoring, concurrently when asked; returns (cache, scores)."""
        result: dict = {}

        def score_on_proxy():
            try:
                tick = time.perf_counter()
                device = proxy_ids.device
                stream = None
                if device.type == "cuda" and self.concurrent:
                    stream = torch.cuda.Stream(device=device)
                    stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    scores, _ = self.scorer.score(self.proxy, proxy_ids, proxy_mask)
                _synchronize(device, stream)
                result["scores"] = scores
                seconds["proxy_scoring"] = time.perf_counter() - tick
            except BaseException as error:  # re-raised in the caller's thread
                result["error"] = error

        def prefill_target():
            tick = time.perf_counter()
            cache = prefill(self.target, prompt)
            _synchronize(prompt.device, current_stream_only=True)
            seconds["target_prefill"] = time.perf_counter() - tick
            return cache

        if self.concurrent:
            worker = threading.Thread(target=score_on_proxy, name="proxykv-proxy", daemon=True)
            worker.start()
            try:
                cache = prefill_target()
            finally:
                worker.join()
        else:
            cache = prefill_target()
            score_on_proxy()
        if "error" in result:
            raise result["error"]
        return cache, result["scores"]

    def select(self, scores: torch.Tensor, pad: list[int] | None = None, *,
               keep_ratio: float | None = None, budget: int | None = None) -> Selection:
        """The policy's selection on target scores ``[B, Lt, Ht, T]`` at ``keep_ratio``/``budget``
        (default the pipeline's); rows with left padding ``pad[b]`` are selected on their own
        tokens (as if each ran alone)."""
        self._check_open()
        if keep_ratio is None and budget is None:
            keep_ratio, budget = self.keep_ratio, self.budget
        budget = {"keep_ratio": keep_ratio, "budget": budget}
        if not pad or not any(pad):
            return self.policy.select(scores, **budget)
        batch, layers, heads, length = scores.shape
        mask = torch.zeros(batch, layers, heads, length, dtype=torch.bool, device=scores.device)
        for row, rows_pad in enumerate(pad):
            row_selection = self.policy.select(scores[row:row + 1, ..., rows_pad:], **budget)
            mask[row:row + 1, ..., rows_pad:] = row_selection.to_mask()
        return Selection.from_mask(mask)

    # ------------------------------------------------------------------ generate
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
                 cache: CompressedCache | None = None,
                 attention_mask: torch.Tensor | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids ``[B, n + new]``: ``input_ids`` followed by up to ``max_new_tokens``
        generated ones, as ``model.generate`` would choose them: ``do_sample``, ``temperature``,
        ``top_k`` (0: off), ``top_p``, ``repetition_penalty`` (over the context, the question and
        the answer so far), ``eos_token_id`` and ``pad_token_id`` default to the target's
        ``generation_config``. Rows that reached an eos token are filled with ``pad_token_id``;
        generation stops when every row has. A ``generation_config`` asking for anything else
        (beam search, ``no_repeat_ngram_size``, ``min_new_tokens``, ...) raises ``ValueError``
        naming it: this method does not apply it.

        With ``cache`` (a ``CompressedCache`` from this pipeline's ``compress``), ``input_ids``
        ``[B, n]`` continue the compressed context (a question, no padding): they attend to the
        kept pairs through ``ragged_attention``, then decoding continues; afterwards the cache is
        back to its compressed state (also when generation raised), so it can answer another
        question. Without ``cache``, the prompt but its last token is compressed, and the last
        token starts the generation over it.
        """
        self._check_open()
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        choose, penalty = self._decoding(do_sample, temperature, top_k, top_p,
                                         repetition_penalty, generator)
        if cache is None:
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
            if input_ids.dim() != 2 or input_ids.shape[1] < 2:
                raise ValueError(f"input_ids must be [B, T] with T >= 2 without a cache (the "
                                 f"context is all but the last token), got "
                                 f"{tuple(input_ids.shape)}")
            context_mask = None if attention_mask is None else attention_mask[:, :-1]
            cache = self.compress(input_ids[:, :-1], context_mask)
            new = self.generate(input_ids[:, -1:], max_new_tokens, cache=cache,
                                do_sample=do_sample, temperature=temperature, top_k=top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                generator=generator)
            return torch.cat([input_ids, new[:, 1:]], dim=1)
        question = self._continuation(input_ids, cache, attention_mask, max_new_tokens - 1,
                                      f"max_new_tokens={max_new_tokens}")
        if penalty is not None and (cache.context_ids is None or cache.appended):
            raise ValueError("repetition_penalty needs the ids of everything the cache holds: a "
                             "cache fresh from compress (restore() it first)")
        config = self.target.generation_config
        eos = _id_set("eos_token_id", eos_token_id if eos_token_id is not None
                      else config.eos_token_id)
        pad_id = pad_token_id if pad_token_id is not None else \
            (config.pad_token_id if config.pad_token_id is not None
             else (min(eos) if eos else 0))
        device = question.device
        eos_ids = torch.tensor(sorted(eos), device=device)
        start = torch.tensor(cache.valid_lengths, device=device).unsqueeze(1) + cache.appended
        history = None if penalty is None else \
            torch.cat([cache.context_ids.to(device), question.ids], dim=1)
        cache_kw = _cache_argument(self.target)
        tokens, generated = question.ids, []
        finished = torch.zeros(question.batch, dtype=torch.bool, device=device)
        try:
            with torch.no_grad():
                for _ in range(max_new_tokens):
                    positions = start + torch.arange(tokens.shape[1], device=device)
                    logits = self.target(input_ids=tokens, position_ids=positions,
                                         use_cache=True, logits_to_keep=1,
                                         **{cache_kw: cache}).logits[:, -1].float()
                    if penalty is not None:
                        logits = penalty(history, logits)
                    next_token = choose(logits)
                    next_token = torch.where(finished, torch.full_like(next_token, pad_id),
                                             next_token)
                    generated.append(next_token)
                    if history is not None:
                        history = torch.cat([history, next_token.unsqueeze(1)], dim=1)
                    if eos:
                        finished |= torch.isin(next_token, eos_ids)
                        if bool(finished.all()):
                            break
                    start = start + tokens.shape[1]
                    tokens = next_token.unsqueeze(1)
        finally:
            cache.restore()
        return torch.cat([question.ids.to(input_ids.dtype),
                          torch.stack(generated, dim=1).to(input_ids.dtype)], dim=1)

    def logits(self, input_ids: torch.Tensor, *, cache: CompressedCache,
               last: int | None = None) -> torch.Tensor:
        """The target's logits, float32 ``[B, n, vocab]``, at every position of ``input_ids``
        ``[B, n]`` continuing ``cache`` (teacher forcing: e.g. the log-likelihood of a known
        continuation over the compressed context), or at the ``last`` positions only
        (``[B, last]``, ``1 <= last <= n``: the output head's work is per position). The cache
        is back to its compressed state afterwards, as after ``generate``. Raises as
        ``generate`` does for a cache or ids that cannot continue it."""
        self._check_open()
        tokens = self._continuation(input_ids, cache, None, 0, "")
        if last is not None:
            check_int("last", last, minimum=1, maximum=tokens.length)
        start = torch.tensor(cache.valid_lengths, device=tokens.device).unsqueeze(1) + \
            cache.appended
        try:
            with torch.no_grad():
                out = self.target(input_ids=tokens.ids,
                                  position_ids=start + torch.arange(tokens.length,
                                                                    device=tokens.device),
                                  use_cache=True, logits_to_keep=last or 0,
                                  **{_cache_argument(self.target): cache})
        finally:
            cache.restore()
        return out.logits.float()

    def _continuation(self, input_ids, cache, attention_mask, extra_positions: int,
                      extra: str) -> _Prompt:
        """``input_ids`` validated as the continuation of ``cache`` (a ``CompressedCache`` of this
        pipeline's target, usable, same batch, no mask) with ``extra_positions`` more to come
        (named ``extra`` in the error) within the target's positions."""
        if not isinstance(cache, CompressedCache):
            raise TypeError(f"cache must be a CompressedCache from ProxyKV.compress, got "
                            f"{type(cache).__name__}")
        if cache.owner is not self.target:
            raise ValueError("cache was not made by this pipeline's target model: compress the "
                             "context with this ProxyKV")
        cache.check_usable()
        if attention_mask is not None:
            raise ValueError("a question continuing a compressed cache takes no attention_mask "
                             "(it cannot be padded)")
        question = _Prompt(self.target, input_ids, None)
        if question.batch != cache.batch_size:
            raise ValueError(f"input_ids has batch size {question.batch}, the compressed cache "
                             f"{cache.batch_size}")
        max_positions = getattr(self.target.config, "max_position_embeddings", None)
        if max_positions is not None and \
                max(cache.valid_lengths) + cache.appended + question.length + extra_positions \
                > max_positions:
            raise ValueError(f"the context ({max(cache.valid_lengths)} tokens), the input "
                             f"({question.length})" + (f" and {extra}" if extra else "") +
                             f" pass the target's max_position_embeddings = {max_positions}")
        return question

    def _decoding(self, do_sample, temperature, top_k, top_p, repetition_penalty, generator):
        """``(choose(logits) -> ids, penalty(ids, logits) -> logits or None)`` from the arguments,
        each None falling back to the target's ``generation_config`` (refusing what it asks for
        that ``generate`` does not apply)."""
        config = self.target.generation_config
        ignored = [f"{name}={getattr(config, name)!r}"
                   for name, neutral in _UNSUPPORTED_GENERATION.items()
                   if getattr(config, name, None) not in (None, neutral)]
        if ignored:
            raise ValueError(f"the target's generation_config asks for {', '.join(ignored)}, "
                             f"which ProxyKV.generate does not apply; set them to their defaults "
                             f"(model.generation_config) to decode over a compressed cache")

        def setting(value, name, default):
            if value is not None:
                return value
            configured = getattr(config, name, None)
            return default if configured is None else configured

        do_sample = setting(do_sample, "do_sample", False)
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
        repetition_penalty = check_float("repetition_penalty",
                                         setting(repetition_penalty, "repetition_penalty", 1.0),
                                         minimum=0.0, exclusive_minimum=True)
        penalty = None
        if repetition_penalty != 1.0:
            from transformers.generation import RepetitionPenaltyLogitsProcessor

            penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty)
        choose = _token_chooser(do_sample, setting(temperature, "temperature", 1.0),
                                setting(top_k, "top_k", 50), setting(top_p, "top_p", 1.0),
                                generator)
        return choose, penalty


# ---------------------------------------------------------------------------------------------
# helpers


def prefill(model, prompt: _Prompt):
    """The plain prefill of a validated prompt into a new ``DynamicCache`` (positions from the
    mask's running sum, as ``generate`` numbers them)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        _forward(model, _cache_argument(model), prompt.ids, prompt.mask,
                 prompt.positions(prompt.mask, 0, prompt.length), cache)
    return cache


def shares_modules_with(target, proxy) -> bool:
    """Whether ``proxy`` runs a module of ``target`` (e.g. is the target itself). Shared
    parameters alone (``early_layers_proxy``) do not count: inference only reads them, and a
    module's attention switch and capture stay its own."""
    modules = {id(module) for module in target.modules()}
    return any(id(module) in modules for module in proxy.modules())


def warn_if_trained_for_another_pair(aligner: Aligner, target, proxy) -> None:
    """A ``UserWarning`` when the saved aligner records another model pair than (``target``,
    ``proxy``): same shapes (checked before), other weights — its mapping may not transfer."""
    metadata = getattr(aligner, "metadata", None) or {}
    recorded = {role: metadata.get(f"{role}_fingerprint") for role in ("target", "proxy")}
    if not any(recorded.values()):
        return
    from proxykv.hf.identity import model_fingerprint

    source = getattr(aligner, "source", "the aligner")
    for role, model in (("target", target), ("proxy", proxy)):
        now = model_fingerprint(model)
        if recorded[role] is not None and recorded[role] != now:
            warnings.warn(f"{source} was trained for another {role} model than this one "
                          f"({_describe(model)}; fingerprint {recorded[role][:12]} recorded, "
                          f"{now[:12]} now): its mapping may not fit this pair; retrain with '"
                          f"{ALIGN_TRAIN_COMMAND}'", UserWarning, stacklevel=4)


def check_no_nan(scores: torch.Tensor, producer: str) -> None:
    """``ValueError`` naming ``producer`` and the first NaN of ``scores`` ``[B, L, H, T]``."""
    nan = torch.isnan(scores)
    if bool(nan.any()):
        row, layer, head, position = nan.nonzero()[0].tolist()
        raise ValueError(f"{producer} produced NaN scores (first at row {row}, layer {layer}, KV "
                         f"head {head}, position {position}): its activations are NaN on this "
                         f"prompt (check its weights and dtype)")


def _describe(model) -> str:
    return f"{type(model).__name__}, {model.config.num_hidden_layers} layers"


def check_same_vocabulary(target, proxy) -> None:
    """The proxy's token ids must mean what the target's do: same vocabulary size, special tokens
    and (when both were loaded from local folders holding one) the same tokenizer."""
    fields = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
    for name in fields:
        t_value = getattr(target.config, name, None)
        p_value = getattr(proxy.config, name, None)
        if t_value != p_value:
            raise ValueError(f"the proxy's {name} is {p_value!r} but the target's is {t_value!r}: "
                             f"a proxy must share the target's vocabulary and tokenizer (token "
                             f"positions would not line up)")
    tokenizers = []
    for model in (target, proxy):
        folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
        path = folder / "tokenizer.json"
        tokenizers.append(path if folder.is_dir() and path.is_file() else None)
    if all(tokenizers):
        vocabularies = [json.loads(p.read_text()).get("model", {}).get("vocab") for p in tokenizers]
        if vocabularies[0] != vocabularies[1]:
            raise ValueError(f"the proxy's tokenizer ({tokenizers[1]}) differs from the target's "
                             f"({tokenizers[0]}): token positions would not line up")


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _synchronize(device: torch.device, stream=None, current_stream_only: bool = False) -> None:
    """Wait for ``device``'s work: only ``stream``'s, or only the current stream's, when two
    streams run concurrently (so each stage's time is its own)."""
    if device.type != "cuda":
        return
    if stream is not None:
        stream.synchronize()
    elif current_stream_only:
        torch.cuda.current_stream(device).synchronize()
    else:
        torch.cuda.synchronize(device)


def _ranges(indices) -> str:
    """``0-2, 5, 11`` for ``(0, 1, 2, 5, 11)``."""
    spans: list[list[int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "none"


def _id_set(name: str, value) -> set[int]:
    if value is None:
        return set()
    values = [value] if isinstance(value, int) else list(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int or a list of ints, got {value!r}")
    return set(values)


def _token_chooser(do_sample: bool, temperature, top_k, top_p, generator):
    if not do_sample:
        return lambda logits: logits.argmax(dim=-1)
    temperature = check_float("temperature", temperature, minimum=0.0, exclusive_minimum=True)
    top_k = check_int("top_k", top_k, minimum=0) or None  # 0: off, as in transformers
    top_p = check_float("top_p", top_p, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    if top_p == 1.0:
        top_p = None

    def choose(logits: torch.Tensor) -> torch.Tensor:
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            ordered, order = logits.sort(dim=-1, descending=True)
            mass = ordered.softmax(-1).cumsum(-1)
            drop = mass - ordered.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return choose


__all__ = ["ALIGN_TRAIN_COMMAND", "STAGES", "CompressionStats", "ProxyKV", "ScoredPrompt",
           "check_no_nan", "check_same_vocabulary", "prefill", "shares_modules_with"]
