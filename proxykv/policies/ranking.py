"""The one ranking primitive every policy uses: keep the ``count`` best entries of each row.

Order: higher score first; equal scores go to the **lower index** (position, or flattened
``head * T + position`` when a row spans several heads), so results are reproducible and nested:
the kept set for a count is a subset of the kept set for any larger count. ``-inf`` entries are
never kept, so a row keeps ``min(count, number of finite-or-+inf entries)``.
"""

from __future__ import annotations

import torch

from proxykv._validation import INDEX_DTYPES, as_score_tensor, check_same_device, check_tensor


def top_count_mask(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool ``[R, N]``: the ``counts[r]`` best entries of each row of ``rows [R, N]``.

    ``rows``: float32 (or float64, read as float32), every dimension >= 1, no NaN (not checked:
    it costs a sync). ``counts``: int32/int64 ``[R]``, ``>= 0``, on the device of ``rows``.
    Vectorised over rows (one ``topk`` for all of them, then comparisons against each row's cut
    value); syncs the device once to size the ``topk``.
    """
    rows = as_score_tensor("rows", rows, ndim=2, layout="[R, N]")
    check_tensor("counts", counts, dtypes=INDEX_DTYPES)
    check_same_device(rows=rows, counts=counts)
    if counts.shape != rows.shape[:1]:
        raise ValueError(f"counts must have shape [R] = {tuple(rows.shape[:1])}, got "
                         f"{tuple(counts.shape)}")
    valid = rows > float("-inf")
    counts = torch.minimum(counts.long(), valid.sum(-1))
    largest, smallest = torch.stack([counts.max(), counts.min()]).tolist()
    if smallest < 0:
        raise ValueError(f"counts must be >= 0, got a minimum of {smallest}")
    if largest == 0:
        return torch.zeros_like(valid)
    if largest == smallest:
        cut = rows.topk(largest, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    else:
        best = rows.topk(largest, dim=-1, sorted=True).values
        cut = best.gather(-1, (counts - 1).clamp(min=0).unsqueeze(-1))
        cut = cut.masked_fill((counts == 0).unsqueeze(-1), float("inf"))
    above = rows > cut
    at_cut = rows == cut
    # How many entries equal to the cut value still fit, taken from the lowest index up.
    room = counts.unsqueeze(-1) - above.sum(-1, keepdim=True)
    tie_rank = at_cut.cumsum(-1, dtype=torch.int32)
    # A cut value is always a kept entry's score, so it is > -inf and no invalid entry gets in.
    return above | (at_cut & (tie_rank <= room))
