"""The zoo's trained aligners: teacher data from training seeds only, then ``linear`` (closed form)
and ``axial`` (the multi-granularity hybrid loss) fitted on it.

    python -m proxykv.zoo.aligners --target DIR --proxy DIR --out WEIGHTS_DIR

writes ``WEIGHTS_DIR/aligner_linear`` and ``WEIGHTS_DIR/aligner_axial`` (each a
``proxykv.align.save`` folder whose metadata records the command, the data and the held-out
metrics), and keeps the teacher data in ``WEIGHTS_DIR/../teacher`` unless ``--data`` says where.
"""

from __future__ import annotations

import argparse
import json
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


def train_aligners(target_dir, proxy_dir, out_dir, *, data_dir=None, n_per_task=TEACHER_SAMPLES,
                   length=TEACHER_LENGTH, seed: int = 0, max_seconds: float = 600.0,
                   progress: bool = True) -> dict:
    """Record the teacher data and fit both aligners; returns ``{name: held-out metrics}``."""
    from transformers import AutoModelForCausalLM

    from proxykv.align import fit_aligner, get_aligner
    from proxykv.hf import get_scorer
    from proxykv.hf.teacher import TeacherData, record_teacher_scores

    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir else out_dir.parent / "teacher"
    target = AutoModelForCausalLM.from_pretrained(str(target_dir)).eval()
    proxy = AutoModelForCausalLM.from_pretrained(str(proxy_dir)).eval()
    scorer = get_scorer("reconstruction", repeat_prompt=[T.REPEAT])
    record_teacher_scores(target, proxy, teacher_prompts(n_per_task, length, seed), data_dir,
                          teacher_scorer=scorer, progress=progress)
    data = TeacherData(data_dir)
    train, held_out = data.split(5)
    results = {}
    for name in ("linear", "axial"):
        aligner = get_aligner(name, data.proxy_shape, data.target_shape)
        fit = fit_aligner(aligner, train, val_data=held_out, seed=seed, max_seconds=max_seconds,
                          progress=progress)
        results[name] = fit.metrics
        aligner.save(out_dir / f"aligner_{name}", metadata={
            "command": "python -m proxykv.zoo.aligners " + " ".join(sys.argv[1:]),
            "teacher_samples": len(data), "held_out": len(held_out), "length": length,
            "seed": seed, "method": fit.method, "epochs": fit.epochs,
            "seconds": round(fit.seconds, 1), "metrics": fit.metrics})
    return results


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
    p.add_argument("--max-seconds", type=float, default=600.0, help="per aligner")
    args = p.parse_args(argv)
    results = train_aligners(args.target, args.proxy, args.out, data_dir=args.data,
                             n_per_task=args.n, seed=args.seed, max_seconds=args.max_seconds)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
