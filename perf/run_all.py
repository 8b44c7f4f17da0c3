"""Run every ``perf/bench_*.py`` in one process; exit non-zero if any refused to report."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from runner import Recorder, main_for  # noqa: E402


def run_every_benchmark(recorder: Recorder, quick: bool) -> None:
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"## {script.stem}", flush=True)
        importlib.import_module(script.stem).run(recorder, quick)


if __name__ == "__main__":
    sys.exit(main_for(run_every_benchmark, "all proxykv benchmarks"))
