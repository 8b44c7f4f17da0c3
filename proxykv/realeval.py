"""``proxykv eval --target gemma3-270m``: the methods of ``proxykv eval`` on a real pretrained
model over real text (:mod:`proxykv.realtext`'s tasks), at several context lengths.

Setting: KVzip's query-agnostic one, as on the zoo (:mod:`proxykv.zoo.evaluate`): each context
is compressed before any question is seen, each question is then asked on its own over the
compressed cache. Every method of :data:`proxykv.zoo.evaluate.METHODS` runs; the proxy is the
target's first layers (``early_layers_proxy``) unless one is given.

What one context costs, shared where the result is the same (so every method sees the same
prefill): ``full``, ``random`` and ``sink_recent`` score with the same seeded random scorer after
one plain prefill, which the ProxyKV methods reuse as the target's prefill; the proxy's
reconstruction scores are computed once and mapped by each aligner; ``snapkv`` and ``kvzip`` run
their own scoring prefill.

Records (a JSON list), one per (length, method, keep ratio, task), with ``task`` one of
:data:`proxykv.realtext.TASKS` or ``overall`` (the needle tasks' questions pooled):
``accuracy`` (the share of questions answered; for ``continuation`` the top-1 agreement of the
text's next tokens with the full cache's predictions), ``questions``, ``nll`` (continuation: mean
negative log-likelihood per token of the real text), ``recall_vs_kvzip`` (the share of KVzip's
kept positions this method keeps too) and ``recall_vs_kvzip_per_layer`` (per compressed layer), ``prefill_seconds``
(the target's plain prefill), ``scoring_seconds`` (ids to scores: the scoring prefill and
scoring, or for ProxyKV the target's prefill + the proxy's scoring + alignment, one after the
other), ``proxy_seconds`` (ProxyKV: the proxy's scoring and alignment, the part that can run
beside the target's prefill), ``ttft_seconds`` (scoring, selection, compaction and the first
question's first token), ``decode_tokens_per_s``, ``kv_kept_bytes``, ``peak_bytes`` (weights and
KV at their largest, by count on CPU), ``length``, ``n``, ``seed``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from proxykv import realtext as R
from proxykv.zoo.evaluate import (
    DECODE_TOKENS,
    GREEDY,
    KEEP_RATIOS,
    METHODS,
    TRAINED_ALIGNERS,
    _model_bytes,
    build_pipeline,
    kv_bytes,
    markdown_table,
    plot_panel,
    summary,
)

LENGTHS = (1024, 2048, 4096, 8192)
#: contexts per length by default: fewer where each costs more (CPU minutes, see docs/eval-real)
DEFAULT_N = {1024: 10, 2048: 6, 4096: 4, 8192: 3}


@dataclass
class RealEvalConfig:
    lengths: tuple[int, ...] = LENGTHS
    n: int | None = None            # contexts per length; None: DEFAULT_N (16 beyond it)
    seed: int = 0
    keep_ratios: tuple[float, ...] = KEEP_RATIOS
    methods: tuple[str, ...] = tuple(METHODS)
    impl: str | None = None

    def contexts(self, length: int) -> int:
        return self.n if self.n is not None else DEFAULT_N.get(length, 16)


def _tokens(tokenizer, text: str, device) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)


class _Context:
    """One sample's scored prompts, each computed once and shared by the methods it serves."""

    def __init__(self, pipes: dict, proxy, ids: torch.Tensor):
        self.pipes, self.proxy, self.ids = pipes, proxy, ids
        self.scored: dict = {}
        self._base = None
        self._proxy_scores = None
        self._aligned: dict = {}

    def base(self):
        """The plain prefill with the random scorer's scores (full, random, sink_recent: one
        seeded scorer), through ``full``'s pipeline."""
        if self._base is None:
            self._base = self.pipes["full"].score(self.ids)
        return self._base

    def scored_for(self, name: str):
        from proxykv.align import to_log_scores
        from proxykv.hf.pipeline import STAGES, ScoredPrompt

        method, pipe = METHODS[name], self.pipes[name]
        if method.scorer == "random":
            return self.base()
        if method.aligner is None:
            if name not in self.scored:
                self.scored[name] = pipe.score(self.ids)
            return self.scored[name]
        base = self.base()
        if self._proxy_scores is None:
            start = time.perf_counter()
            self._proxy_scores = (pipe.scorer.score(self.proxy, self.ids)[0],
                                  time.perf_counter() - start)
        raw, proxy_seconds = self._proxy_scores
        if method.aligner not in self._aligned:
            start = time.perf_counter()
            with torch.no_grad():
                aligned = pipe.aligner(to_log_scores(raw)).to(self.ids.device)
            self._aligned[method.aligner] = (aligned, time.perf_counter() - start)
        aligned, align_seconds = self._aligned[method.aligner]
        seconds = dict.fromkeys(STAGES, 0.0)
        seconds.update(target_prefill=base.seconds["total"], proxy_scoring=proxy_seconds,
                       align=align_seconds)
        seconds["total"] = base.seconds["total"] + proxy_seconds + align_seconds
        return ScoredPrompt(base.prompt, aligned, base.cache, seconds, concurrent=False)

    def release(self) -> None:
        for scored in [self._base, *self.scored.values()]:
            if scored is not None:
                scored.release()


def _continuation(pipe, cache, ids: torch.Tensor):
    """(log-probabilities of the text's tokens ``ids[1:]``, the predicted tokens) over ``cache``."""
    logits = pipe.logits(ids, cache=cache)[0, :-1]
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(1, ids[0, 1:, None]).squeeze(1), logits.argmax(dim=-1)


def run_realtext_eval(target, proxy, tokenizer, aligners: dict | None = None,
                      config: RealEvalConfig | None = None, progress: bool = True) -> list[dict]:
    """Evaluate every method of ``config`` at every length (see the module docstring); returns
    the records."""
    from tqdm.auto import tqdm

    config = config or RealEvalConfig()
    aligners = aligners or {}
    device = target.get_input_embeddings().weight.device
    methods = list(config.methods)
    if "kvzip" in methods:  # first: the others' recall is measured against its selections
        methods.remove("kvzip")
        methods.insert(0, "kvzip")
    for name in methods:
        method = METHODS[name]
        if method.aligner is not None and proxy is None:
            raise ValueError(f"method {name!r} needs a proxy")
        if method.aligner in TRAINED_ALIGNERS and method.aligner not in aligners:
            raise ValueError(f"method {name!r} needs a trained {method.aligner!r} aligner")
    samples = {length: R.eval_samples(tokenizer, config.contexts(length), length, config.seed)
               for length in config.lengths}
    pipes = {name: build_pipeline(name, target, proxy, aligners, tokenizer,
                                  config.keep_ratios[0], config.impl) for name in methods}
    if "full" not in pipes:  # the shared prefill and the continuation's reference
        pipes["full"] = build_pipeline("full", target, proxy, aligners, tokenizer, 1.0,
                                       config.impl)
    weights = _model_bytes(target)
    _warm_up(pipes, proxy, tokenizer, device)
    records = []
    bar = tqdm(total=sum(len(s) for s in samples.values()), desc="eval", disable=not progress,
               file=sys.stderr)
    try:
        for length, length_samples in samples.items():
            found: dict = {}
            for index, sample in enumerate(length_samples):
                ids = torch.tensor([sample.context_ids], device=device)
                follow = torch.tensor([sample.continuation_ids], device=device)
                context = _Context(pipes, proxy, ids)
                bar.set_postfix_str(f"{length} tokens, full prefill", refresh=True)
                base = context.base()
                reference_cache = pipes["full"].compact(base, keep_ratio=1.0)
                reference, predicted = _continuation(pipes["full"], reference_cache, follow)
                kvzip_masks = {}
                for name in methods:
                    bar.set_postfix_str(f"{length} tokens, {name}", refresh=True)
                    method, pipe = METHODS[name], pipes[name]
                    scored = context.scored_for(name)
                    ratios = (1.0,) if method.keep_everything else config.keep_ratios
                    for ratio in ratios:
                        cache = pipe.compact(scored, keep_ratio=ratio)
                        into = found.setdefault((name, ratio), _new_measures())
                        mask = cache.selection.to_mask()
                        if name == "kvzip":
                            kvzip_masks[ratio] = mask
                        if ratio in kvzip_masks and name != "kvzip":
                            reference_mask = kvzip_masks[ratio]
                            into["recall"].append(float((mask & reference_mask).sum() /
                                                        reference_mask.sum().clamp_min(1)))
                            per_layer = (mask & reference_mask).sum((0, 2, 3)) / \
                                reference_mask.sum((0, 2, 3)).clamp_min(1)
                            into["recall_per_layer"].append(per_layer.tolist())
                        first_token = _ask_all(pipe, cache, sample, tokenizer, device, into,
                                               time_decode=index == 0)
                        into["ttft"].append(cache.stats.seconds["total"] + first_token)
                        log_probs, tokens = (reference, predicted) if name == "full" else \
                            _continuation(pipe, cache, follow)
                        into["continuation"] += (tokens == predicted).tolist()
                        into["nll"].append(float(-log_probs.mean()))
                        into["nll_full"].append(float(-reference.mean()))
                        into["prefill"].append(base.seconds["total"])
                        into["scoring"].append(scored.seconds["total"])
                        into["proxy"] += [scored.seconds["proxy_scoring"] +
                                          scored.seconds["align"]] if method.aligner else []
                        into["kept"].append(cache.stats.kv_bytes_after)
                        into["peak"].append(_peak_bytes(target, proxy, method, length, weights))
                context.release()
                bar.update(1)
            for (name, ratio), into in found.items():
                records += _records(name, ratio, length, into, config)
    finally:
        bar.close()
        for pipe in pipes.values():
            pipe.close()
    return records


def _warm_up(pipes: dict, proxy, tokenizer, device) -> None:
    """One short context through every method's stages, untimed: a first call pays one-off
    costs (allocator growth, lazy initialisation) that the first timed context would carry."""
    sample = R.eval_samples(tokenizer, 1, 256, seed=-1)[0]
    context = _Context(pipes, proxy, torch.tensor([sample.context_ids], device=device))
    question = _tokens(tokenizer, sample.questions[0].prompt, device)
    for name, pipe in pipes.items():
        cache = pipe.compact(context.scored_for(name), keep_ratio=1.0 if
                             METHODS[name].keep_everything else 0.5)
        pipe.generate(question, 2, cache=cache, **GREEDY)
    context.release()


_MEASURES = ("recall", "recall_per_layer", "continuation", "nll", "nll_full", "prefill",
             "scoring", "proxy", "ttft", "decode", "kept", "peak")


def _new_measures() -> dict:
    return {"correct": {task: [] for task in R.NEEDLE_TASKS}, **{k: [] for k in _MEASURES}}


def _ask_all(pipe, cache, sample, tokenizer, device, into: dict, time_decode: bool) -> float:
    """Ask each question of ``sample`` over ``cache`` (``realtext.greedy_starts_with``: one
    teacher-forced forward per hop), with ``time_decode`` also timing decoding; returns the
    seconds to the first question's first token."""
    first = _tokens(tokenizer, sample.questions[0].prompt, device)
    start = time.perf_counter()
    pipe.generate(first, 1, cache=cache, **GREEDY)
    one = time.perf_counter() - start
    if time_decode:
        start = time.perf_counter()
        pipe.generate(first, DECODE_TOKENS + 1, cache=cache, eos_token_id=[], **GREEDY)
        into["decode"].append(DECODE_TOKENS / max(1e-9, time.perf_counter() - start - one))

    def logits_of(ids: torch.Tensor, last: int) -> torch.Tensor:
        return pipe.logits(ids.to(device), cache=cache, last=last)

    def answers(prompt: str, word: str) -> bool:
        return R.greedy_starts_with(logits_of, tokenizer, prompt, word)

    for question in sample.questions:
        into["correct"][question.task].append(R.ask(question, answers))
    return one


def _peak_bytes(target, proxy, method, rows: int, weights: int) -> int:
    """Weights and KV at their largest while one context is compressed, by count (CPU): the
    reconstruction scorer holds the context twice and its repeat prompt."""
    scored_rows = 2 * rows + 32 if method.scorer == "reconstruction" else rows
    if method.aligner is None:
        return weights + kv_bytes(target, scored_rows)
    # the early-layers proxy shares the target's weights
    shared = {t.data_ptr() for t in target.parameters()}
    proxy_weights = sum(p.numel() * p.element_size() for p in proxy.parameters()
                        if p.data_ptr() not in shared)
    return weights + kv_bytes(target, rows) + proxy_weights + kv_bytes(proxy, scored_rows)


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def _records(name: str, ratio: float, length: int, into: dict, config: RealEvalConfig) -> list:
    common = {"method": name, "keep_ratio": ratio, "length": length,
              "n": config.contexts(length), "seed": config.seed,
              "recall_vs_kvzip": _mean(into["recall"]),
              "recall_vs_kvzip_per_layer": [_mean(layer) for layer in zip(*into["recall_per_layer"])]
              or None,
              "prefill_seconds": _mean(into["prefill"]), "scoring_seconds": _mean(into["scoring"]),
              "proxy_seconds": _mean(into["proxy"]), "ttft_seconds": _mean(into["ttft"]),
              "decode_tokens_per_s": _mean(into["decode"]), "kv_kept_bytes": _mean(into["kept"]),
              "peak_bytes": max(into["peak"])}
    out = []
    pooled = []
    for task, answers in into["correct"].items():
        pooled += answers
        out.append({**common, "task": task, "accuracy": _mean(answers) or 0.0,
                    "questions": len(answers), "nll": None})
    out.append({**common, "task": "continuation", "accuracy": _mean(into["continuation"]),
                "questions": len(into["continuation"]), "nll": _mean(into["nll"]),
                "nll_full": _mean(into["nll_full"])})
    out.append({**common, "task": "overall", "accuracy": _mean(pooled) or 0.0,
                "questions": len(pooled), "nll": None})
    return out


# ---------------------------------------------------------------------------------------------
# reports


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (``successes`` of ``total``)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def headline(records: list[dict], ratio: float = 0.3) -> dict:
    """Per length: the zoo's summary (ProxyKV's accuracy over KVzip's and scoring time over
    KVzip's) plus each method's scoring time over the plain prefill and the proxy's share."""
    out = {}
    for length in sorted({r["length"] for r in records}):
        rows = [r for r in records if r["length"] == length]
        entry = summary(rows, ratio)
        entry.pop("snapkv_multiquery_accuracy", None)
        for r in rows:
            if r["task"] != "overall" or not math.isclose(r["keep_ratio"], ratio) or \
                    not r["prefill_seconds"]:
                continue
            entry[f"{r['method']}_scoring_over_prefill"] = r["scoring_seconds"] / \
                r["prefill_seconds"]
            if r["proxy_seconds"] is not None:
                entry[f"{r['method']}_proxy_over_prefill"] = r["proxy_seconds"] / \
                    r["prefill_seconds"]
        out[length] = entry
    return out


def markdown_report(records: list[dict], command: str | None = None) -> str:
    """One table per length (``proxykv.zoo.evaluate.markdown_table``'s columns), the
    continuation's log-likelihood, and the headline per length as one JSON line."""
    import json

    lines = [f"Produced by `{command}`.", ""] if command else []
    lines += [f"Text: {R.CORPUS}; tasks and settings: proxykv.realtext, proxykv.realeval.", ""]
    for length in sorted({r["length"] for r in records}):
        rows = [r for r in records if r["length"] == length]
        n = rows[0]["n"]
        lines += [f"## {length} tokens ({n} contexts)", ""]
        table = markdown_table(rows).split("\n\nSummary")[0]
        lines += [table, ""]
        lines += ["Needle questions answered at keep 0.3 (all tasks pooled; 95% Wilson interval): " +
                  "; ".join(f"{r['method']} {r['accuracy']:.2f} "
                            f"[{low:.2f}, {high:.2f}] of {r['questions']}"
                            for r in rows if r["task"] == "overall" and
                            (math.isclose(r["keep_ratio"], 0.3) or r["method"] == "full")
                            for low, high in [wilson_interval(r["accuracy"] * r["questions"],
                                                              r["questions"])]), ""]
        nll = [r for r in rows if r["task"] == "continuation"]
        full = next((r["nll_full"] for r in nll if r.get("nll_full") is not None), None)
        if full is not None:
            lines += [f"Continuation: mean NLL per token of the text's next "
                      f"{R.CONTINUATION_TOKENS - 1} tokens, full cache {full:.3f}; at keep 0.3: " +
                      ", ".join(f"{r['method']} {r['nll']:.3f}" for r in nll
                                if math.isclose(r["keep_ratio"], 0.3)), ""]
    lines += ["Headline at keep 0.3, per length: " + json.dumps(headline(records)), ""]
    return "\n".join(lines)


def plot_report(records: list[dict], path) -> None:
    """Accuracy against keep ratio: one row of panels per length, one panel per task (needs
    matplotlib: the ``eval`` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'proxykv[eval]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in records})
    tasks = [t for t in (*R.TASKS, "overall") if any(r["task"] == t for r in records)]
    fig, axes = plt.subplots(len(lengths), len(tasks), figsize=(3.4 * len(tasks),
                                                                 2.9 * len(lengths)),
                             sharey=True, squeeze=False)
    for row, length in enumerate(lengths):
        rows = [r for r in records if r["length"] == length]
        for column, task in enumerate(tasks):
            plot_panel(axes[row][column], rows, task, f"{task}, {length} tokens")
        axes[row][0].set_ylabel("accuracy" if row else "accuracy (continuation: top-1 agr.)")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


__all__ = ["DEFAULT_N", "LENGTHS", "RealEvalConfig", "headline", "markdown_report",
           "plot_report", "run_realtext_eval", "wilson_interval"]
