"""The ``proxykv`` command line: a thin shell over library functions that tests call directly.

Bad arguments end in one line on stderr and exit code 2 (argparse's convention), never a
traceback.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("proxykv: Triton kernels and policies for cross-model proxy KV-cache pruning. "
               "'proxykv COMMAND --help' lists a command's options.")


class _Parser(argparse.ArgumentParser):
    """Reports a usage error on one line (with where to find help), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class UsageError(Exception):
    """A command-line argument that cannot be used here; reported as ``proxykv: error: ...``."""


def _device(text: str):
    """argparse type of ``--device``: a torch device of a type proxykv runs on."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: proxykv runs on cpu or cuda devices")
    return device


def _require_available(device) -> None:
    import torch

    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine "
                         f"(torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")


def _selfcheck(args: argparse.Namespace) -> int:
    import os

    _require_available(args.device)
    if args.device.type == "cpu" and args.interpret:
        # Must happen before any Triton kernel is defined; proxykv defines them lazily.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import proxykv
    from proxykv.selfcheck import run_selfcheck

    print(f"proxykv {proxykv.__version__} selfcheck on {args.device}"
          f" (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})")
    checks = run_selfcheck(args.device)
    width = max(len(c.name) for c in checks)
    for check in checks:
        status = "ok" if check.ok else "MISMATCH"
        print(f"  {check.name:<{width}}  impl={check.impl:<6}  max|err|={check.max_abs_error:.2e}  "
              f"{check.seconds * 1e3:8.1f} ms  {status}   ({check.reason})")
    failed = [c.name for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks agree with the reference")
    return 1 if failed else 0


def _backends(args: argparse.Namespace) -> int:
    from proxykv import backend_info

    if args.device is not None:
        _require_available(args.device)
    for op, choice in backend_info(args.device).items():
        print(f"{op}: {choice.impl} ({choice.reason})")
    return 0


def _load_pair(args: argparse.Namespace):
    """The target and proxy checkpoints of ``--target``/``--proxy`` and the target's tokenizer."""
    from pathlib import Path

    for flag in ("target", "proxy"):
        path = Path(getattr(args, flag))
        if not (path / "config.json").is_file():
            raise UsageError(f"--{flag} {path}: not a model folder (no config.json)")
    try:
        from transformers import AutoModelForCausalLM

        from proxykv.hf.tokenizers import load_tokenizer
    except ImportError:
        raise UsageError("this command needs transformers: pip install 'proxykv[hf]'") from None
    target = AutoModelForCausalLM.from_pretrained(args.target).to(args.device).eval()
    proxy = AutoModelForCausalLM.from_pretrained(args.proxy).to(args.device).eval()
    return target, proxy, load_tokenizer(args.target)


def _read_prompts(path) -> list[str]:
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    prompts = [line.replace("\\n", "\n") for line in path.read_text().splitlines()
               if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompt in it (one per line)")
    return prompts


def _align_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    _require_available(args.device)
    from proxykv.align import available_aligners, fit_aligner, get_aligner

    if args.aligner not in available_aligners():
        raise UsageError(f"--aligner {args.aligner!r}: choose one of "
                         f"{', '.join(available_aligners())}")
    prompts = _read_prompts(args.prompts)
    target, proxy, tokenizer = _load_pair(args)
    from proxykv.hf.teacher import TeacherData, record_teacher_scores

    if tokenizer is None:  # a checkpoint without a tokenizer: lines of token ids
        try:
            prompts = [[int(word) for word in line.split()] for line in prompts]
        except ValueError:
            raise UsageError(f"--target {args.target} has no tokenizer, so each line of "
                             f"--prompts must be token ids separated by spaces") from None
    repeat_prompt = None
    if args.repeat_prompt is not None:
        if tokenizer is not None:
            repeat_prompt = tokenizer(args.repeat_prompt, add_special_tokens=False)["input_ids"]
        else:
            try:
                repeat_prompt = [int(word) for word in args.repeat_prompt.split()]
            except ValueError:
                raise UsageError(f"--repeat-prompt: --target {args.target} has no tokenizer, so "
                                 f"give token ids separated by spaces") from None
    from proxykv.hf import get_scorer

    scorer = get_scorer("reconstruction", repeat_prompt=repeat_prompt, tokenizer=tokenizer)
    out = Path(args.out)
    data_dir = Path(args.data) if args.data else out / "teacher"
    try:
        record_teacher_scores(target, proxy, prompts, data_dir, tokenizer=tokenizer,
                              teacher_scorer=scorer, max_length=args.max_length)
    except ValueError as error:
        raise UsageError(str(error)) from None
    data = TeacherData(data_dir)
    if len(data) < 2:
        raise UsageError(f"--prompts: need at least 2 prompts (one is held out), got {len(data)}")
    train, held_out = data.split(max(2, round(1 / args.val_fraction)))
    import torch

    torch.manual_seed(args.seed)  # the aligner's initial weights: reproducible from --seed
    aligner = get_aligner(args.aligner, data.proxy_shape, data.target_shape).to(args.device)
    result = fit_aligner(aligner, train, val_data=held_out, epochs=args.epochs,
                         max_seconds=args.max_seconds, seed=args.seed)
    aligner.save(out, metadata={"command": "proxykv " + " ".join(args.argv),
                                "samples": len(data), "held_out": len(held_out),
                                "method": result.method, "epochs": result.epochs,
                                "seconds": round(result.seconds, 1), "metrics": result.metrics})
    print(json.dumps({"aligner": args.aligner, "out": str(out), "samples": len(data),
                      "epochs": result.epochs, "metrics": result.metrics}, indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    _require_available(args.device)
    try:
        from proxykv.zoo.demo import run_demo
    except ImportError as error:
        raise UsageError(f"the demo needs the hf extra ({error}): pip install 'proxykv[hf]'") \
            from None
    run_demo(keep_ratio=args.keep_ratio, device=args.device)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import shlex
    from pathlib import Path

    _require_available(args.device)
    from proxykv.zoo.evaluate import (
        KEEP_RATIOS,
        METHODS,
        TRAINED_ALIGNERS,
        EvalConfig,
        load_pair,
        markdown_table,
        plot,
        run_eval,
        summary,
    )

    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(METHODS)}")
    for flag in ("target", "proxy", "aligner", "linear_aligner"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_dir():
            raise UsageError(f"--{flag.replace('_', '-')} {value}: no such folder")
    aligner_paths = None
    if args.aligner is not None or args.linear_aligner is not None or args.target is not None:
        aligner_paths = {"axial": args.aligner, "linear": args.linear_aligner}
    target, proxy, tokenizer, aligners = load_pair(args.target, args.proxy, aligner_paths,
                                                   args.device)
    methods = tuple(args.methods or [m for m in METHODS if METHODS[m].aligner is None
                                     or METHODS[m].aligner not in TRAINED_ALIGNERS
                                     or METHODS[m].aligner in aligners])
    config = EvalConfig(n=args.n or (4 if args.quick else 32), length=args.length,
                        seed=args.seed, methods=methods,
                        keep_ratios=tuple(args.keep_ratios or
                                          ((0.1, 0.3) if args.quick else KEEP_RATIOS)))
    try:
        records = run_eval(target, proxy, tokenizer, aligners, config)
    except ValueError as error:
        raise UsageError(str(error)) from None
    command = "proxykv " + " ".join(shlex.quote(a) for a in args.argv)
    table = markdown_table(records, command)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(records, args.plot)
    print(json.dumps(summary(records)))
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from proxykv.zoo.aligners import train_aligners
    from proxykv.zoo.train import SCHEDULES, scaled_schedule, train

    out = Path(args.out)
    for name in args.models:
        if name not in SCHEDULES:
            raise UsageError(f"--models: unknown {name!r}; choose from {', '.join(SCHEDULES)}")
    results = {}
    for name in args.models:
        info = train(out / name, name, args.seed, scaled_schedule(name, args.steps_scale),
                     threads=args.threads, eval_n=args.eval_n,
                     log=lambda message: print(message, flush=True))
        results[name] = info.get("accuracy")
    if args.aligners:
        train_aligners(out / "target", out / "proxy", out, seed=args.seed)
    print(json.dumps(results, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from proxykv import __version__

    parser = _Parser(prog="proxykv", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"proxykv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands")
    device_help = "cpu, cuda or cuda:N (default: %(default)s)"

    selfcheck = commands.add_parser(
        "selfcheck", help="compare every op, policy, the ragged cache and the axial aligner with "
                          "their references on small inputs (on CPU: torch, and Triton under its "
                          "interpreter)",
        description="Run every kernel op, every built-in policy, the ragged KV cache and the axial "
                    "aligner on small inputs and compare each with its reference. Exit code 1 "
                    "if any disagrees.")
    selfcheck.add_argument("--device", type=_device, default="cpu", help=device_help)
    selfcheck.add_argument(
        "--no-interpret", dest="interpret", action="store_false",
        help="on CPU, check only the torch implementations (default: also run the Triton kernels "
             "under the interpreter)")
    selfcheck.set_defaults(handler=_selfcheck)

    backends = commands.add_parser(
        "backends", help="which backend (Triton or torch) each op uses on a device, and why",
        description="Which backend (Triton or torch) each op runs with impl=None on a device, "
                    "and why.")
    backends.add_argument("--device", type=_device, default=None,
                          help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    backends.set_defaults(handler=_backends)

    align = commands.add_parser(
        "align-train", help="record teacher scores of a proxy/target pair on prompts and fit an "
                            "aligner",
        description="Score each prompt with the proxy and with the target (KVzip reconstruction "
                    "scores, the teacher), write the pairs under --data (resumable), fit the "
                    "aligner on them with one sample in 1/val-fraction held out, and save it "
                    "into --out.")
    align.add_argument("--target", required=True, help="target model folder (from_pretrained)")
    align.add_argument("--proxy", required=True, help="proxy model folder (same tokenizer)")
    align.add_argument("--prompts", required=True,
                       help="text file, one prompt per line (\\n for a newline inside one; "
                            "token ids separated by spaces if the target has no tokenizer)")
    align.add_argument("--out", required=True, help="folder to save the aligner into")
    align.add_argument("--aligner", default="axial", help="registered aligner (default: axial)")
    align.add_argument("--data", default=None, help="teacher-data folder (default: OUT/teacher)")
    align.add_argument("--repeat-prompt", default=None,
                       help="the reconstruction scorer's repeat prompt, as text (token ids "
                            "separated by spaces if the target has no tokenizer); default: "
                            "proxykv.hf.DEFAULT_REPEAT_PROMPT_TEXT, or the bos token")
    align.add_argument("--max-length", type=int, default=None,
                       help="truncate prompts to this many tokens")
    align.add_argument("--epochs", type=int, default=200)
    align.add_argument("--max-seconds", type=float, default=None, help="stop fitting after this")
    align.add_argument("--val-fraction", type=float, default=0.2)
    align.add_argument("--seed", type=int, default=0)
    align.add_argument("--device", type=_device, default="cpu", help=device_help)
    align.set_defaults(handler=_align_train)

    demo = commands.add_parser(
        "demo", help="ProxyKV on the zoo's model pair: one prompt compressed at keep 0.3, its "
                     "questions answered with the full and the compressed cache",
        description="Load the zoo's target and proxy, compress one multi-query prompt with "
                    "ProxyKV and answer its questions with the full and the compressed cache; "
                    "print the kept fraction per layer and head, memory saved and timings.")
    demo.add_argument("--keep-ratio", type=float, default=0.3)
    demo.add_argument("--device", type=_device, default="cpu", help=device_help)
    demo.set_defaults(handler=_demo)

    evaluate = commands.add_parser(
        "eval", help="accuracy under compression and scoring cost per method and keep ratio",
        description="Evaluate full, random, sink_recent, snapkv, kvzip and the ProxyKV variants "
                    "on the zoo's tasks (multikey, multiquery, vartrack; contexts compressed "
                    "before the questions) at several keep ratios; print a Markdown table.")
    evaluate.add_argument("--seed", type=int, default=0, help="evaluation seed (disjoint from "
                                                              "training seeds)")
    evaluate.add_argument("--quick", action="store_true",
                          help="a reduced run (4 samples per task, keep 0.1 and 0.3) for CI")
    evaluate.add_argument("--n", type=int, default=None, help="samples per task (default 32)")
    evaluate.add_argument("--length", type=int, default=1024, help="context tokens")
    evaluate.add_argument("--keep-ratios", type=float, nargs="+", default=None)
    evaluate.add_argument("--methods", nargs="+", default=None)
    evaluate.add_argument("--json", default=None, help="write the records (a JSON list) here")
    evaluate.add_argument("--markdown", default=None, help="write the table here")
    evaluate.add_argument("--plot", default=None, help="write the accuracy plot (PNG) here")
    evaluate.add_argument("--target", default=None, help="target model folder (default: zoo)")
    evaluate.add_argument("--proxy", default=None, help="proxy model folder (default: zoo)")
    evaluate.add_argument("--aligner", default=None, help="trained axial aligner folder")
    evaluate.add_argument("--linear-aligner", default=None,
                          help="trained linear aligner folder")
    evaluate.add_argument("--device", type=_device, default="cpu", help=device_help)
    evaluate.set_defaults(handler=_eval)

    zoo = commands.add_parser("zoo", help="the model zoo: 'proxykv zoo train'",
                              description="The zoo's models: train them from a seed.")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="COMMAND")
    zoo_train = zoo_commands.add_parser(
        "train", help="train the zoo's target, proxy and aligners from a seed (resumable)",
        description="Train the zoo's target and proxy (proxykv.zoo.train; about 20 + 20 minutes "
                    "on a 2-core CPU, resumable from OUT/<model>/checkpoints) and then their "
                    "linear and axial aligners on teacher data from training seeds, into OUT. "
                    "The committed weights (proxykv/zoo/weights) were made this way.")
    zoo_train.add_argument("--out", required=True, help="output folder")
    zoo_train.add_argument("--models", nargs="+", default=["target", "proxy"])
    zoo_train.add_argument("--seed", type=int, default=0)
    zoo_train.add_argument("--threads", type=int, default=None, help="torch threads")
    zoo_train.add_argument("--steps-scale", type=float, default=1.0,
                           help="multiply every stage's steps (e.g. 0.01 for a smoke run)")
    zoo_train.add_argument("--eval-n", type=int, default=64,
                           help="evaluation prompts per task at the end (0: none)")
    zoo_train.add_argument("--no-aligners", dest="aligners", action="store_false",
                           help="skip the aligners (they need both models in OUT)")
    zoo_train.set_defaults(handler=_zoo_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.handler(args)
    except UsageError as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
