"""The console script's commands."""

import os
import subprocess
import sys


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "proxykv.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_selfcheck_runs_torch_and_interpreted_triton_and_agrees():
    result = _run("selfcheck")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pool_scores  impl=torch" in result.stdout
    assert "pool_scores  impl=triton" in result.stdout
    assert "checks agree with the reference" in result.stdout
    assert "MISMATCH" not in result.stdout


def test_selfcheck_without_interpreter_runs_torch_only():
    result = _run("selfcheck", "--no-interpret")
    assert result.returncode == 0, result.stderr
    assert "impl=triton" not in result.stdout and "impl=torch" in result.stdout


def test_backends_lists_each_op():
    result = _run("backends", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pool_scores: torch (")
