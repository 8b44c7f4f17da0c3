"""``proxykv selfcheck``: run everything that has a reference on small inputs and compare.

Checked: every registered kernel op (with each backend that can run here), every built-in
selection policy against its loop oracle, the ``RaggedKVCache`` (compact, append, attend) against
the decode oracle over explicitly gathered rows, and the ``axial`` aligner against its float64
oracle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from proxykv._backend import choose_backend, registered_ops


@dataclass
class SelfCheck:
    """One comparison: ``name`` run with ``impl`` against its reference."""

    name: str
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


# ------------------------------------------------------------------------ non-kernel components
# Each builds its inputs on ``device``, runs the component with ``impl`` and returns
# ``(actual, expected)``; masks are compared as 0/1 so a differing position counts as error 1.

def _distinct_scores(device: torch.device, shape=(2, 3, 2, 40)) -> torch.Tensor:
    """Scores without ties (a permutation), some positions invalid: every policy's answer is
    unique."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.randperm(int(torch.tensor(shape).prod()), generator=generator).float()
    scores = scores.reshape(shape)
    scores[0, :, :, :3] = float("-inf")
    return scores.to(device)


def _policy_cases():
    from proxykv.policies import reference as ref

    budget = 12
    return {
        "topk": ({}, lambda s: ref.topk_reference(s, budget)),
        "head_budget": ({"scope": "layer", "alpha": 0.2},
                        lambda s: ref.head_budget_reference(s, budget, "layer", 0.2)),
        "head_budget(global)": ({"scope": "global", "alpha": 0.5},
                                lambda s: ref.head_budget_reference(s, budget, "global", 0.5)),
        "pooled_window": ({"window": 4, "kernel_size": 5, "mode": "avg"},
                          lambda s: ref.pooled_window_reference(s, budget, 4, 5, "avg")),
        "sink_recent": ({"n_sink": 4}, lambda s: ref.sink_recent_reference(s, budget, 4)),
        "pyramid": ({"beta": 4}, lambda s: ref.pyramid_reference(s, budget, 4)[0]),
    }, budget


def _policy_check(name: str, params: dict, reference: Callable, budget: int):
    def run(device: torch.device, impl: str):
        from proxykv.policies import get_policy

        scores = _distinct_scores(device)
        policy_name = name.split("(")[0]
        if policy_name == "pooled_window":
            params_with_impl = {**params, "impl": impl}
        else:
            params_with_impl = params
        mask = get_policy(policy_name, **params_with_impl).select(scores, budget=budget).to_mask()
        return mask.float(), reference(scores.cpu()).float()
    return run


def _cache_check(device: torch.device, impl: str):
    from proxykv.cache import RaggedKVCache
    from proxykv.kernels.attend.reference import ragged_decode_attention_reference
    from proxykv.selection import Selection

    generator = torch.Generator().manual_seed(2)
    b, layers, h_q, h_kv, t, d = 2, 2, 4, 2, 37, 16
    kv = [(torch.randn(b, h_kv, t, d, generator=generator),
           torch.randn(b, h_kv, t, d, generator=generator)) for _ in range(layers)]
    mask = torch.rand(b, layers, h_kv, t, generator=generator) < 0.4
    mask[0, 0, 0] = False                       # an empty head
    steps = [[(torch.randn(b, h_kv, 1, d, generator=generator),
               torch.randn(b, h_kv, 1, d, generator=generator)) for _ in range(layers)]
             for _ in range(3)]
    q = torch.randn(b, h_q, d, generator=generator)
    cache = RaggedKVCache.from_selection([(k.to(device), v.to(device)) for k, v in kv],
                                         Selection.from_mask(mask.to(device)), reserve_steps=1,
                                         impl=impl)
    for step in steps:                          # the second step repacks
        for layer, (k_new, v_new) in enumerate(step):
            cache.append(layer, k_new.to(device), v_new.to(device))
    actual = cache.attend(layers - 1, q.to(device), impl=impl)

    # The oracle: the kept rows of the last layer in order, then the appended rows.
    k_full, v_full = kv[-1]
    k_rows, v_rows, bounds = [], [], [0]
    for batch in range(b):
        for head in range(h_kv):
            kept = mask[batch, -1, head].nonzero().flatten()
            appended_k = torch.cat([step[-1][0][batch, head] for step in steps])
            appended_v = torch.cat([step[-1][1][batch, head] for step in steps])
            k_rows.append(torch.cat([k_full[batch, head, kept], appended_k]))
            v_rows.append(torch.cat([v_full[batch, head, kept], appended_v]))
            bounds.append(bounds[-1] + k_rows[-1].shape[0])
    expected = ragged_decode_attention_reference(
        q, torch.cat(k_rows), torch.cat(v_rows), torch.tensor(bounds, dtype=torch.int32))
    return actual, expected


def _axial_check(device: torch.device, impl: str):
    from proxykv.align import get_aligner
    from proxykv.align.reference import axial_reference

    torch.manual_seed(3)
    mapper = get_aligner("axial", proxy_shape=(3, 2), target_shape=(5, 4)).to(device)
    with torch.no_grad():  # an untrained mapper's output layers are zero: give every weight a value
        for parameter in mapper.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        scores = torch.randn(2, 3, 2, 70, device=device)
        scores[1, ..., 60:] = float("-inf")
        actual = mapper(scores)
    return actual, axial_reference(mapper, scores).float()


def _component_checks() -> list[tuple[str, Callable, tuple[str, ...]]]:
    """``(name, run(device, impl), impls it takes)`` of every non-kernel component checked."""
    cases, budget = _policy_cases()
    checks = []
    for name, (params, reference) in cases.items():
        impls = ("torch", "triton") if name == "pooled_window" else ("torch",)
        checks.append((f"policy:{name}", _policy_check(name, params, reference, budget), impls))
    checks.append(("RaggedKVCache", _cache_check, ("torch", "triton")))
    checks.append(("aligner:axial", _axial_check, ("torch",)))
    return checks


def run_selfcheck(
    device: str | torch.device = "cpu",
    impls: list[str] | None = None,
    tolerance: float = 1e-4,
) -> list[SelfCheck]:
    """Run every registered op and every component above with each of ``impls`` (default: all
    runnable here) that the component takes."""
    import proxykv.kernels  # noqa: F401  (registers the ops)

    device = torch.device(device)
    impls = runnable_impls(device) if impls is None else impls
    default = choose_backend(None, device)

    def reason(impl: str) -> str:
        return default.reason if impl == default.impl else "requested explicitly"

    results = []
    for name, spec in sorted(registered_ops().items()):
        for impl in impls:
            args, kwargs = spec.example(device)
            start = time.perf_counter()
            actual = spec.api(*args, impl=impl, **kwargs)
            seconds = time.perf_counter() - start
            error = _max_abs_error(actual, spec.reference(*args, **kwargs))
            results.append(SelfCheck(name, impl, reason(impl), error, seconds, error <= tolerance))
    for name, run, takes in _component_checks():
        for impl in (i for i in impls if i in takes):
            start = time.perf_counter()
            actual, expected = run(device, impl)
            seconds = time.perf_counter() - start
            error = _max_abs_error(actual, expected)
            results.append(SelfCheck(name, impl, reason(impl), error, seconds, error <= tolerance))
    return results
