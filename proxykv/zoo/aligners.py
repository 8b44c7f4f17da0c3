"""The zoo's trained aligners, made with ``proxykv align-train`` on teacher data from training
seeds only: ``linear`` (closed form) and ``axial`` (the multi-granularity hybrid loss).

    python -m proxykv.zoo.aligners [--target DIR --proxy DIR --out WEIGHTS_DIR]

writes the teacher contexts (rendered as text, one per line) to ``WEIGHTS_DIR/teacher/prompts.txt``
and runs ``proxykv align-train --repeat-prompt "<repeat>" ...`` once per aligner into
``WEIGHTS_DIR/aligner_linear`` and ``WEIGHTS_DIR/aligner_axial`` (the second run reuses the
teacher data of the first, in ``WEIGHTS_DIR/teacher``, which is not committed). Each aligner's
``config.json`` records the command and its held-out metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxykv.zoo import tasks as T

#: contexts per task in the teacher data, and their length
TEACHER_SAMPLES = 24
TEACHER_LENGTH = 1024


def teacher_prompts(n_per_task: int = TEACHER_SAMPLES, length: int = TEACHER_LENGTH,
                    run_seed: int = 0) -> list[list[int]]:
    """Contexts of every evaluation task drawn from training seeds (never an evaluation seed)."""
    prompts = []
    for task_index, task in enumerate(T.TASKS):
        for i in range(n_per_task):
            seed = T.train_seed(run_seed + 1000, task_index, i)  # a stream no training step uses
            sample = T.make_sample(task, seed, length, **{
                k: v for k, v in T.EVAL_SETTINGS[task].items()})
            prompts.append(sample.context)
    return prompts


def train_aligners(target_dir, proxy_dir, out_dir, *, data_dir=None,
                   n_per_task=TEACHER_SAMPLES, length=TEACHER_LENGTH, seed: int = 0,
                   max_seconds: float = 300.0) -> None:
    """Write the teacher prompts and run ``proxykv align-train`` for ``linear`` and ``axial``."""
    import os

    from proxykv.cli import main as cli

    def shown(path) -> str:  # relative where it can be, so the recorded command is portable
        relative = os.path.relpath(path)
        return relative if not relative.startswith("..") else str(path)

    target_dir, proxy_dir = shown(target_dir), shown(proxy_dir)
    out_dir = Path(shown(out_dir))
    data_dir = Path(data_dir) if data_dir else out_dir / "teacher"
    data_dir.mkdir(parents=True, exist_ok=True)
    prompts = data_dir / "prompts.txt"
    prompts.write_text("".join(T.render(p) + "\n" for p in teacher_prompts(n_per_task, length,
                                                                             seed)))
    for name in ("linear", "axial"):
        code = cli(["align-train", "--target", str(target_dir), "--proxy", str(proxy_dir),
                    "--prompts", str(prompts), "--out", str(out_dir / f"aligner_{name}"),
                    "--aligner", name, "--data", str(data_dir), "--repeat-prompt",
                    T.SPECIAL_TOKENS[T.REPEAT], "--max-seconds", str(max_seconds),
                    "--seed", str(seed)])
        if code:
            raise RuntimeError(f"proxykv align-train ({name}) exited with {code}")


def main(argv=None) -> int:
    from proxykv.zoo import WEIGHTS_DIR, weights_path

    p = argparse.ArgumentParser(prog="python -m proxykv.zoo.aligners", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(weights_path("target")))
    p.add_argument("--proxy", default=str(weights_path("proxy")))
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--data", default=None)
    p.add_argument("--n", type=int, default=TEACHER_SAMPLES, help="contexts per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=300.0, help="per aligner")
    args = p.parse_args(argv)
    train_aligners(args.target, args.proxy, args.out, data_dir=args.data, n_per_task=args.n,
                   seed=args.seed, max_seconds=args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
