"""The backend rule (DESIGN.md) and backend_info."""

import os
import subprocess
import sys

import pytest
import torch

import proxykv
from proxykv import _backend
from proxykv._backend import choose_backend


def test_cpu_without_interpreter_picks_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    choice = choose_backend(None, "cpu")
    assert choice.impl == "torch" and "TRITON_INTERPRET=1 is not set" in choice.reason


def test_cpu_with_interpreter_picks_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend(None, "cpu").impl == "triton"
    assert "interpreted" in choose_backend(None, "cpu").reason


def test_explicit_choices(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_backend("torch", "cpu").impl == "torch"
    with pytest.raises(ValueError, match="impl='triton' cannot run: tensors are on the CPU"):
        choose_backend("triton", "cpu")
    with pytest.raises(ValueError, match="impl must be one of 'triton', 'torch' or None, got 'TRITON'"):
        choose_backend("TRITON", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_cuda_tensors_without_cuda_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA is not available to torch"):
        choose_backend(None, "cuda")
    with pytest.raises(ValueError, match="impl='triton' cannot run: CUDA is not available"):
        choose_backend("triton", "cuda")


def test_meta_device_is_refused():
    with pytest.raises(ValueError, match="device type 'meta'"):
        choose_backend("torch", "meta")


def test_backend_info_reports_every_op_with_a_reason():
    info = proxykv.backend_info("cpu")
    assert "pool_scores" in info
    for choice in info.values():
        assert choice.impl in ("triton", "torch") and choice.reason


def test_switching_the_interpreter_after_kernels_were_defined_raises(monkeypatch):
    monkeypatch.setattr(_backend, "_triton_defined_interpreted", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="defined with TRITON_INTERPRET unset, and it has changed"):
        proxykv.pool_scores(torch.zeros(4), 3, impl="triton")


def test_import_needs_no_gpu_no_interpreter_and_defines_no_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys, torch, proxykv\n"
        "assert not any(m.startswith('proxykv.') and m.endswith('triton_impl') for m in sys.modules), 'kernels imported eagerly'\n"
        "print(proxykv.pool_scores(torch.tensor([1.0, 3.0, 2.0]), 3).tolist())\n"
        "print(proxykv.backend_info('cpu')['pool_scores'].impl)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[3.0,", "3.0,", "3.0]", "torch"]
