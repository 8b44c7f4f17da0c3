"""``proxykv selfcheck``: run every registered op on small inputs and compare with its reference."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from proxykv._backend import choose_backend, registered_ops


@dataclass
class OpCheck:
    op: str
    impl: str
    reason: str
    max_abs_error: float
    seconds: float
    ok: bool


def _max_abs_error(actual, expected) -> float:
    if isinstance(actual, (tuple, list)):
        return max((_max_abs_error(a, e) for a, e in zip(actual, expected)), default=0.0)
    actual, expected = actual.float().cpu(), expected.float().cpu()
    if actual.shape != expected.shape:
        return float("inf")
    same_inf = (actual == expected) | (actual.isnan() & expected.isnan())
    diff = torch.where(same_inf, 0.0, (actual - expected).abs())
    return float(diff.max()) if diff.numel() else 0.0


def runnable_impls(device: torch.device) -> list[str]:
    """The backends that can run on ``device`` in this process, in the order selfcheck runs them."""
    impls = []
    for impl in ("torch", "triton"):
        try:
            choose_backend(impl, device)
        except ValueError:
            continue
        impls.append(impl)
    return impls


def run_selfcheck(
    device: str | torch.device = "cpu",
    impls: list[str] | None = None,
    tolerance: float = 1e-4,
) -> list[OpCheck]:
    """Run every registered op with each of ``impls`` (default: all runnable here)."""
    import proxykv.kernels  # noqa: F401  (registers the ops)

    device = torch.device(device)
    impls = runnable_impls(device) if impls is None else impls
    default = choose_backend(None, device)
    results = []
    for name, spec in sorted(registered_ops().items()):
        for impl in impls:
            args, kwargs = spec.example(device)
            start = time.perf_counter()
            actual = spec.api(*args, impl=impl, **kwargs)
            seconds = time.perf_counter() - start
            expected = spec.reference(*args, **kwargs)
            error = _max_abs_error(actual, expected)
            reason = default.reason if impl == default.impl else "requested explicitly"
            results.append(OpCheck(name, impl, reason, error, seconds, error <= tolerance))
    return results
