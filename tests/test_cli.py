"""The console script's commands."""

import os
import re
import subprocess
import sys

import pytest
import torch

import proxykv
import proxykv.kernels  # registers the ops
from proxykv._backend import registered_ops
from proxykv.cli import main

OPS = sorted(registered_ops())
COMPONENTS = ["policy:topk", "policy:head_budget", "policy:head_budget(global)",
              "policy:pooled_window", "policy:sink_recent", "policy:pyramid", "RaggedKVCache",
              "aligner:axial"]


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "proxykv.cli", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=600)


def _lines(result):
    return [line for line in result.stdout.splitlines() if line.startswith("  ")]


def test_selfcheck_covers_ops_policies_cache_and_aligner_with_both_backends():
    result = _run("selfcheck")
    assert result.returncode == 0, result.stdout + result.stderr
    for op in OPS + ["policy:pooled_window", "RaggedKVCache"]:
        for impl in ("torch", "triton"):
            assert re.search(rf"^  {re.escape(op)} +impl={impl} .* ok ", result.stdout,
                             re.MULTILINE), (op, impl)
    for component in COMPONENTS:
        assert re.search(rf"^  {re.escape(component)} +impl=torch .* ok ", result.stdout,
                         re.MULTILINE), component
    total = len(_lines(result))
    assert total == 2 * len(OPS) + len(COMPONENTS) + 2
    assert f"{total}/{total} checks agree with the reference" in result.stdout
    assert "MISMATCH" not in result.stdout


def test_selfcheck_reports_a_mismatch_with_exit_code_1(monkeypatch, capsys):
    from proxykv import selfcheck

    broken = selfcheck.SelfCheck("policy:topk", "torch", "requested explicitly", 1.0, 0.0, False)
    monkeypatch.setattr(selfcheck, "run_selfcheck", lambda device: [broken])
    assert main(["selfcheck", "--no-interpret"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_selfcheck_without_interpreter_runs_torch_only():
    result = _run("selfcheck", "--no-interpret")
    assert result.returncode == 0, result.stderr
    assert "impl=triton" not in result.stdout and "impl=torch" in result.stdout


def test_backends_lists_each_op():
    result = _run("backends", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == OPS
    assert all(": torch (" in line for line in result.stdout.splitlines())


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"proxykv {proxykv.__version__}"


def test_help_describes_commands_and_device(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "selfcheck" in text and "backends" in text and "``" not in text
    for command in ("selfcheck", "backends"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert re.search(r"--device DEVICE +cpu, cuda or cuda:N", capsys.readouterr().out)


BAD_DEVICES = [
    (["backends", "--device", "gpu"], "'gpu' is not a device"),
    (["selfcheck", "--device", "cpux"], "'cpux' is not a device"),
    (["selfcheck", "--device", "meta"], "proxykv runs on cpu or cuda"),
    ([], "required: COMMAND"),
]
if not torch.cuda.is_available():
    BAD_DEVICES += [(["selfcheck", "--device", "cuda"], "CUDA is not available"),
                    (["backends", "--device", "cuda"], "CUDA is not available")]


@pytest.mark.parametrize("argv,message", BAD_DEVICES, ids=lambda a: " ".join(a) if
                         isinstance(a, list) else None)
def test_bad_arguments_give_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], captured.err
