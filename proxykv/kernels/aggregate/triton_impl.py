"""Triton kernels for the aggregation ops.

``aggregate_scores_fwd_kernel`` is the fused group-reduce → pool → row-statistic kernel; the other
ops are its special cases (``reduce_heads``: no pooling, no statistic; the first pass of
``normalize_scores``: a group of one, no pooling, statistic only). One program handles one tile of
``BLOCK_T`` positions of one output row. Pooling walks the window offset by offset and reduces the
group's heads at each shifted tile; those re-reads hit L1/L2, so DRAM traffic stays one read of the
scores (plus a halo of ``kernel_size // 2`` positions per tile) and one write of the result.

Row normalisation needs the whole row's sum or max, and a 128k-token row does not fit on chip, so
it takes two launches: the first writes, per (row, tile), the partial statistic of its tile and
its count of ``+inf`` entries to two small ``[rows, tiles]`` buffers (no atomics: the result is
deterministic); the second (``normalize_scores_fwd_kernel``) folds the row's partials and scales
its tile — or, in a row that holds ``+inf``, writes the row's limit (see ``api.py``). In
``aggregate_scores`` the second pass rescales the (group-size times smaller) output in place.

``combine_layers_fwd_kernel``: one program per (tile, batch·head, block of output layers) keeps a
``[BLOCK_OUT, BLOCK_T]`` accumulator and walks the input layers once, so each input score is read
once for up to ``MAX_BLOCK_OUT`` output layers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from proxykv.kernels._compile import CompileSpec
from proxykv.kernels._layout import (
    leading_dims_as_rows,
    row_and_tile,
    row_start,
    rows_by_tiles_grid,
)

MAX_BLOCK_T = 1024
MAX_GROUP_BLOCK = 8
MAX_BLOCK_OUT = 64
COMBINE_TILE_ELEMENTS = 4096
BLOCK_TILES = 128

POOL_CODES = {None: 0, "max": 1, "avg": 2}
STAT_CODES = {"none": 0, "sum": 1, "max": 2}


@triton.jit
def _reduce_group(row_ptr, positions, inside, group_size, stride_head, stride_t,
                  GROUP_MAX: tl.constexpr, GROUP_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    """The group's reduced score at ``positions`` (``-inf`` outside ``inside``)."""
    members = tl.arange(0, GROUP_BLOCK)
    if GROUP_MAX:
        reduced = tl.full([BLOCK_T], float("-inf"), tl.float32)
    else:
        total = tl.zeros([BLOCK_T], tl.float32)
        count = tl.zeros([BLOCK_T], tl.float32)
    for first in range(0, group_size, GROUP_BLOCK):
        heads = first + members
        mask = (heads < group_size)[:, None] & inside[None, :]
        x = tl.load(row_ptr + heads[:, None] * stride_head + positions[None, :] * stride_t,
                    mask=mask, other=float("-inf"))
        if GROUP_MAX:
            reduced = tl.maximum(reduced, tl.max(x, axis=0))
        else:
            valid = x != float("-inf")
            total += tl.sum(tl.where(valid, x, 0.0), axis=0)
            count += tl.sum(valid.to(tl.float32), axis=0)
    if not GROUP_MAX:
        reduced = tl.where(count > 0.0, total / tl.maximum(count, 1.0), float("-inf"))
    return reduced


@triton.jit(do_not_specialize=["length", "group_size", "half_window", "n_tiles"])
def aggregate_scores_fwd_kernel(
    scores_ptr,
    out_ptr,
    partials_ptr,
    n_infinite_ptr,
    rows_1,
    rows_2,
    stride_r0,
    stride_r1,
    stride_r2,
    stride_head,
    stride_t,
    length,
    group_size,
    half_window,
    n_tiles,
    GROUP_MAX: tl.constexpr,
    POOL: tl.constexpr,
    STAT: tl.constexpr,
    STORE_OUT: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # POOL: 0 none, 1 max, 2 avg over the window's valid entries. STAT: 0 none, 1 sum|x|, 2 max|x|
    # (each with the tile's count of +inf entries).
    row, tile = row_and_tile(n_tiles)
    row_ptr = row_start(scores_ptr, row, rows_1, rows_2, stride_r0, stride_r1, stride_r2)

    positions = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = positions < length
    centre = _reduce_group(row_ptr, positions, in_row, group_size, stride_head, stride_t,
                           GROUP_MAX, GROUP_BLOCK, BLOCK_T)
    if POOL == 0:
        result = centre
    else:
        centre_valid = centre != float("-inf")
        if POOL == 1:
            pooled = centre
        else:
            pooled = tl.where(centre_valid, centre, 0.0)
            valid_count = centre_valid.to(tl.float32)
        for offset in range(1, half_window + 1):
            for side in tl.static_range(2):
                shifted = positions + (2 * side - 1) * offset
                inside = in_row & (shifted >= 0) & (shifted < length)
                x = _reduce_group(row_ptr, shifted, inside, group_size, stride_head, stride_t,
                                  GROUP_MAX, GROUP_BLOCK, BLOCK_T)
                if POOL == 1:
                    pooled = tl.maximum(pooled, x)
                else:
                    valid = x != float("-inf")
                    pooled += tl.where(valid, x, 0.0)
                    valid_count += valid.to(tl.float32)
        if POOL == 2:
            pooled = pooled / tl.maximum(valid_count, 1.0)
        result = tl.where(centre_valid, pooled, float("-inf"))

    if STAT != 0:
        magnitude = tl.where(result != float("-inf"), tl.abs(result), 0.0)
        if STAT == 1:
            partial = tl.sum(magnitude, axis=0)
        else:
            partial = tl.max(magnitude, axis=0)
        tl.store(partials_ptr + row * n_tiles + tile, partial)
        n_infinite = tl.sum((result == float("inf")).to(tl.int32), axis=0)
        tl.store(n_infinite_ptr + row * n_tiles + tile, n_infinite)
    if STORE_OUT:
        tl.store(out_ptr + row * length + positions, result, mask=in_row)


@triton.jit(do_not_specialize=["length", "n_tiles"])
def normalize_scores_fwd_kernel(
    src_ptr,
    out_ptr,
    partials_ptr,
    n_infinite_ptr,
    rows_1,
    rows_2,
    stride_r0,
    stride_r1,
    stride_r2,
    stride_t,
    length,
    n_tiles,
    IS_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
):
    row, tile = row_and_tile(n_tiles)
    # Every tile of the row folds the row's partials itself: a few hundred bytes, cached, and it
    # saves a launch.
    folded = tl.zeros([BLOCK_TILES], tl.float32)
    folded_infinite = tl.zeros([BLOCK_TILES], tl.int32)
    for first in range(0, n_tiles, BLOCK_TILES):
        tiles = first + tl.arange(0, BLOCK_TILES)
        partial = tl.load(partials_ptr + row * n_tiles + tiles, mask=tiles < n_tiles, other=0.0)
        if IS_SUM:
            folded += partial
        else:
            folded = tl.maximum(folded, partial)
        folded_infinite += tl.load(n_infinite_ptr + row * n_tiles + tiles, mask=tiles < n_tiles,
                                   other=0)
    divisor = tl.sum(folded, axis=0) if IS_SUM else tl.max(folded, axis=0)
    divisor = tl.where(divisor > 0.0, divisor, 1.0)
    n_infinite = tl.sum(folded_infinite, axis=0)

    row_ptr = row_start(src_ptr, row, rows_1, rows_2, stride_r0, stride_r1, stride_r2)
    positions = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = positions < length
    x = tl.load(row_ptr + positions * stride_t, mask=in_row, other=float("-inf"))
    scaled = tl.where(x != float("-inf"), x / divisor, float("-inf"))
    # A row holding +inf has divisor +inf: it takes its limit instead, the +inf entries sharing
    # (sum) or reaching (max) 1, the finite ones 0.
    if IS_SUM:
        share = 1.0 / tl.maximum(n_infinite, 1).to(tl.float32)
    else:
        share = 1.0
    limit = tl.where(x == float("inf"), share, tl.where(x != float("-inf"), 0.0, float("-inf")))
    scaled = tl.where(n_infinite > 0, limit, scaled)
    tl.store(out_ptr + row * length + positions, scaled, mask=in_row)


@triton.jit(do_not_specialize=["length", "layers_in", "layers_out"])
def combine_layers_fwd_kernel(
    scores_ptr,
    weights_ptr,
    out_ptr,
    heads,
    stride_b,
    stride_l,
    stride_h,
    stride_t,
    stride_w_out,
    stride_w_in,
    layers_in,
    layers_out,
    length,
    BLOCK_OUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    batch_head, tile = row_and_tile(tl.cdiv(length, BLOCK_T))
    out_block = tl.program_id(1).to(tl.int64)
    batch = batch_head // heads
    head = batch_head % heads
    positions = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = positions < length
    targets = out_block * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    is_target = targets < layers_out

    source_ptr = scores_ptr + batch * stride_b + head * stride_h + positions * stride_t
    combined = tl.zeros([BLOCK_OUT, BLOCK_T], tl.float32)
    poisoned = tl.zeros([BLOCK_OUT, BLOCK_T], tl.int1)
    for layer in range(layers_in):
        x = tl.load(source_ptr + layer * stride_l, mask=in_row, other=0.0)
        weight = tl.load(weights_ptr + targets * stride_w_out + layer * stride_w_in,
                         mask=is_target, other=0.0)
        invalid = x == float("-inf")
        combined += weight[:, None] * tl.where(invalid, 0.0, x)[None, :]
        # A layer with weight 0 does not take part, so its -inf does not poison the output.
        poisoned = poisoned | ((weight != 0.0)[:, None] & invalid[None, :])
    combined = tl.where(poisoned, float("-inf"), combined)
    out_offsets = ((batch * layers_out + targets[:, None]) * heads + head) * length \
        + positions[None, :]
    tl.store(out_ptr + out_offsets, combined, mask=is_target[:, None] & in_row[None, :])


def _block_t(length: int) -> int:
    return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(length)))


def _group_leaders(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., H_kv, T]`` view of the first head of every group (the rows the kernel walks)."""
    grouped = scores.unflatten(-2, (scores.shape[-2] // group_size, group_size))
    return grouped.select(-2, 0)


class _RowStatistics(NamedTuple):
    """What the first pass leaves for the normalisation pass: per (row, tile) the partial sum/max
    of magnitudes and the count of ``+inf`` entries (``[rows, tiles]`` each), and the tiling."""

    partials: torch.Tensor
    n_infinite: torch.Tensor
    block_t: int
    n_tiles: int


def _launch_aggregate(scores: torch.Tensor, group_size: int, group_mode: str,
                      pool_kernel_size: int, pool_mode: str | None, stat: str,
                      store_out: bool) -> tuple[torch.Tensor | None, _RowStatistics]:
    """First pass; returns ``(out, statistics)``. Without ``store_out`` no output is allocated
    (``out`` is None); with ``stat == "none"`` the statistics buffers are unused 1-element
    placeholders."""
    leaders = _group_leaders(scores, group_size)
    length = scores.shape[-1]
    block_t = _block_t(length)
    n_tiles = triton.cdiv(length, block_t)
    n_rows = leaders.numel() // length
    stat_shape = (n_rows, n_tiles) if stat != "none" else (1,)
    statistics = _RowStatistics(
        partials=torch.empty(stat_shape, dtype=torch.float32, device=scores.device),
        n_infinite=torch.empty(stat_shape, dtype=torch.int32, device=scores.device),
        block_t=block_t, n_tiles=n_tiles)
    out = torch.empty(leaders.shape, dtype=torch.float32, device=scores.device) \
        if store_out else None
    if n_rows == 0:
        return out, statistics
    (_, rows_1, rows_2), (stride_r0, stride_r1, stride_r2) = leading_dims_as_rows(leaders)
    pooling = pool_kernel_size > 1
    aggregate_scores_fwd_kernel[rows_by_tiles_grid(n_rows, n_tiles)](
        scores_ptr=scores,
        out_ptr=out if store_out else statistics.partials,
        partials_ptr=statistics.partials,
        n_infinite_ptr=statistics.n_infinite,
        rows_1=rows_1,
        rows_2=rows_2,
        stride_r0=stride_r0,
        stride_r1=stride_r1,
        stride_r2=stride_r2,
        stride_head=scores.stride(-2),
        stride_t=scores.stride(-1),
        length=length,
        group_size=group_size,
        half_window=pool_kernel_size // 2,
        n_tiles=n_tiles,
        GROUP_MAX=group_mode == "max",
        POOL=POOL_CODES[pool_mode if pooling else None],
        STAT=STAT_CODES[stat],
        STORE_OUT=store_out,
        GROUP_BLOCK=min(MAX_GROUP_BLOCK, triton.next_power_of_2(group_size)),
        BLOCK_T=block_t,
        num_warps=4,
    )
    return out, statistics


def _launch_normalize(src: torch.Tensor, out: torch.Tensor, statistics: _RowStatistics,
                      mode: str) -> None:
    length = src.shape[-1]
    n_rows = out.numel() // length
    if n_rows == 0:
        return
    (_, rows_1, rows_2), (stride_r0, stride_r1, stride_r2) = leading_dims_as_rows(src)
    normalize_scores_fwd_kernel[rows_by_tiles_grid(n_rows, statistics.n_tiles)](
        src_ptr=src,
        out_ptr=out,
        partials_ptr=statistics.partials,
        n_infinite_ptr=statistics.n_infinite,
        rows_1=rows_1,
        rows_2=rows_2,
        stride_r0=stride_r0,
        stride_r1=stride_r1,
        stride_r2=stride_r2,
        stride_t=src.stride(-1),
        length=length,
        n_tiles=statistics.n_tiles,
        IS_SUM=mode == "sum",
        BLOCK_T=statistics.block_t,
        BLOCK_TILES=BLOCK_TILES,
        num_warps=4,
    )


def reduce_heads_triton(scores: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    out, _ = _launch_aggregate(scores, group_size, mode, 1, None, "none", store_out=True)
    return out


def normalize_scores_triton(scores: torch.Tensor, mode: str) -> torch.Tensor:
    # As a group of one head, [..., T] is its own row view: insert the head axis.
    as_groups = scores.unsqueeze(-2)
    if mode == "none":
        out, _ = _launch_aggregate(as_groups, 1, "max", 1, None, "none", store_out=True)
        return out.squeeze(-2)
    _, statistics = _launch_aggregate(as_groups, 1, "max", 1, None, mode, store_out=False)
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    _launch_normalize(scores, out, statistics, mode)
    return out


def aggregate_scores_triton(scores: torch.Tensor, group_size: int, group_mode: str,
                            pool_kernel_size: int, pool_mode: str,
                            normalize: str) -> torch.Tensor:
    out, statistics = _launch_aggregate(
        scores, group_size, group_mode, pool_kernel_size, pool_mode, normalize, store_out=True)
    if normalize != "none":
        _launch_normalize(out, out, statistics, normalize)
    return out


def _combine_blocks(length: int, layers_out: int) -> tuple[int, int]:
    block_out = min(MAX_BLOCK_OUT, triton.next_power_of_2(layers_out))
    block_t = min(MAX_BLOCK_T, max(16, COMBINE_TILE_ELEMENTS // block_out),
                  max(16, triton.next_power_of_2(length)))
    return block_out, block_t


def combine_grid(batch: int, heads: int, length: int, layers_out: int) -> tuple[int, int]:
    """The launch grid of ``combine_layers_fwd_kernel``: (batch × head) rows of tiles on axis 0,
    blocks of output layers on axis 1 (a model's depth at most, far below its 65,535)."""
    block_out, block_t = _combine_blocks(length, layers_out)
    return (*rows_by_tiles_grid(batch * heads, triton.cdiv(length, block_t)),
            triton.cdiv(layers_out, block_out))


def combine_layers_triton(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    batch, layers_in, heads, length = scores.shape
    layers_out = weights.shape[0]
    out = torch.empty((batch, layers_out, heads, length), dtype=torch.float32,
                      device=scores.device)
    if out.numel() == 0:
        return out
    block_out, block_t = _combine_blocks(length, layers_out)
    combine_layers_fwd_kernel[combine_grid(batch, heads, length, layers_out)](
        scores_ptr=scores,
        weights_ptr=weights,
        out_ptr=out,
        heads=heads,
        stride_b=scores.stride(0),
        stride_l=scores.stride(1),
        stride_h=scores.stride(2),
        stride_t=scores.stride(3),
        stride_w_out=weights.stride(0),
        stride_w_in=weights.stride(1),
        layers_in=layers_in,
        layers_out=layers_out,
        length=length,
        BLOCK_OUT=block_out,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return out


_AGGREGATE_SIGNATURE = {
    "scores_ptr": "*fp32", "out_ptr": "*fp32", "partials_ptr": "*fp32", "n_infinite_ptr": "*i32",
    "rows_1": "i32", "rows_2": "i32",
    "stride_r0": "i64", "stride_r1": "i64", "stride_r2": "i64",
    "stride_head": "i64", "stride_t": "i64",
    "length": "i32", "group_size": "i32", "half_window": "i32", "n_tiles": "i32",
}


def _aggregate_spec(group_max: bool, pool: str | None, stat: str, store_out: bool,
                    group_block: int, block_t: int) -> CompileSpec:
    name = (f"aggregate_scores_fwd_kernel[group={'max' if group_max else 'mean'},"
            f"GROUP_BLOCK={group_block},pool={pool or 'none'},stat={stat},"
            f"{'store' if store_out else 'stat_only'},BLOCK_T={block_t}]")
    return CompileSpec(
        name=name, kernel=aggregate_scores_fwd_kernel, signature=_AGGREGATE_SIGNATURE,
        constexprs={"GROUP_MAX": group_max, "POOL": POOL_CODES[pool], "STAT": STAT_CODES[stat],
                    "STORE_OUT": store_out, "GROUP_BLOCK": group_block, "BLOCK_T": block_t})


# A covering set of the constexpr combinations the launchers reach — reduce_heads (no pool, no
# statistic) for every GROUP_BLOCK, the statistics pass of normalize_scores (one head, statistic
# only), pool_scores (one head, pooling, no statistic) and aggregate_scores (every pool ×
# statistic) — at the largest and smallest tiles.
_AGGREGATE_VARIANTS = [
    *[(group_max, None, "none", True, group_block, 1024)
      for group_max in (False, True) for group_block in (1, 2, 4, 8)],
    *[(True, pool, "none", True, 1, block_t) for pool in ("max", "avg") for block_t in (16, 1024)],
    (False, None, "none", True, 4, 16),
    (True, None, "sum", False, 1, 16),
    (True, None, "max", False, 1, 1024),
    *[(False, pool, stat, True, 4, 1024)
      for pool in ("max", "avg") for stat in ("none", "sum", "max")],
    (True, "max", "max", True, 4, 1024),
    (True, "avg", "sum", True, 4, 1024),
    (False, "avg", "sum", True, 8, 16),
]

COMPILE_SPECS = [
    *[_aggregate_spec(*variant) for variant in _AGGREGATE_VARIANTS],
    *[CompileSpec(
        name=f"normalize_scores_fwd_kernel[{mode},BLOCK_T={block_t}]",
        kernel=normalize_scores_fwd_kernel,
        signature={
            "src_ptr": "*fp32", "out_ptr": "*fp32", "partials_ptr": "*fp32",
            "n_infinite_ptr": "*i32", "rows_1": "i32", "rows_2": "i32",
            "stride_r0": "i64", "stride_r1": "i64", "stride_r2": "i64", "stride_t": "i64",
            "length": "i32", "n_tiles": "i32",
        },
        constexprs={"IS_SUM": mode == "sum", "BLOCK_T": block_t, "BLOCK_TILES": BLOCK_TILES})
      for mode, block_t in (("sum", 16), ("max", 1024))],
    *[CompileSpec(
        name=f"combine_layers_fwd_kernel[BLOCK_OUT={block_out},BLOCK_T={block_t}]",
        kernel=combine_layers_fwd_kernel,
        signature={
            "scores_ptr": "*fp32", "weights_ptr": "*fp32", "out_ptr": "*fp32", "heads": "i32",
            "stride_b": "i64", "stride_l": "i64", "stride_h": "i64", "stride_t": "i64",
            "stride_w_out": "i64", "stride_w_in": "i64",
            "layers_in": "i32", "layers_out": "i32", "length": "i32",
        },
        constexprs={"BLOCK_OUT": block_out, "BLOCK_T": block_t})
      for block_out, block_t in ((1, 16), (8, 512), (64, 64))],
]
