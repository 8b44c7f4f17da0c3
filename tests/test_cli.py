"""The console script's commands."""

import os
import re
import subprocess
import sys

import proxykv.kernels  # noqa: F401  (registers the ops)
from proxykv._backend import registered_ops

OPS = sorted(registered_ops())


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "proxykv.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_selfcheck_runs_torch_and_interpreted_triton_and_agrees():
    result = _run("selfcheck")
    assert result.returncode == 0, result.stdout + result.stderr
    for op in OPS:
        for impl in ("torch", "triton"):
            assert re.search(rf"^  {op} +impl={impl} .* ok ", result.stdout, re.M), (op, impl)
    assert f"{2 * len(OPS)}/{2 * len(OPS)} checks agree with the reference" in result.stdout
    assert "MISMATCH" not in result.stdout


def test_selfcheck_without_interpreter_runs_torch_only():
    result = _run("selfcheck", "--no-interpret")
    assert result.returncode == 0, result.stderr
    assert "impl=triton" not in result.stdout and "impl=torch" in result.stdout


def test_backends_lists_each_op():
    result = _run("backends", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == OPS
    assert all(": torch (" in line for line in result.stdout.splitlines())
