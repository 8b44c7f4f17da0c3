"""Benchmark of the whole compression pipeline, ``ProxyKV.compress`` (prefill + scoring + align +
select + compact), on a random-weight Qwen3 target/proxy pair: the wall time of

* **kvzip_target** — target-only KVzip: the target scores itself with the ``reconstruction``
  scorer, policy ``topk`` (the baseline every ratio is taken against);
* **snapkv_target** — target-only SnapKV: ``window`` scorer (64 observation queries), policy
  ``pooled_window`` (window 64, kernel 5, average pooling);
* **proxykv_concurrent** — ProxyKV: the proxy scores (``reconstruction``) in a worker thread while
  the target runs its plain prefill (a second CUDA stream on the GPU), ``depth_interp`` aligner,
  policy ``head_budget``;
* **proxykv_sequential** — the same, the proxy after the target's prefill;

and the target's plain prefill (every ratio ``x pre`` is taken against it: what the mission
promises is KVzip-grade selection for little more than a prefill), all at keep ratio 0.3, each
context length from one run (same machine, same input, same models), so the ratios
``time / time(kvzip_target)`` are comparable even where the absolute times are noisy. Each method
is warmed up once, then ``compress`` is timed (median and 20/80 quantiles of a few repeats,
CUDA synchronised) with its stage breakdown (``cache.stats.seconds``: target prefill, proxy
scoring, align, select, compact) and its peak memory: on CUDA ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, above what was allocated before the call (the models and the
input); on the CPU the growth of the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` before every call) above the resident set before it — or, where that
reset is not allowed, the process's peak RSS so far (``ru_maxrss``, not per method). Also reported:
the target's KV bytes before compression and the kept bytes after.

The stage times are the pipeline's own (``cache.stats.seconds``); in the concurrent mode the
target-prefill and proxy-scoring stages overlap, so they do not add up to the total (on CUDA
each ends with a device-wide synchronize, so each also includes the other's overlapping work).

Checks before anything is recorded: every method keeps 0.3 of the KV bytes (up to rounding of the
per-head budgets), and the concurrent ProxyKV selects what the sequential one does (bit-identical
on the CPU; on CUDA, where concurrent streams may pick other cuBLAS kernels, at least 99% of the
mask agrees).

Sizes (``CPU_PAIR`` / ``CUDA_PAIR`` below; ``--quick`` shrinks the context):

* CPU (fp32): target 4 layers, hidden 256, 8 query / 4 KV heads; proxy 2 layers, hidden 128,
  4 / 2 heads; 2k, 4k and 8k contexts, reconstruction chunks of 512 tokens; the whole run takes
  about two minutes (124 s measured) with ``OMP_NUM_THREADS=1`` on 2 cores (the concurrent proxy
  needs a second free core to overlap at all: on a loaded machine it can come out slower than
  the sequential one).
  ``--quick``: a 256-token context, one repeat (seconds; the perf smoke test).
* GPU (bf16, ``--device cuda``, run by ``perf/gpu_check.sh`` through ``run_all.py``): target
  8 layers, hidden 1024, 16 / 4 heads; proxy 4 layers, hidden 512, 8 / 2 heads; 32k context,
  reconstruction chunks of 1024 tokens. Expectation: KVzip's cost is its reconstruction pass
  (about twice the prefill's attention), and the proxy (half the layers, half the heads) does it
  for about a quarter of the target's price, so ProxyKV sequential ~ target prefill + 1/4 of
  KVzip's scoring (well below 1x), ProxyKV concurrent ~ the larger of the two (towards SnapKV's
  time, if the two streams overlap); the whole script stays well under two minutes on one
  H100/H200.

Run:
    OMP_NUM_THREADS=1 python perf/bench_pipeline.py            # CPU, about two minutes
    python perf/bench_pipeline.py --quick                      # smoke run, seconds
    python perf/bench_pipeline.py --device cuda                # GPU
"""

from __future__ import annotations

import ctypes
import datetime
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for  # noqa: E402

KEEP_RATIO = 0.3
WINDOW = 64          # SnapKV: observation queries and protected recent positions
ARCH = "qwen3"


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class PairSetup:
    target: ModelShape
    proxy: ModelShape
    vocab_size: int
    contexts: tuple[int, ...]  # prompt tokens (full run), each measured
    quick_context: int      # prompt tokens with --quick
    chunk_size: int         # the reconstruction scorer's chunk_size
    dtype: torch.dtype
    repeats: int            # timed calls per method after the warm-up (full run)


#: CPU: the largest tiny pair and context whose four methods (warm-up + 3 repeats each) run in
#: about two minutes with OMP_NUM_THREADS=1 on a shared 2-core machine (measured: 124 s).
CPU_PAIR = PairSetup(target=ModelShape(layers=4, hidden=256, heads=8, kv_heads=4, head_dim=32),
                     proxy=ModelShape(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32),
                     vocab_size=1024, contexts=(2048, 4096, 8192), quick_context=256,
                     chunk_size=512,
                     dtype=torch.float32, repeats=3)

#: CUDA (one H100/H200, bf16): 32k context; the whole script well under two minutes.
CUDA_PAIR = PairSetup(target=ModelShape(layers=8, hidden=1024, heads=16, kv_heads=4, head_dim=64),
                      proxy=ModelShape(layers=4, hidden=512, heads=8, kv_heads=2, head_dim=64),
                      vocab_size=32000, contexts=(32768,), quick_context=8192,
                      chunk_size=1024,
                      dtype=torch.bfloat16, repeats=3)


def _build_model(shape: ModelShape, setup: PairSetup, max_positions: int, seed: int,
                 device: torch.device):
    """A random-weight ``Qwen3ForCausalLM`` like ``proxykv.hf.testing.tiny_model`` (same config
    conventions), with room for ``max_positions`` tokens (tiny_model fixes 1024)."""
    from transformers import AutoModelForCausalLM

    from proxykv.hf.testing import TINY_CONFIGS

    config = TINY_CONFIGS[ARCH](
        hidden_size=shape.hidden, intermediate_size=2 * shape.hidden,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        vocab_size=setup.vocab_size, initializer_range=0.1,
        max_position_embeddings=max_positions, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as the other benches find it
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=setup.dtype,
                                                 attn_implementation="sdpa")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------ memory

def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give the allocator's free memory back to the OS (glibc ``malloc_trim``), so the RSS before
    a call is what is live, not what an earlier method freed (which would hide this call's
    growth)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _proc_status_bytes("VmHWM:") is not None
    except OSError:
        return False


class _PeakMemory:
    """Peak memory of one call: CUDA allocator peak above the allocation before it; on the CPU
    the peak-RSS growth (``VmHWM`` after a reset) or, failing that, ``ru_maxrss`` (process-wide,
    not per call: ``kind`` says which)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss_growth"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.per_call = _reset_rss_peak()
            if not self.per_call:
                self.kind = "process_max_rss"
            self.before = _proc_status_bytes("VmRSS:") or 0
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.growth = self.peak - self.before
        elif self.per_call:
            self.peak = _proc_status_bytes("VmHWM:") or 0
            self.growth = max(0, self.peak - self.before)
        else:  # ru_maxrss: KiB on Linux
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.growth = self.peak
        return False


# ------------------------------------------------------------------------------------ methods

def _methods(target, proxy, setup: PairSetup):
    """(name, ProxyKV factory) of the four methods, in the order they run."""
    from proxykv.hf import ProxyKV, get_scorer
    from proxykv.policies import get_policy

    def reconstruction():
        return get_scorer("reconstruction", chunk_size=setup.chunk_size)

    return [
        ("kvzip_target", lambda: ProxyKV(target, None, scorer=reconstruction(), policy="topk",
                                         keep_ratio=KEEP_RATIO)),
        ("snapkv_target", lambda: ProxyKV(
            target, None, scorer=get_scorer("window", window=WINDOW),
            policy=get_policy("pooled_window", window=WINDOW, kernel_size=5, mode="avg"),
            keep_ratio=KEEP_RATIO)),
        ("proxykv_concurrent", lambda: ProxyKV(target, proxy, scorer=reconstruction(),
                                               policy="head_budget", keep_ratio=KEEP_RATIO,
                                               aligner="depth_interp", concurrent=True)),
        ("proxykv_sequential", lambda: ProxyKV(target, proxy, scorer=reconstruction(),
                                               policy="head_budget", keep_ratio=KEEP_RATIO,
                                               aligner="depth_interp", concurrent=False)),
    ]


@dataclass
class _Result:
    name: str
    samples: list[float]              # seconds of compress(), wall clock
    stages: dict[str, float]          # median seconds per stage
    peak_growth: int
    peak: int
    memory_kind: str
    kv_bytes_before: int
    kv_bytes_after: int
    cache_bytes: int
    mask: torch.Tensor                # the warm-up's selection (bool [B, Lt, Ht, T], CPU)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_method(name: str, make_pipe, input_ids: torch.Tensor, repeats: int,
                device: torch.device) -> _Result:
    pipe = make_pipe()
    try:
        cache = pipe.compress(input_ids)  # warm-up (kernels compiled, allocator primed)
        mask = cache.selection.to_mask().cpu()
        del cache
        samples, stage_samples, peaks = [], [], []
        for _ in range(repeats):
            with _PeakMemory(device) as memory:
                _synchronize(device)
                tick = time.perf_counter()
                cache = pipe.compress(input_ids)
                _synchronize(device)
                samples.append(time.perf_counter() - tick)
            stats = cache.stats
            stage_samples.append(dict(stats.seconds))
            peaks.append(memory)
            del cache
    finally:
        pipe.close()
    stages = {key: statistics.median(s[key] for s in stage_samples) for key in stage_samples[0]}
    worst = max(peaks, key=lambda m: m.growth)
    return _Result(name, samples, stages, worst.growth, worst.peak, worst.kind,
                   stats.kv_bytes_before, stats.kv_bytes_after, stats.cache_bytes, mask)


def _check(results: dict[str, _Result], device: torch.device, context: int) -> list[str]:
    """Problems that forbid reporting (empty list: all fine)."""
    problems = []
    for result in results.values():
        kept = result.kv_bytes_after / result.kv_bytes_before
        # per-head budgets round to whole positions: at most one position per head off
        if abs(kept - KEEP_RATIO) > 1.0 / context + 1e-9:
            problems.append(f"{result.name} kept {kept:.5f} of the KV bytes, not {KEEP_RATIO}")
    concurrent = results.get("proxykv_concurrent")
    sequential = results.get("proxykv_sequential")
    if concurrent is not None and sequential is not None:
        agree = (concurrent.mask == sequential.mask).double().mean().item()
        needed = 1.0 if device.type == "cpu" else 0.99
        if agree < needed:
            problems.append(f"ProxyKV concurrent and sequential selections agree on "
                            f"{100 * agree:.3f}% of the mask, need {100 * needed:g}%")
    return problems


# ------------------------------------------------------------------------------------ benchmark

def run(recorder: Recorder, quick: bool) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("# bench_pipeline SKIPPED: needs transformers (pip install proxykv[hf])", flush=True)
        return
    device = recorder.device
    setup = CUDA_PAIR if device.type == "cuda" else CPU_PAIR
    contexts = (setup.quick_context,) if quick else setup.contexts
    # KVzip's reconstruction runs positions up to 2T + 1
    max_positions = 2 * max(contexts) + 64
    started = time.perf_counter()
    target = _build_model(setup.target, setup, max_positions, seed=0, device=device)
    proxy = _build_model(setup.proxy, setup, max_positions, seed=1, device=device)
    for context in contexts:
        _run_context(recorder, setup, target, proxy, context, quick)
    print(f"# pipeline benchmark took {time.perf_counter() - started:.1f} s", flush=True)


def _time_prefill(model, input_ids: torch.Tensor, repeats: int, device) -> float:
    """Median seconds of the target's plain prefill (what every ratio is measured against)."""
    from proxykv.hf.pipeline import prefill
    from proxykv.hf.scorers import _Prompt

    prompt = _Prompt(model, input_ids, None)
    prefill(model, prompt)  # warm-up
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        tick = time.perf_counter()
        prefill(model, prompt)
        _synchronize(device)
        samples.append(time.perf_counter() - tick)
    return statistics.median(samples)


def _run_context(recorder: Recorder, setup: PairSetup, target, proxy, context: int,
                 quick: bool) -> None:
    device = recorder.device
    repeats = 1 if quick else setup.repeats
    generator = torch.Generator().manual_seed(context)
    input_ids = torch.randint(0, setup.vocab_size, (1, context), generator=generator).to(device)
    print(f"# pipeline: {ARCH} target {_describe(setup.target)}, proxy {_describe(setup.proxy)}, "
          f"{str(setup.dtype).replace('torch.', '')}, T={context}, keep {KEEP_RATIO}, "
          f"chunk_size {setup.chunk_size}, warm-up + {repeats} timed call(s) per method",
          flush=True)

    results: dict[str, _Result] = {}
    with torch.no_grad():
        prefill_seconds = _time_prefill(target, input_ids, max(repeats, 3), device)
        print(f"#   target plain prefill: median {prefill_seconds:.3f} s", flush=True)
        for name, make_pipe in _methods(target, proxy, setup):
            results[name] = _run_method(name, make_pipe, input_ids, repeats, device)
            print(f"#   {name}: median {results[name].median:.3f} s", flush=True)

    problems = _check(results, device, context)
    if problems:
        for problem in problems:
            recorder.failures.append(f"pipeline T={context}: {problem}")
            print(f"REFUSED  pipeline T={context}: {problem}", flush=True)
        return
    baseline = results["kvzip_target"].median
    shape = {"B": 1, "T": context, "keep": KEEP_RATIO, "target": _shape_dict(setup.target),
             "proxy": _shape_dict(setup.proxy), "vocab": setup.vocab_size,
             "chunk_size": setup.chunk_size}
    timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with recorder.path.open("a") as handle:
        for result in results.values():
            row = {
                "op": f"pipeline_compress/{result.name}", "shape": shape,
                "dtype": str(setup.dtype).replace("torch.", ""), "impl": recorder.impl,
                "device": recorder.device_name, "git_commit": recorder.commit,
                "timestamp": timestamp, "median_ms": 1e3 * result.median,
                "p20_ms": 1e3 * result.quantile(0.2), "p80_ms": 1e3 * result.quantile(0.8),
                "repeats": len(result.samples), "method": result.name,
                "ratio_vs_kvzip_target": result.median / baseline,
                "target_prefill_ms": 1e3 * prefill_seconds,
                "ratio_vs_target_prefill": result.median / prefill_seconds,
                "stage_median_ms": {k: 1e3 * v for k, v in result.stages.items()},
                "peak_mem_mib": round(result.peak_growth / 2**20, 1),
                "peak_mem_total_mib": round(result.peak / 2**20, 1),
                "peak_mem_kind": result.memory_kind,
                "kv_bytes_before": result.kv_bytes_before,
                "kv_bytes_after": result.kv_bytes_after, "cache_bytes": result.cache_bytes,
            }
            handle.write(json.dumps(row) + "\n")
    _print_table(results, context, baseline, prefill_seconds, device)


def _describe(shape: ModelShape) -> str:
    return (f"{shape.layers}L h{shape.hidden} {shape.heads}q/{shape.kv_heads}kv "
            f"d{shape.head_dim}")


def _shape_dict(shape: ModelShape) -> dict:
    return {"layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads,
            "kv_heads": shape.kv_heads, "head_dim": shape.head_dim}


def _print_table(results: dict[str, _Result], context: int, baseline: float,
                 prefill_seconds: float, device: torch.device) -> None:
    kind = next(iter(results.values())).memory_kind
    memory_label = {"cuda_allocated": "peak MiB (CUDA allocated above models+input)",
                    "rss_growth": "peak MiB (RSS growth)",
                    "process_max_rss": "peak MiB (process ru_maxrss, not per method)"}[kind]
    print(f"# pipeline summary on {device.type}: compress() wall time, median [p20, p80] s; "
          f"ratio vs target-only KVzip, and vs the target's plain prefill "
          f"({prefill_seconds:.3f} s); stage medians ms; {memory_label}; KV MiB before -> after",
          flush=True)
    header = (f"#   {'method':<19} {'T':>6} {'median s':>9} {'[p20, p80]':>17} {'ratio':>6} "
              f"{'x pre':>6} "
              f"{'prefill':>8} {'proxy':>8} {'align':>7} {'select':>7} {'compact':>7} "
              f"{'peak MiB':>9} {'KV MiB':>17}")
    print(header, flush=True)
    for result in results.values():
        s = {k: 1e3 * v for k, v in result.stages.items()}
        print(f"#   {result.name:<19} {context:>6} {result.median:9.3f} "
              f"[{result.quantile(0.2):7.3f}, {result.quantile(0.8):7.3f}] "
              f"{result.median / baseline:6.2f} {result.median / prefill_seconds:6.2f} "
              f"{s['target_prefill']:8.1f} "
              f"{s['proxy_scoring']:8.1f} {s['align']:7.1f} {s['select']:7.1f} "
              f"{s['compact']:7.1f} {result.peak_growth / 2**20:9.1f} "
              f"{result.kv_bytes_before / 2**20:7.2f} -> {result.kv_bytes_after / 2**20:6.2f}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main_for(run, "ProxyKV pipeline (prefill + scoring) benchmark"))
