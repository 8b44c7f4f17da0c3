"""Run every ``perf/bench_*.py`` in one process; exit non-zero if any refused to report."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from runner import Recorder, parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    args = parse_args("all proxykv benchmarks", argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)
    recorder = Recorder(device, args.results)
    print(f"# all benchmarks on {recorder.device_name} at {recorder.commit}; results -> "
          f"{recorder.path}", flush=True)
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"## {script.stem}", flush=True)
        importlib.import_module(script.stem).run(recorder, args.quick)
    if recorder.failures:
        print(f"{len(recorder.failures)} case(s) refused: correctness check failed",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
