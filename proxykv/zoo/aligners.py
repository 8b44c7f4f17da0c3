"""The zoo's trained aligners, fitted on teacher data from training seeds only: ``linear``
(closed form) and ``axial`` (the multi-granularity hybrid loss).

    python -m proxykv.zoo.aligners [--target DIR --proxy DIR --out WEIGHTS_DIR]

writes the teacher contexts (rendered as text, one per line) to ``WEIGHTS_DIR/teacher/prompts.txt``
and runs ``proxykv.hf.training.train_aligner`` -- the function behind ``proxykv align-train`` --
once per aligner into ``WEIGHTS_DIR/aligner_linear`` and ``WEIGHTS_DIR/aligner_axial``, with the
reconstruction scorer's repeat prompt ``<repeat>`` (the second run reuses the teacher data of the
first, in ``WEIGHTS_DIR/teacher``, which is not committed). Each aligner's ``config.json`` records
its held-out metrics and the ``proxykv align-train`` command that trains the same aligner.
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
    """Write the teacher prompts and fit ``linear`` and ``axial`` with
    ``proxykv.hf.training.train_aligner``, printing each report (as ``proxykv align-train``)."""
    import json
    import os

    from transformers import AutoModelForCausalLM

    from proxykv._quiet import transformers_output
    from proxykv.hf import get_scorer
    from proxykv.hf.tokenizers import load_tokenizer
    from proxykv.hf.training import train_aligner

    def shown(path) -> str:  # relative where it can be, so the recorded command is portable
        relative = os.path.relpath(path)
        return relative if not relative.startswith("..") else str(path)

    target_dir, proxy_dir = shown(target_dir), shown(proxy_dir)
    out_dir = Path(shown(out_dir))
    data_dir = Path(data_dir) if data_dir else out_dir / "teacher"
    data_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = data_dir / "prompts.txt"
    prompts = [T.render(p) for p in teacher_prompts(n_per_task, length, seed)]
    prompts_file.write_text("".join(prompt + "\n" for prompt in prompts))
    repeat = T.SPECIAL_TOKENS[T.REPEAT]
    with transformers_output(False):
        tokenizer = load_tokenizer(target_dir)
        scorer = get_scorer("reconstruction", tokenizer=tokenizer, repeat_prompt=tokenizer(
            repeat, add_special_tokens=False)["input_ids"])
        target, proxy = (AutoModelForCausalLM.from_pretrained(str(folder)).eval()
                         for folder in (target_dir, proxy_dir))
        for name in ("linear", "axial"):
            out = out_dir / f"aligner_{name}"
            # the command line that trains the same aligner, recorded with it
            command = ["proxykv", "align-train", "--target", str(target_dir), "--proxy",
                       str(proxy_dir), "--prompts", str(prompts_file), "--out", str(out),
                       "--aligner", name, "--data", str(data_dir), "--repeat-prompt", repeat,
                       "--max-seconds", str(max_seconds), "--seed", str(seed)]
            report = train_aligner(target, proxy, prompts, out, aligner=name, data_dir=data_dir,
                                   tokenizer=tokenizer, teacher_scorer=scorer,
                                   max_seconds=max_seconds, seed=seed, device="cpu",
                                   metadata={"command": " ".join(command)})
            print(json.dumps(report, indent=1))


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
