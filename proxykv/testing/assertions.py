"""Comparison helpers with a per-dtype tolerance table and readable failure messages."""

from __future__ import annotations

import torch

# (atol, rtol) for results computed from inputs of the given dtype; fp32 accumulation throughout.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 atol: float | None = None, rtol: float | None = None, name: str = "output") -> None:
    """Elementwise ``|a - e| <= atol + rtol * |e|`` with tolerances from ``TOLERANCES[dtype]``.

    Infinities must match exactly (same sign, same positions); a NaN in ``actual`` fails (unless
    ``expected`` has NaN at the same place), which is how NaN-poisoned output catches unwritten
    elements. The message gives the count of bad elements and the worst one's index and values.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected "
                             f"{tuple(expected.shape)}")
    table_atol, table_rtol = TOLERANCES.get(dtype if dtype is not None else expected.dtype,
                                            TOLERANCES[torch.float32])
    atol = table_atol if atol is None else atol
    rtol = table_rtol if rtol is None else rtol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    both_nan = a.isnan() & e.isnan()
    same_inf = a.isinf() & e.isinf() & (a == e)
    finite = a.isfinite() & e.isfinite()
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    ok = both_nan | same_inf | (finite & (diff <= atol + rtol * e.abs()))
    if bool(ok.all()):
        return
    bad = ~ok
    n_bad = int(bad.sum())
    n_nan = int((a.isnan() & ~e.isnan()).sum())
    score = torch.where(bad, torch.where(finite, diff, torch.full_like(diff, float("inf"))),
                        torch.full_like(diff, -1.0))
    worst = tuple(int(i) for i in torch.unravel_index(score.argmax(), a.shape))
    raise AssertionError(
        f"{name}: {n_bad} of {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
        f"{n_nan} NaN where a value was expected; worst at {worst}: got {a[worst].item()!r}, "
        f"expected {e[worst].item()!r}"
    )


def assert_same_topk_scores(scores: torch.Tensor, indices_a: torch.Tensor,
                            indices_b: torch.Tensor, *, name: str = "top-k") -> None:
    """Two top-k index sets along the last axis are equivalent up to ties.

    Compares the sorted scores of what each chose, not the raw indices, so equal scores may be
    picked in either order. Also checks each set has no repeats.
    """
    if indices_a.shape != indices_b.shape:
        raise AssertionError(f"{name}: index shapes differ: {tuple(indices_a.shape)} vs "
                             f"{tuple(indices_b.shape)}")
    for label, indices in (("first", indices_a), ("second", indices_b)):
        ordered = indices.sort(dim=-1).values
        if indices.shape[-1] > 1 and bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise AssertionError(f"{name}: the {label} index set repeats a position")
    chosen_a = scores.gather(-1, indices_a.long()).sort(dim=-1).values
    chosen_b = scores.gather(-1, indices_b.long()).sort(dim=-1).values
    if not torch.equal(chosen_a, chosen_b):
        where = (chosen_a != chosen_b).nonzero()[0].tolist()
        raise AssertionError(f"{name}: chosen scores differ beyond ties, first at {where}: "
                             f"{chosen_a[tuple(where)].item()} vs {chosen_b[tuple(where)].item()}")


def usage_error(main, argv, capsys) -> str:
    """The one line the command line ``main(argv)`` writes to stderr when it exits with code 2
    (pytest's ``capsys``): nothing on stdout, no traceback."""
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "error:" in lines[0], captured.err
    assert "Traceback" not in captured.err
    return lines[0]
