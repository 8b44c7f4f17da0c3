"""Triton kernel for ``pool_scores``.

One program pools one tile of ``BLOCK_T`` positions of one row. The window is walked offset by
offset; each load of a shifted tile hits L1/L2 after the first, so global traffic stays ≈ one read
and one write of the scores for the small odd kernel sizes SnapKV uses (5–31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from proxykv.kernels._compile import CompileSpec
from proxykv.kernels._layout import leading_dims_as_rows


@triton.jit(do_not_specialize=["length", "half_window"])
def pool_scores_fwd_kernel(
    scores_ptr,
    out_ptr,
    rows_1,
    rows_2,
    stride_r0,
    stride_r1,
    stride_r2,
    stride_t,
    length,
    half_window,
    IS_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    index_2 = row % rows_2
    index_1 = (row // rows_2) % rows_1
    index_0 = row // (rows_2 * rows_1)
    row_ptr = scores_ptr + index_0 * stride_r0 + index_1 * stride_r1 + index_2 * stride_r2

    positions = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = positions < length
    centre = tl.load(row_ptr + positions * stride_t, mask=in_row, other=float("-inf"))
    if IS_MAX:
        pooled = tl.full([BLOCK_T], float("-inf"), tl.float32)
    else:
        pooled = tl.zeros([BLOCK_T], tl.float32)
    valid_count = tl.zeros([BLOCK_T], tl.float32)
    for offset in range(-half_window, half_window + 1):
        shifted = positions + offset
        inside = in_row & (shifted >= 0) & (shifted < length)
        x = tl.load(row_ptr + shifted * stride_t, mask=inside, other=float("-inf"))
        if IS_MAX:
            pooled = tl.maximum(pooled, x)
        else:
            valid = x != float("-inf")
            pooled += tl.where(valid, x, 0.0)
            valid_count += valid.to(tl.float32)
    if not IS_MAX:
        pooled = pooled / tl.maximum(valid_count, 1.0)
    pooled = tl.where(centre != float("-inf"), pooled, float("-inf"))
    tl.store(out_ptr + row * length + positions, pooled, mask=in_row)


def _block_t(length: int) -> int:
    return min(1024, max(16, triton.next_power_of_2(length)))


def pool_scores_triton(scores: torch.Tensor, kernel_size: int, mode: str) -> torch.Tensor:
    length = scores.shape[-1]
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    if out.numel() == 0:
        return out
    (_, rows_1, rows_2), (stride_r0, stride_r1, stride_r2) = leading_dims_as_rows(scores)
    n_rows = out.numel() // length
    block_t = _block_t(length)
    grid = (n_rows, triton.cdiv(length, block_t))
    pool_scores_fwd_kernel[grid](
        scores_ptr=scores,
        out_ptr=out,
        rows_1=rows_1,
        rows_2=rows_2,
        stride_r0=stride_r0,
        stride_r1=stride_r1,
        stride_r2=stride_r2,
        stride_t=scores.stride(-1),
        length=length,
        half_window=kernel_size // 2,
        IS_MAX=mode == "max",
        BLOCK_T=block_t,
        num_warps=4,
    )
    return out


COMPILE_SPECS = [
    CompileSpec(
        name=f"pool_scores_fwd_kernel[{mode},BLOCK_T={block_t}]",
        kernel=pool_scores_fwd_kernel,
        signature={
            "scores_ptr": "*fp32", "out_ptr": "*fp32",
            "rows_1": "i32", "rows_2": "i32",
            "stride_r0": "i64", "stride_r1": "i64", "stride_r2": "i64", "stride_t": "i64",
            "length": "i32", "half_window": "i32",
        },
        constexprs={"IS_MAX": mode == "max", "BLOCK_T": block_t},
        unit_strides=("stride_t",),
    )
    for mode in ("max", "avg")
    for block_t in (16, 1024)
]
