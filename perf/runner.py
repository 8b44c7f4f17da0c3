"""Benchmark runner shared by every ``perf/bench_*.py`` script.

* times with ``triton.testing.do_bench`` on CUDA (median and 20/80 quantiles) and a repeated
  wall-clock timer on CPU (same statistics);
* refuses to report a measurement whose correctness check against the reference fails;
* times an optional baseline (the naive torch way) and reports the speed-up;
* appends one JSON line per measurement to a results file (op, shape, dtype, impl, device name,
  git commit, times, GB/s or TFLOP/s) so runs on different machines can be compared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from proxykv._backend import choose_backend

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "perf" / "results" / "results.jsonl"


class CorrectnessError(AssertionError):
    """The op disagreed with its reference: no figure is reported for it."""


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def time_callable(fn: Callable[[], object], device: torch.device, *, min_seconds: float = 0.3,
                  max_repeats: int = 50) -> Timing:
    """Median and 20/80 quantiles of ``fn``'s run time, after a warm-up call."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25,
                                                   rep=100)
        return Timing(median, p20, p80, repeats=-1)
    fn()
    samples = []
    started = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < 3
                                          or time.perf_counter() - started < min_seconds):
        tick = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - tick) * 1e3)
    samples.sort()

    def quantile(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]

    return Timing(statistics.median(samples), quantile(0.2), quantile(0.8), len(samples))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Recorder:
    """Collects measurements, prints one line each, appends them as JSON lines to ``path``."""

    def __init__(self, device: torch.device, path: Path = DEFAULT_RESULTS):
        self.device = device
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.device_name = device_name(device)
        # What impl=None runs here (the backend rule); benchmarks record it with each figure.
        self.impl = choose_backend(None, device).impl
        self.commit = git_commit()
        self.failures: list[str] = []

    def measure(
        self,
        op: str,
        shape: dict,
        dtype: torch.dtype,
        impl: str,
        run: Callable[[], object],
        *,
        check: Callable[[], None] | None = None,
        baseline: Callable[[], object] | None = None,
        baseline_name: str = "baseline",
        bytes_moved: float | None = None,
        flops: float | None = None,
        peak_gb_per_s: float | None = None,
        extra: dict | None = None,
    ) -> dict | None:
        """Check, time and record one case. ``check`` raises (e.g. ``assert_close``) on a wrong
        result; then nothing is timed or recorded and the failure is kept in ``self.failures``.
        ``peak_gb_per_s`` (with ``bytes_moved``): the memory bandwidth to compare against; the
        achieved fraction of it is recorded as ``fraction_of_peak_bw``."""
        label = f"{op} {impl} {shape} {str(dtype).replace('torch.', '')}"
        if check is not None:
            try:
                check()
            except AssertionError as error:
                self.failures.append(f"{label}: {error}")
                print(f"REFUSED  {label}: correctness check failed: {error}", flush=True)
                return None
        timing = time_callable(run, self.device)
        row = {
            "op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "impl": impl,
            "device": self.device_name, "git_commit": self.commit,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **asdict(timing),
        }
        seconds = timing.median_ms / 1e3
        if bytes_moved is not None:
            row["gb_per_s"] = bytes_moved / seconds / 1e9
            if peak_gb_per_s:
                row["peak_gb_per_s"] = peak_gb_per_s
                row["fraction_of_peak_bw"] = row["gb_per_s"] / peak_gb_per_s
        if flops is not None:
            row["tflop_per_s"] = flops / seconds / 1e12
        if baseline is not None:
            base = time_callable(baseline, self.device)
            row["baseline"] = {"name": baseline_name, **asdict(base)}
            row["speedup"] = base.median_ms / timing.median_ms
        if extra:
            row.update(extra)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(_format(label, row), flush=True)
        return row


def _format(label: str, row: dict) -> str:
    parts = [f"{label:<60}", f"median {row['median_ms']:9.3f} ms",
             f"[p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}]"]
    if "gb_per_s" in row:
        parts.append(f"{row['gb_per_s']:8.1f} GB/s")
        if "fraction_of_peak_bw" in row:
            parts.append(f"({100 * row['fraction_of_peak_bw']:.0f}% of "
                         f"{row['peak_gb_per_s'] / 1e3:.1f} TB/s)")
    if "tflop_per_s" in row:
        parts.append(f"{row['tflop_per_s']:.3g} TFLOP/s")
    if "speedup" in row:
        parts.append(f"x{row['speedup']:.2f} vs {row['baseline']['name']} "
                     f"({row['baseline']['median_ms']:.3f} ms)")
    for key in ("peak_mem_mib", "note"):
        if key in row:
            parts.append(f"{key}={row[key]}")
    return "  ".join(parts)


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="JSON-lines file the measurements are appended to")
    parser.add_argument("--quick", action="store_true", help="smallest shapes only (smoke run)")
    return parser.parse_args(argv)


def main_for(run: Callable[[Recorder, bool], None], description: str,
             argv: list[str] | None = None) -> int:
    """Entry point of a bench script: ``run(recorder, quick)`` then exit 1 if any check failed."""
    args = parse_args(description, argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)  # time the real CPU path, never the interpreter
    recorder = Recorder(device, args.results)
    print(f"# {description} on {recorder.device_name} at {recorder.commit}; results -> "
          f"{recorder.path}", flush=True)
    run(recorder, args.quick)
    if recorder.failures:
        print(f"{len(recorder.failures)} case(s) refused: correctness check failed",
              file=sys.stderr)
        return 1
    return 0
