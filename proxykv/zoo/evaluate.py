"""``proxykv eval``: accuracy under compression and the cost of scoring, per method and keep ratio,
on the zoo's tasks (or the same tasks, as text, on any local checkpoint pair).

Setting (KVzip's query-agnostic one, as kvpress evaluates): every context is compressed **before**
any question is seen; each question is then asked on its own over the compressed cache
(``ProxyKV.generate(question, cache=...)``, which restores the cache afterwards) and counts as
correct when the greedy answer reproduces the expected words. A method scores each context once;
the keep ratios are selections of the same scores.

Methods (:data:`METHODS`): ``full`` (keep everything), ``random``, ``sink_recent``
(StreamingLLM), ``snapkv`` (window scorer, window 64 + average pooling of width 5), ``kvzip``
(the target's reconstruction scores, top-k), and ProxyKV with the proxy's reconstruction scores
mapped by ``depth_interp`` (no training), the trained ``linear`` and ``axial`` aligners (top-k),
and ``axial`` with per-head budgets.

Each record of the JSON list: ``method``, ``keep_ratio``, ``task`` (or ``overall``),
``accuracy``, ``questions``, ``recall_vs_kvzip`` (the fraction of KVzip's kept positions this
method also keeps, per layer and head), ``scoring_seconds`` (prefill + scoring + alignment, mean
per context), ``ttft_seconds`` (scoring + selection + compaction + the question's forward: the
first answer token), ``decode_tokens_per_s`` (from the compressed cache), ``kv_kept_bytes``,
``peak_bytes`` (weights of the models used + their KV at its largest, reconstruction included;
measured on CUDA), and the run's settings.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proxykv.zoo import tasks as T

KEEP_RATIOS = (0.1, 0.2, 0.3, 0.5)
#: the repeat prompt of the reconstruction scorer when the tokenizer knows this word
ZOO_REPEAT_WORD = "<repeat>"
DECODE_TOKENS = 16
#: answers are the greedy ones, whatever sampling a model's generation_config asks for
GREEDY = {"do_sample": False, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class Method:
    """How one method builds its pipeline."""

    scorer: str
    policy: str = "topk"
    policy_params: dict = field(default_factory=dict)
    scorer_params: dict = field(default_factory=dict)
    aligner: str | None = None   # None: the target scores itself
    keep_everything: bool = False


METHODS: dict[str, Method] = {
    "full": Method("random", keep_everything=True),
    "random": Method("random"),
    "sink_recent": Method("random", "sink_recent", {"n_sink": 4}),
    "snapkv": Method("window", "pooled_window", {"window": 64, "kernel_size": 5, "mode": "avg"},
                     {"window": 64}),
    "kvzip": Method("reconstruction"),
    "proxykv_depth_interp": Method("reconstruction", aligner="depth_interp"),
    "proxykv_linear": Method("reconstruction", aligner="linear"),
    "proxykv_axial": Method("reconstruction", aligner="axial"),
    "proxykv_axial_head_budget": Method("reconstruction", "head_budget", aligner="axial"),
}
#: the methods whose aligner is read from a folder (the others need no training)
TRAINED_ALIGNERS = ("linear", "axial")


@dataclass
class EvalConfig:
    n: int = 32
    length: int = 1024
    seed: int = 0
    keep_ratios: tuple[float, ...] = KEEP_RATIOS
    methods: tuple[str, ...] = tuple(METHODS)
    tasks: tuple[str, ...] = T.TASKS
    impl: str | None = None


def _tokenize(tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.to(device)


def _words(tokenizer, ids) -> list[str]:
    return tokenizer.decode(ids, skip_special_tokens=False).split()


def _repeat_prompt(tokenizer):
    vocab = tokenizer.get_vocab()
    if ZOO_REPEAT_WORD in vocab:
        return [vocab[ZOO_REPEAT_WORD]]
    return None  # the scorer's default text


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(model, rows: int) -> int:
    """The bytes of ``model``'s KV cache holding ``rows`` tokens: full-attention layers hold them
    all, sliding-window layers at most their window."""
    from proxykv.hf.architectures import layer_layout

    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    layout = layer_layout(model)
    held = len(layout.compressible) * rows + sum(min(rows, w) for w in layout.sliding.values())
    return 2 * heads * head_dim * held * element


def build_pipeline(name: str, target, proxy, aligners: dict, tokenizer, keep_ratio: float,
                   impl=None):
    from proxykv.hf import ProxyKV, get_scorer
    from proxykv.policies import get_policy

    method = METHODS[name]
    params = dict(method.scorer_params)
    if method.scorer == "reconstruction":
        repeat = _repeat_prompt(tokenizer)
        params.update({"repeat_prompt": repeat} if repeat is not None else
                      {"tokenizer": tokenizer})
    if method.scorer in ("window", "reconstruction"):
        params["impl"] = impl
    scorer = get_scorer(method.scorer, **params)
    policy = get_policy(method.policy, **method.policy_params)
    aligner = None
    if method.aligner is not None:
        aligner = aligners.get(method.aligner, method.aligner)
    return ProxyKV(target, proxy if method.aligner else None, aligner=aligner, policy=policy,
                   scorer=scorer, keep_ratio=1.0 if method.keep_everything else keep_ratio,
                   impl=impl)


def _timed(function, device):
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def run_eval(target, proxy, tokenizer, aligners: dict | None = None,
             config: EvalConfig | None = None, progress: bool = True) -> list[dict]:
    """Evaluate every method of ``config`` (see the module docstring); returns the records."""
    from tqdm.auto import tqdm

    config = config or EvalConfig()
    aligners = aligners or {}
    device = target.get_input_embeddings().weight.device
    samples = {task: T.eval_samples(task, config.n, config.length, config.seed)
               for task in config.tasks}
    methods = list(config.methods)
    if "kvzip" in methods:  # first: the others' recall is measured against its selections
        methods.remove("kvzip")
        methods.insert(0, "kvzip")
    kvzip_masks: dict[tuple, torch.Tensor] = {}
    records = []
    total = len(methods) * sum(len(s) for s in samples.values())
    bar = tqdm(total=total, desc="eval", disable=not progress, file=sys.stderr)
    for name in methods:
        method = METHODS[name]
        if method.aligner is not None and proxy is None:
            raise ValueError(f"method {name!r} needs a proxy")
        if method.aligner in TRAINED_ALIGNERS and method.aligner not in aligners:
            raise ValueError(f"method {name!r} needs a trained {method.aligner!r} aligner; pass "
                             f"its folder (proxykv align-train writes one)")
        ratios = (1.0,) if method.keep_everything else tuple(config.keep_ratios)
        pipe = build_pipeline(name, target, proxy, aligners, tokenizer, ratios[0], config.impl)
        try:
            for task, task_samples in samples.items():
                found = {ratio: {key: [] for key in _MEASURES} for ratio in ratios}
                for index, sample in enumerate(task_samples):
                    bar.set_postfix_str(f"{name} {task}", refresh=False)
                    context = _tokenize(tokenizer, T.render(sample.context), device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    scored = pipe.score(context)
                    peak = _peak_bytes(target, proxy if method.aligner else None,
                                       context.shape[1], method.scorer, device)
                    for ratio in ratios:
                        cache = pipe.compact(scored, keep_ratio=ratio)
                        mask = cache.selection.to_mask()
                        if name == "kvzip":
                            kvzip_masks[(task, index, ratio)] = mask
                        reference = kvzip_masks.get((task, index, ratio))
                        if reference is not None:
                            found[ratio]["recall"].append(
                                float((mask & reference).sum() / reference.sum().clamp_min(1)))
                        correct, first, decode = _ask(pipe, cache, sample, tokenizer, device,
                                                      time_decode=index == 0)
                        found[ratio]["correct"] += correct
                        found[ratio]["ttft"].append(cache.stats.seconds["total"] + first)
                        found[ratio]["decode"] += [decode] if decode is not None else []
                        found[ratio]["scoring"].append(scored.seconds["total"])
                        found[ratio]["kept"].append(cache.stats.kv_bytes_after)
                        found[ratio]["peak"].append(peak if peak is not None else
                                                    torch.cuda.max_memory_allocated(device))
                    scored.release()
                    bar.update(1)
                records += [_record(name, ratio, task, found[ratio], config) for ratio in ratios]
        finally:
            pipe.close()
    bar.close()
    return _with_overall(records, config)


_MEASURES = ("correct", "recall", "scoring", "ttft", "decode", "kept", "peak")


def _ask(pipe, cache, sample, tokenizer, device, time_decode: bool):
    """Ask every question of ``sample`` over ``cache``: ``(correct per question, seconds to the
    first answer token of the first question, decode tokens/s or None)``."""
    correct, first, decode = [], 0.0, None
    for q_index, (question, answer) in enumerate(zip(sample.questions, sample.answers)):
        q_ids = _tokenize(tokenizer, T.render(question), device)
        expected = T.render(answer).split()
        if q_index == 0:
            _, first = _timed(lambda: pipe.generate(q_ids, 1, cache=cache, **GREEDY), device)
            if time_decode:
                _, long = _timed(lambda: pipe.generate(q_ids, DECODE_TOKENS + 1, cache=cache,
                                                       eos_token_id=[], **GREEDY), device)
                decode = DECODE_TOKENS / max(1e-9, long - first)
        out = pipe.generate(q_ids, len(expected) + 1, cache=cache, **GREEDY)
        correct.append(_words(tokenizer, out[0, q_ids.shape[1]:])[:len(expected)] == expected)
    return correct, first, decode


def _peak_bytes(target, proxy, rows: int, scorer: str, device) -> int | None:
    """Peak memory of one compression: measured on CUDA (None here: read it after the run), on
    CPU the weights of the models used plus their KV at its largest (the reconstruction scorer
    holds a second copy of the context and the repeat prompt)."""
    if device.type == "cuda":
        return None
    scored_rows = 2 * rows + 1 if scorer == "reconstruction" else rows
    if proxy is not None:
        return (_model_bytes(target) + kv_bytes(target, rows) + _model_bytes(proxy)
                + kv_bytes(proxy, scored_rows))
    return _model_bytes(target) + kv_bytes(target, scored_rows)


def _record(method: str, ratio: float, task: str, found: dict, config: EvalConfig) -> dict:
    return {"method": method, "keep_ratio": ratio, "task": task,
            "accuracy": sum(found["correct"]) / max(1, len(found["correct"])),
            "questions": len(found["correct"]), "recall_vs_kvzip": _mean(found["recall"]),
            "scoring_seconds": _mean(found["scoring"]), "ttft_seconds": _mean(found["ttft"]),
            "decode_tokens_per_s": _mean(found["decode"]), "kv_kept_bytes": _mean(found["kept"]),
            "peak_bytes": max(found["peak"]), "length": config.length, "n": config.n,
            "seed": config.seed}


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def _with_overall(records: list[dict], config: EvalConfig) -> list[dict]:
    """Add one ``task="overall"`` record per (method, ratio): question-weighted accuracy."""
    out = list(records)
    keys = sorted({(r["method"], r["keep_ratio"]) for r in records}, key=lambda k: (
        list(METHODS).index(k[0]), k[1]))
    for method, ratio in keys:
        rows = [r for r in records if r["method"] == method and r["keep_ratio"] == ratio]
        questions = sum(r["questions"] for r in rows)
        overall = dict(rows[0], task="overall", questions=questions)
        overall["accuracy"] = sum(r["accuracy"] * r["questions"] for r in rows) / max(1, questions)
        for key in ("recall_vs_kvzip", "scoring_seconds", "ttft_seconds", "decode_tokens_per_s",
                    "kv_kept_bytes"):
            values = [r[key] for r in rows if r[key] is not None]
            overall[key] = _mean(values)
        overall["peak_bytes"] = max(r["peak_bytes"] for r in rows)
        out.append(overall)
    return out


# ---------------------------------------------------------------------------------------------
# reports


def _lookup(records, method, ratio, task="overall"):
    for r in records:
        if r["method"] == method and r["task"] == task and math.isclose(r["keep_ratio"], ratio):
            return r
    full = [r for r in records if r["method"] == method and r["task"] == task]
    return full[0] if len(full) == 1 and full[0]["keep_ratio"] == 1.0 else None


def summary(records: list[dict], ratio: float = 0.3) -> dict:
    """The headline figures: ProxyKV (axial) accuracy as a fraction of KVzip's at ``ratio``,
    SnapKV's multi-query accuracy there, and ProxyKV's scoring time over KVzip's."""
    out = {"keep_ratio": ratio}
    kvzip = _lookup(records, "kvzip", ratio)
    for name in ("proxykv_axial", "proxykv_axial_head_budget", "proxykv_depth_interp"):
        mine = _lookup(records, name, ratio)
        if kvzip and mine and kvzip["accuracy"]:
            out[f"{name}_accuracy_over_kvzip"] = mine["accuracy"] / kvzip["accuracy"]
        if kvzip and mine and kvzip["scoring_seconds"]:
            out[f"{name}_scoring_time_over_kvzip"] = mine["scoring_seconds"] / \
                kvzip["scoring_seconds"]
    snap = _lookup(records, "snapkv", ratio, "multiquery")
    if snap:
        out["snapkv_multiquery_accuracy"] = snap["accuracy"]
    full = _lookup(records, "full", 1.0)
    if full:
        out["full_accuracy"] = {r["task"]: r["accuracy"] for r in records
                                if r["method"] == "full"}
    return out


def markdown_table(records: list[dict], command: str | None = None) -> str:
    ratios = sorted({r["keep_ratio"] for r in records if r["keep_ratio"] < 1.0})
    tasks = _tasks(records)
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    lines = []
    if command:
        lines += [f"Produced by `{command}`.", ""]
    header = "| method | task | " + " | ".join(f"keep {r:g}" for r in ratios) + \
        " | recall vs KVzip @0.3 | scoring s | TTFT s | decode tok/s | peak MiB |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for method in methods:
        for task in tasks:
            cells = []
            for ratio in ratios:
                r = _lookup(records, method, ratio, task)
                cells.append("—" if r is None else f"{r['accuracy']:.3f}")
            r = _lookup(records, method, 0.3, task) or _lookup(records, method, 1.0, task)

            def fmt(key, scale=1.0, digits=3, row=r):
                value = None if row is None else row.get(key)
                return "—" if value is None else f"{value * scale:.{digits}f}"

            lines.append(f"| {method} | {task} | " + " | ".join(cells) + f" | "
                         f"{fmt('recall_vs_kvzip')} | {fmt('scoring_seconds')} | "
                         f"{fmt('ttft_seconds')} | {fmt('decode_tokens_per_s', digits=0)} | "
                         f"{fmt('peak_bytes', 2.0 ** -20, 1)} |")
    head = summary(records)
    lines += ["", "Summary at keep 0.3: " + json.dumps(head)]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path) -> None:
    """Accuracy against keep ratio, one line per method, one panel per task (needs matplotlib:
    the ``eval`` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'proxykv[eval]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(records)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), sharey=True)
    axes = [axes] if len(tasks) == 1 else list(axes)
    for ax, task in zip(axes, tasks):
        plot_panel(ax, records, task, task)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def _tasks(records: list[dict]) -> list[str]:
    """The records' tasks in the order they first appear, ``overall`` last."""
    tasks = list(dict.fromkeys(r["task"] for r in records if r["task"] != "overall"))
    return tasks + (["overall"] if any(r["task"] == "overall" for r in records) else [])


def plot_panel(ax, records: list[dict], task: str, title: str) -> None:
    """One panel of the accuracy plots: ``task``'s accuracy against keep ratio per method (the
    full cache as a dotted line)."""
    ratios = sorted({r["keep_ratio"] for r in records if r["keep_ratio"] < 1.0})
    for method in METHODS:
        rows = [r for r in records if r["method"] == method and r["task"] == task]
        if not rows:
            continue
        if len(rows) == 1 and rows[0]["keep_ratio"] == 1.0:
            ax.axhline(rows[0]["accuracy"], color="black", linestyle=":", label=method)
            continue
        rows.sort(key=lambda r: r["keep_ratio"])
        ax.plot([r["keep_ratio"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                label=method)
    ax.set_title(title)
    ax.set_xlabel("keep ratio")
    ax.set_xticks(ratios)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def aligner_folders(folders) -> dict[str, str]:
    """``{kind: folder}`` of saved aligners, each labelled by the ``aligner`` name of its own
    ``config.json`` (``proxykv.align.read_config``), whatever the folder is called: a ``linear``
    aligner is ``"linear"`` (run by ``proxykv_linear``) and an ``axial`` one ``"axial"``
    (``proxykv_axial``, ``proxykv_axial_head_budget``).

    Raises ``FileNotFoundError`` for a folder without ``config.json`` and ``ValueError`` for one
    whose config is not an aligner's, for a kind no method reads from a folder (see
    :data:`TRAINED_ALIGNERS`), and for two folders of one kind.
    """
    from proxykv.align import read_config

    found: dict[str, str] = {}
    for folder in folders:
        kind = read_config(folder)["aligner"]
        if kind not in TRAINED_ALIGNERS:
            runs = "; ".join(f"{k}: {', '.join(m for m in METHODS if METHODS[m].aligner == k)}"
                             for k in TRAINED_ALIGNERS)
            raise ValueError(f"{folder} holds a {kind!r} aligner, which no method evaluates from "
                             f"a folder; the trained kinds are {', '.join(TRAINED_ALIGNERS)} "
                             f"({runs})")
        if kind in found:
            raise ValueError(f"{found[kind]} and {folder} both hold a {kind!r} aligner; give one "
                             f"folder per kind")
        found[kind] = str(folder)
    return found


def zoo_aligner_folders() -> list:
    """The folders of the zoo's committed trained aligners (those present)."""
    from proxykv.zoo import WEIGHTS_DIR

    folders = [WEIGHTS_DIR / f"aligner_{kind}" for kind in TRAINED_ALIGNERS]
    return [folder for folder in folders if folder.is_dir()]


def load_pair(target_path=None, proxy_path=None, aligner_paths=None, device="cpu"):
    """The models, tokenizer and aligners of an evaluation: the zoo's by default.

    ``aligner_paths``: saved aligner folders (an iterable), each labelled by its own config
    (:func:`aligner_folders`). None: the zoo's committed aligners for the zoo's pair (both paths
    None), none for another pair (the zoo's would not fit its shapes). The aligners are checked
    before any model is loaded.
    """
    from transformers import AutoModelForCausalLM

    from proxykv.hf.tokenizers import load_tokenizer
    from proxykv.zoo import weights_path

    if aligner_paths is None:
        aligner_paths = zoo_aligner_folders() if not target_path and not proxy_path else []
    aligners = aligner_folders(aligner_paths)
    target_path = Path(target_path) if target_path else weights_path("target")
    proxy_path = Path(proxy_path) if proxy_path else weights_path("proxy")
    target = AutoModelForCausalLM.from_pretrained(str(target_path)).to(device).eval()
    proxy = AutoModelForCausalLM.from_pretrained(str(proxy_path)).to(device).eval()
    tokenizer = load_tokenizer(target_path)
    if tokenizer is None:
        raise ValueError(f"{target_path} holds no tokenizer; the tasks are given as text")
    return target, proxy, tokenizer, aligners


__all__ = ["EvalConfig", "KEEP_RATIOS", "METHODS", "Method", "build_pipeline", "kv_bytes",
           "load_pair", "markdown_table", "plot", "plot_panel", "run_eval", "summary"]
