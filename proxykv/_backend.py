"""Backend selection for every kernel op — the one place that decides Triton vs torch.

Rule (DESIGN.md, "Backends"):

* ``impl=None``: CUDA tensors run the Triton kernel; CPU tensors run the Triton kernel under the
  interpreter when ``TRITON_INTERPRET=1``, and the torch implementation otherwise.
* ``impl="triton"`` / ``impl="torch"``: that implementation or a ``ValueError`` saying why it cannot
  run. Nothing falls back silently.

Triton decides at *definition* time (``@triton.jit``) whether a kernel is compiled or interpreted,
so the modules holding kernels are imported lazily, on the first Triton dispatch. The mode they were
defined in is remembered; switching ``TRITON_INTERPRET`` afterwards raises instead of running a
kernel in the wrong mode.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

IMPLS = ("triton", "torch")


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value in the environment (read now)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class OpSpec:
    """How to run one op: its public function, its torch implementation and where its Triton
    launcher lives.

    ``triton_launcher`` is ``"module:function"`` and is imported only when first needed.
    ``example`` builds small inputs ``(args, kwargs)`` on a device, for ``proxykv selfcheck``:
    ``api(*args, impl=..., **kwargs)`` is compared with ``reference(*args, **kwargs)``.
    """

    name: str
    api: Callable[..., Any]
    torch_impl: Callable[..., Any]
    triton_launcher: str
    reference: Callable[..., Any]
    example: Callable[[torch.device], tuple[tuple, dict]]


@dataclass(frozen=True)
class BackendChoice:
    impl: str
    reason: str


_OPS: dict[str, OpSpec] = {}
_triton_defined_interpreted: bool | None = None


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in _OPS and _OPS[spec.name] is not spec:
        raise ValueError(f"op {spec.name!r} is already registered")
    _OPS[spec.name] = spec
    return spec


def registered_ops() -> dict[str, OpSpec]:
    """All ops registered so far (importing ``proxykv.kernels`` registers every kernel op)."""
    return dict(_OPS)


def _triton_blocker(device: torch.device) -> str | None:
    """Why the Triton path cannot run on ``device`` now, or None when it can."""
    if not triton_installed():
        return "triton is not installed"
    if device.type == "cuda":
        if interpreter_enabled() or torch.cuda.is_available():
            return None
        return "CUDA is not available to torch"
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton needs a GPU)"
    return f"Triton does not support device type {device.type!r}"


def choose_backend(impl: str | None, device: torch.device | str) -> BackendChoice:
    """Apply the backend rule for tensors on ``device``; raises ``ValueError`` if ``impl`` can't run."""
    device = torch.device(device)
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of 'triton', 'torch' or None, got {impl!r}")
    if impl == "torch":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"impl='torch' does not support device type {device.type!r}")
        return BackendChoice("torch", "requested explicitly")
    blocker = _triton_blocker(device)
    if impl == "triton":
        if blocker is not None:
            raise ValueError(f"impl='triton' cannot run: {blocker}")
        return BackendChoice("triton", "requested explicitly")
    if device.type == "cuda":
        if blocker is not None:
            raise ValueError(f"no backend can run on {device}: {blocker}")
        return BackendChoice("triton", "CUDA tensors")
    if device.type == "cpu":
        if blocker is None:
            return BackendChoice("triton", "CPU tensors with TRITON_INTERPRET=1 (interpreted)")
        return BackendChoice("torch", f"CPU tensors: {blocker}")
    raise ValueError(f"no backend supports device type {device.type!r}")


def _load_triton_launcher(spec: OpSpec) -> Callable[..., Any]:
    global _triton_defined_interpreted
    now_interpreted = interpreter_enabled()
    if _triton_defined_interpreted is None:
        _triton_defined_interpreted = now_interpreted
    elif _triton_defined_interpreted != now_interpreted:
        was = "set" if _triton_defined_interpreted else "unset"
        raise ValueError(
            f"proxykv's Triton kernels were defined with TRITON_INTERPRET {was}, and it has changed "
            "since; Triton fixes the mode when kernels are defined, so set TRITON_INTERPRET before "
            "the first Triton call in the process"
        )
    module_name, function_name = spec.triton_launcher.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def dispatch(op: str, impl: str | None, device: torch.device) -> tuple[str, Callable[..., Any]]:
    """Return ``(chosen impl, callable)`` for ``op`` on ``device`` following the backend rule."""
    spec = _OPS[op]
    choice = choose_backend(impl, device)
    if choice.impl == "torch":
        return "torch", spec.torch_impl
    return "triton", _load_triton_launcher(spec)


def backend_info(device: torch.device | str | None = None) -> dict[str, BackendChoice]:
    """Which backend each registered op would use for tensors on ``device`` with ``impl=None``, and why.

    ``device`` defaults to ``cuda`` when CUDA is available, else ``cpu``.
    """
    import proxykv.kernels  # noqa: F401  (registers the ops)

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {}
    for name in sorted(_OPS):
        try:
            info[name] = choose_backend(None, device)
        except ValueError as error:
            info[name] = BackendChoice("none", str(error))
    return info
