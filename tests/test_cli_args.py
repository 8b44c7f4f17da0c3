"""The command line's argument rules: every numeric flag range-checked at parse time, every
folder and file checked before a model is loaded, one line on stderr and exit code 2 for a bad
argument (never a traceback), a help text for every flag.

Most tests stop the commands before any model is loaded: ``no_loading`` makes every way a
command loads models or starts training raise ``Loaded``, so a check that came too late (or not
at all) fails the test instead of loading anything."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from proxykv.testing import assertions

pytest.importorskip("transformers")

from proxykv import cli
from proxykv.align import available_aligners, get_aligner
from proxykv.cli import build_parser, main
from proxykv.zoo import WEIGHTS_DIR, weights_path
from proxykv.zoo import tasks as T


class Loaded(Exception):
    """A command got as far as loading models or training."""


@pytest.fixture
def no_loading(monkeypatch):
    """Every way the commands load models or train raises ``Loaded``; returns the calls."""
    import transformers

    import proxykv.zoo.demo
    import proxykv.zoo.evaluate
    import proxykv.zoo.train

    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            raise Loaded(name)
        return call

    monkeypatch.setattr(proxykv.zoo.evaluate, "load_pair", refuse("load_pair"))
    monkeypatch.setattr(proxykv.zoo.demo, "run_demo", refuse("run_demo"))
    monkeypatch.setattr(proxykv.zoo.train, "train", refuse("train"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        refuse("from_pretrained"))
    return calls


def usage_error(argv, capsys) -> str:
    """The one line ``main(argv)`` writes to stderr when it exits with code 2."""
    return assertions.usage_error(main, argv, capsys)


@pytest.fixture
def pair_folders(tmp_path):
    """Two model folders that pass the up-front checks of align-train (config.json only)."""
    for name in ("target", "proxy"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "prompts.txt").write_text("1 2 3\n4 5 6\n")
    return tmp_path


def align_args(folder, *extra):
    return ["align-train", "--target", str(folder / "target"), "--proxy",
            str(folder / "proxy"), "--prompts", str(folder / "prompts.txt"), "--out",
            str(folder / "out"), *extra]


# ---------------------------------------------------------------------------------------------
# 1. numeric flags


ALIGN = ["align-train", "--target", "T", "--proxy", "P", "--prompts", "p.txt", "--out", "o"]
ZOO = ["zoo", "train", "--out", "o"]
BAD_NUMBERS = [
    *[(ALIGN, "--max-length", v) for v in ("-5", "0", "1.5", "x")],
    *[(ALIGN, "--epochs", v) for v in ("0", "-1")],
    *[(ALIGN, "--max-seconds", v) for v in ("0", "-1", "nan", "inf")],
    *[(ALIGN, "--val-fraction", v) for v in ("0", "-0.1", "0.6", "1", "nan", "inf")],
    *[(ALIGN, "--seed", v) for v in ("-1", str(2**63), "1.0")],
    *[(["demo"], "--keep-ratio", v) for v in ("0", "1.5", "-0.2", "nan", "inf", "x")],
    *[(["eval"], "--n", v) for v in ("0", "-3")],
    *[(["eval"], "--length", v) for v in ("-1", "0", str(cli.MIN_EVAL_LENGTH - 1))],
    *[(["eval"], "--keep-ratios", v) for v in ("0", "1", "1.5", "-0.1", "nan")],
    (["eval"], "--seed", "-1"),
    *[(ZOO, "--threads", v) for v in ("0", "-1")],
    *[(ZOO, "--steps-scale", v) for v in ("0", "-1", "nan", "inf")],
    (ZOO, "--eval-n", "-1"),
    (ZOO, "--seed", "-1"),
]


@pytest.mark.parametrize("command,flag,value", BAD_NUMBERS,
                         ids=[f"{c[0]} {f} {v}" for c, f, v in BAD_NUMBERS])
def test_numeric_flags_are_range_checked_at_parse_time(command, flag, value, no_loading,
                                                      capsys):
    line = usage_error([*command, flag, value], capsys)
    assert f"argument {flag}:" in line and value in line, line
    assert no_loading == []


def test_keep_ratios_are_checked_one_by_one(no_loading, capsys):
    line = usage_error(["eval", "--keep-ratios", "0.3", "0"], capsys)
    assert "argument --keep-ratios: must be a number in (0, 1), got 0" in line


def test_numeric_flags_accept_their_bounds():
    parser = build_parser()
    args = parser.parse_args([*ALIGN, "--max-length", "1", "--epochs", "1", "--max-seconds",
                              "1e-3", "--val-fraction", "0.5", "--seed", str(2**63 - 1)])
    assert (args.max_length, args.epochs, args.val_fraction, args.seed) == (1, 1, 0.5, 2**63 - 1)
    assert parser.parse_args(["demo", "--keep-ratio", "1"]).keep_ratio == 1.0
    args = parser.parse_args(["eval", "--n", "1", "--length", str(cli.MIN_EVAL_LENGTH),
                              "--keep-ratios", "1e-3", "0.999", "--seed", "0"])
    assert args.keep_ratios == [1e-3, 0.999] and args.length == [cli.MIN_EVAL_LENGTH]
    args = parser.parse_args([*ZOO, "--threads", "1", "--steps-scale", "1e-4", "--eval-n", "0"])
    assert (args.threads, args.steps_scale, args.eval_n) == (1, 1e-4, 0)


def test_min_eval_length_is_what_the_tasks_need():
    for task in T.TASKS:
        assert len(T.eval_samples(task, 2, cli.MIN_EVAL_LENGTH)[0].context) == \
            cli.MIN_EVAL_LENGTH
    with pytest.raises(ValueError, match="too short"):
        for task in T.TASKS:
            T.eval_samples(task, 2, cli.MIN_EVAL_LENGTH - 1)


def test_eval_length_is_checked_against_max_position_embeddings_before_loading(no_loading,
                                                                               capsys):
    positions = json.loads((weights_path("target") / "config.json").read_text())[
        "max_position_embeddings"]
    most = (positions - 1) // 2
    line = usage_error(["eval", "--length", str(most + 1)], capsys)
    assert f"--length can be at most {most}" in line and "max_position_embeddings" in line
    assert str(most) in cli.build_parser()._subparsers._group_actions[0].choices[
        "eval"].format_help()
    # without a reconstruction method the context need not fit twice
    with pytest.raises(Loaded):
        main(["eval", "--length", str(most + 1), "--methods", "full", "random"])


def test_eval_length_must_leave_every_method_a_budget_before_loading(no_loading, capsys):
    line = usage_error(["eval", "--length", "100", "--keep-ratios", "0.1"], capsys)
    assert "--length 100 at keep ratio 0.1: snapkv cannot select" in line
    with pytest.raises(Loaded):  # the same length with methods that can select there
        main(["eval", "--length", "100", "--keep-ratios", "0.1", "--methods", "kvzip", "random"])


# ---------------------------------------------------------------------------------------------
# 2. align-train: folders and files before loading; --aligner choices


def test_align_train_refuses_an_unwritable_out_or_data_before_loading(pair_folders, no_loading,
                                                                     capsys):
    blocker = pair_folders / "a_file"
    blocker.write_text("not a folder")
    line = usage_error(align_args(pair_folders)[:-1] + [str(blocker / "aligner")], capsys)
    assert f"--out {blocker / 'aligner'}: cannot create this folder: {blocker} is a file" in line
    line = usage_error(align_args(pair_folders)[:-1] + [str(blocker)], capsys)
    assert f"--out {blocker}: exists and is not a folder" in line
    line = usage_error(align_args(pair_folders, "--data", str(blocker / "teacher")), capsys)
    assert f"--data {blocker / 'teacher'}: cannot create this folder" in line
    assert no_loading == []


def test_align_train_checks_its_prompts_before_loading(pair_folders, no_loading, capsys):
    (pair_folders / "prompts.txt").write_text("1 2 3\n")
    assert "need at least 2 prompts" in usage_error(align_args(pair_folders), capsys)
    (pair_folders / "prompts.txt").write_bytes(b"\xff\xfe\x00binary")
    assert "not readable as text" in usage_error(align_args(pair_folders), capsys)
    (pair_folders / "prompts.txt").write_text("1 2 3\n4 5 6\n")
    line = usage_error(align_args(pair_folders, "--repeat-prompt", ""), capsys)
    assert "--repeat-prompt: repeat_prompt must hold at least one token id" in line
    assert no_loading == []


def test_align_train_aligner_choices_come_from_the_registry(no_loading, capsys):
    line = usage_error([*ALIGN, "--aligner", "nonsense"], capsys)
    assert "argument --aligner: invalid choice: 'nonsense'" in line
    assert all(repr(name) in line for name in available_aligners())
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices[
        "align-train"]._actions if a.dest == "aligner")
    assert list(action.choices) == available_aligners()


def test_align_train_refuses_an_aligner_that_cannot_map_the_pair_before_loading(
        pair_folders, no_loading, capsys):
    for name, layers, heads in (("target", 2, 2), ("proxy", 1, 1)):
        (pair_folders / name / "config.json").write_text(json.dumps(
            {"num_hidden_layers": layers, "num_attention_heads": 2 * heads,
             "num_key_value_heads": heads}))
    line = usage_error(align_args(pair_folders, "--aligner", "identity"), capsys)
    assert "--aligner identity: the 'identity' aligner needs proxy_shape == target_shape" in line
    assert no_loading == []


def test_align_train_holds_out_one_sample_at_a_tiny_val_fraction(tmp_path, capsys):
    from proxykv.hf.testing import tiny_model

    tiny_model("qwen2", num_layers=2).save_pretrained(tmp_path / "target")
    tiny_model("qwen2", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
               seed=1).save_pretrained(tmp_path / "proxy")
    (tmp_path / "prompts.txt").write_text("".join(
        " ".join(str((7 * i + j) % 100) for j in range(12)) + "\n" for i in range(3)))
    assert main(align_args(tmp_path, "--aligner", "linear", "--val-fraction", "5e-324")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 3
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["metadata"]["held_out"] == 1


# ---------------------------------------------------------------------------------------------
# 3. eval: model folders before loading


def test_eval_checks_both_model_folders_before_loading(tmp_path, no_loading, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    target = str(weights_path("target"))
    line = usage_error(["eval", "--target", str(empty), "--proxy", str(empty)], capsys)
    assert f"--target {empty}: not a model folder (no config.json)" in line
    line = usage_error(["eval", "--target", target, "--proxy", str(no_tokenizer)], capsys)
    assert f"--proxy {no_tokenizer}: holds no tokenizer" in line and "tokenizer.json" in line
    line = usage_error(["eval", "--target", str(no_tokenizer), "--proxy", target], capsys)
    assert f"--target {no_tokenizer}: holds no tokenizer" in line
    (no_tokenizer / "config.json").write_text("{not json")
    line = usage_error(["eval", "--target", str(no_tokenizer), "--proxy", target], capsys)
    assert "config.json is not readable JSON" in line
    assert no_loading == []


@pytest.mark.parametrize("flag,other", [("--target", "--proxy"), ("--proxy", "--target")])
def test_eval_needs_both_target_and_proxy(flag, other, no_loading, capsys):
    line = usage_error(["eval", flag, str(weights_path("target"))], capsys)
    assert f"{flag} needs {other} too" in line


def test_eval_checks_its_output_files_before_loading(tmp_path, no_loading, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flag in ("--json", "--markdown", "--plot"):
        line = usage_error(["eval", "--quick", flag, str(blocker / "out")], capsys)
        assert f"{flag} {blocker / 'out'}: cannot create this file: {blocker} is a file" in line
    line = usage_error(["eval", "--quick", "--json", str(tmp_path)], capsys)
    assert f"--json {tmp_path}: exists and is not a file" in line
    assert no_loading == []


@pytest.fixture
def real_folder(tmp_path):
    """A folder that passes realtext's up-front checks: a Gemma-3-like config and a tokenizer
    file."""
    folder = tmp_path / "real"
    folder.mkdir()
    types = ["sliding_attention"] * 5 + ["full_attention"]
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
        "max_position_embeddings": 32768, "layer_types": types * 3}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_eval_realtext_checks_its_arguments_before_loading(real_folder, tmp_path, no_loading,
                                                          capsys):
    real = ["eval", "--suite", "realtext", "--target", str(real_folder)]
    assert "--suite realtext needs --target" in usage_error(["eval", "--suite", "realtext"],
                                                            capsys)
    line = usage_error([*real, "--length", "1024", "100"], capsys)
    assert "--length 100: the real-text tasks need at least 256 tokens" in line
    line = usage_error([*real, "--length", "1024", "1024"], capsys)
    assert "--length: 1024 given more than once" in line
    assert "--proxy-layers 18: the target has 18 layers, so at most 17" in usage_error(
        [*real, "--proxy-layers", "18"], capsys)
    assert "give --proxy DIR or --proxy-layers N, not both" in usage_error(
        [*real, "--proxy", str(real_folder), "--proxy-layers", "6"], capsys)
    line = usage_error([*real, "--length", "20000"], capsys)
    assert "--length 20000" in line and "at most 16383" in line
    line = usage_error([*real, "--methods", "proxykv_axial"], capsys)
    assert "needs a trained axial aligner" in line  # no committed aligner for this folder
    assert no_loading == []


def test_eval_zoo_takes_one_length_and_no_early_layers_proxy(no_loading, capsys):
    line = usage_error(["eval", "--length", "512", "1024"], capsys)
    assert "--length 512 1024: the zoo's tasks run at one length" in line
    line = usage_error(["eval", "--proxy-layers", "2"], capsys)
    assert "--proxy-layers: the zoo's tasks run on a pair of folders" in line
    assert no_loading == []


def test_eval_suite_defaults_to_realtext_for_a_named_checkpoint(real_folder):
    parser = build_parser()
    assert cli._suite(parser.parse_args(["eval", "--target", "gemma3-270m"])) == "realtext"
    assert cli._suite(parser.parse_args(["eval", "--target", str(real_folder)])) == "zoo"
    assert cli._suite(parser.parse_args(["eval"])) == "zoo"
    assert cli._suite(parser.parse_args(["eval", "--suite", "realtext", "--target",
                                         str(real_folder)])) == "realtext"


def test_model_shape_counts_the_full_attention_layers():
    assert cli._model_shape({"num_hidden_layers": 18, "num_attention_heads": 4,
                             "num_key_value_heads": 1,
                             "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3}
                            ) == (3, 1)
    assert cli._model_shape({"num_hidden_layers": 4, "num_attention_heads": 8}) == (4, 8)


def test_align_train_takes_one_proxy_and_one_prompt_source(pair_folders, no_loading, capsys):
    base = ["align-train", "--target", str(pair_folders / "target"), "--out",
            str(pair_folders / "out")]
    prompts = ["--prompts", str(pair_folders / "prompts.txt")]
    for proxy in ([], ["--proxy", str(pair_folders / "proxy"), "--proxy-layers", "1"]):
        line = usage_error([*base, *proxy, *prompts], capsys)
        assert "give exactly one of --proxy DIR and --proxy-layers N" in line
    for source in ([], [*prompts, "--corpus-prompts", "4"]):
        line = usage_error([*base, "--proxy-layers", "1", *source], capsys)
        assert "give exactly one of --prompts FILE and --corpus-prompts N" in line
    line = usage_error(["align-train", "--target", "no-such-model", "--proxy-layers", "1",
                        "--corpus-prompts", "4", "--out", str(pair_folders / "out")], capsys)
    assert "--target no-such-model: no such folder, nor a checkpoint name (gemma3-270m" in line
    assert no_loading == []


def test_eval_refuses_repeated_methods_and_ratios(no_loading, capsys):
    assert "--methods: full given more than once" in usage_error(
        ["eval", "--methods", "full", "kvzip", "full"], capsys)
    assert "--keep-ratios: 0.3 given more than once" in usage_error(
        ["eval", "--keep-ratios", "0.3", "0.3"], capsys)


# ---------------------------------------------------------------------------------------------
# 4. eval --aligner: labelled by the aligner's own config


@pytest.fixture
def saved_aligners(tmp_path):
    """Tiny aligners for the zoo's shapes (proxy (2, 1) -> target (4, 2)), saved by kind."""
    folders = {}
    for name, kind, shapes in [("lin", "linear", ((2, 1), (4, 2))),
                               ("lin2", "linear", ((2, 1), (4, 2))),
                               ("ax", "axial", ((2, 1), (4, 2))),
                               ("depth", "depth_interp", ((2, 1), (4, 2))),
                               ("other_shape", "linear", ((3, 1), (4, 2)))]:
        folders[name] = tmp_path / name
        get_aligner(kind, *shapes).save(folders[name])
    return folders


def test_aligner_folders_are_keyed_by_their_config(saved_aligners):
    from proxykv.zoo.evaluate import aligner_folders

    found = aligner_folders([saved_aligners["lin"], saved_aligners["ax"]])
    assert found == {"linear": str(saved_aligners["lin"]), "axial": str(saved_aligners["ax"])}
    with pytest.raises(ValueError, match="both hold a 'linear' aligner"):
        aligner_folders([saved_aligners["lin"], saved_aligners["lin2"]])
    with pytest.raises(ValueError, match="'depth_interp' aligner.*linear, axial"):
        aligner_folders([saved_aligners["depth"]])
    with pytest.raises(FileNotFoundError):
        aligner_folders([saved_aligners["lin"].parent])


def test_eval_labels_a_linear_aligner_given_as_aligner_linear(saved_aligners, no_loading,
                                                             capsys):
    with pytest.raises(Loaded):
        main(["eval", "--quick", "--aligner", str(saved_aligners["lin"])])
    (_, args, _), = no_loading
    from proxykv.zoo.evaluate import aligner_folders

    assert aligner_folders(args[2]) == {"linear": str(saved_aligners["lin"])}
    err = capsys.readouterr().err
    assert "leaving out proxykv_axial, proxykv_axial_head_budget: no trained axial aligner " \
           "given" in err and "proxykv_linear" not in err


def test_eval_takes_several_aligners_and_the_deprecated_linear_aligner(saved_aligners,
                                                                      no_loading, capsys):
    with pytest.raises(Loaded):
        main(["eval", "--quick", "--aligner", str(saved_aligners["ax"]), "--linear-aligner",
              str(saved_aligners["lin"])])
    with pytest.raises(Loaded):  # the alias is labelled by its config too
        main(["eval", "--quick", "--linear-aligner", str(saved_aligners["ax"])])
    from proxykv.zoo.evaluate import aligner_folders

    assert aligner_folders(no_loading[0][1][2]) == {"axial": str(saved_aligners["ax"]),
                                                    "linear": str(saved_aligners["lin"])}
    assert aligner_folders(no_loading[1][1][2]) == {"axial": str(saved_aligners["ax"])}
    assert "--linear-aligner is deprecated" in capsys.readouterr().err


@pytest.mark.parametrize("names,message", [
    (["lin", "lin2"], "both hold a 'linear' aligner"),
    (["depth"], ("'depth_interp' aligner, which no method evaluates from a folder; the "
                 "trained kinds are linear, axial")),
    (["other_shape"], "maps (layers, KV heads) (3, 1) -> (4, 2), but the proxy has (2, 1)"),
    (["missing"], "no such folder"),
])
def test_eval_refuses_bad_aligner_folders_before_loading(names, message, saved_aligners,
                                                         no_loading, capsys, tmp_path):
    folders = [str(saved_aligners.get(name, tmp_path / name)) for name in names]
    assert message in usage_error(["eval", "--quick", "--aligner", *folders], capsys)
    assert no_loading == []


def test_eval_refuses_a_method_whose_aligner_is_missing(saved_aligners, no_loading, capsys):
    line = usage_error(["eval", "--aligner", str(saved_aligners["lin"]), "--methods",
                        "proxykv_axial"], capsys)
    assert "--methods proxykv_axial: needs a trained axial aligner" in line


# ---------------------------------------------------------------------------------------------
# 5. what eval leaves out, and its summary printed once


def test_eval_says_which_methods_it_leaves_out_without_aligners(no_loading, capsys):
    with pytest.raises(Loaded):
        main(["eval", "--quick", "--target", str(weights_path("target")), "--proxy",
              str(weights_path("proxy"))])
    assert capsys.readouterr().err.splitlines() == [
        ("proxykv eval: leaving out proxykv_linear, proxykv_axial, proxykv_axial_head_budget: "
         "no trained aligner given (--aligner DIR; proxykv align-train makes one)")]
    (_, args, _), = no_loading
    assert list(args[2]) == []


def test_eval_on_the_zoo_pair_uses_its_aligners_silently(no_loading, capsys):
    with pytest.raises(Loaded):
        main(["eval", "--quick"])
    assert capsys.readouterr().err == ""
    (_, args, _), = no_loading
    assert sorted(map(str, args[2])) == sorted(str(WEIGHTS_DIR / f"aligner_{kind}")
                                               for kind in ("linear", "axial"))


def test_eval_methods_helper():
    methods, note = cli._eval_methods(None, {"linear", "axial"})
    assert note is None and "proxykv_axial" in methods
    methods, note = cli._eval_methods(["full", "kvzip"], set())
    assert methods == ("full", "kvzip") and note is None


# ---------------------------------------------------------------------------------------------
# 6. transformers' output quiet unless --verbose (a small real run on the zoo pair)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``proxykv ARGS`` in a fresh process, as a user runs it: without the suite's
    ``TRITON_INTERPRET=1`` (interpreted kernels would take minutes) and on one thread."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "proxykv.cli", *args], env=env,
                            check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_eval_is_quiet_about_loading_and_prints_its_summary_once():
    small = ["eval", "--n", "1", "--length", "64", "--keep-ratios", "0.5", "--methods", "full"]
    result = run_cli(*small, "kvzip")
    assert "Loading weights" not in result.stderr and "Loading weights" not in result.stdout
    assert result.stdout.count("Summary at keep 0.3: ") == 1
    assert result.stdout.count('"keep_ratio": 0.3') == 1
    last = result.stdout.strip().splitlines()[-1]
    summary = json.loads(last.split("Summary at keep 0.3: ", 1)[1])
    assert set(summary["full_accuracy"]) == {*T.TASKS, "overall"}
    assert "Loading weights" in run_cli(*small, "--verbose").stderr


def test_transformers_output_is_restored_after_an_error():
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    with pytest.raises(RuntimeError), cli._transformers_output(verbose=False):
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        raise RuntimeError
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


@pytest.mark.parametrize("command", ["align-train", "demo", "eval"])
def test_commands_that_load_models_have_verbose(command):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    assert any("--verbose" in action.option_strings for action in parser._actions)


# ---------------------------------------------------------------------------------------------
# 7-8. help


def _parsers(parser, name="proxykv"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {command}")


def test_every_flag_of_every_command_has_help():
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {a.dest}" for a in action._choices_actions
                            if not (a.help or "").strip()]
            elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_eval_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for flag in ("--keep-ratios", "--methods", "--length", "--json", "--seed", "--n",
                 "--aligner", "--verbose"):
        assert flag in text
    assert "each in (0, 1)" in text and "proxykv_axial_head_budget" in text


def test_zoo_train_help_gives_the_measured_training_times(capsys):
    with pytest.raises(SystemExit):
        main(["zoo", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "20 + 20" not in text
    minutes = {name: round(json.loads((weights_path(name) / "train_info.json").read_text())[
        "train_seconds"] / 60) for name in ("target", "proxy")}
    assert f"{minutes['target']} minutes for the target" in text
    assert f"{minutes['proxy']} for the proxy" in text
    for kind in ("linear", "axial"):
        seconds = json.loads((WEIGHTS_DIR / f"aligner_{kind}" / "config.json").read_text())[
            "metadata"]["seconds"]
        assert f"{seconds:g} s" in text or f"{math.floor(seconds + 0.5)} s" in text


# ---------------------------------------------------------------------------------------------
# zoo train: folders before training


def test_zoo_train_checks_out_and_models_before_training(tmp_path, no_loading, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = usage_error(["zoo", "train", "--out", str(blocker / "zoo")], capsys)
    assert f"cannot create this folder: {blocker} is a file" in line
    line = usage_error(["zoo", "train", "--out", str(tmp_path / "zoo"), "--models", "target"],
                       capsys)
    assert "the aligners need both models in OUT" in line and "--no-aligners" in line
    line = usage_error(["zoo", "train", "--out", str(tmp_path / "zoo"), "--models", "proxy",
                        "proxy", "--no-aligners"], capsys)
    assert "--models: proxy given more than once" in line
    assert no_loading == []
