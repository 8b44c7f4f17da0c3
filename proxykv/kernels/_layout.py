"""Stride bookkeeping shared by the Triton launchers and kernels (imported by ``triton_impl``
modules only, so importing it may define Triton functions)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs tl visible to row_start)

MAX_LEADING_DIMS = 3


def leading_dims_as_rows(tensor: torch.Tensor) -> tuple[list[int], list[int]]:
    """Describe the leading dims (all but the last) of ``tensor`` as at most three (size, stride) pairs.

    Adjacent dims that can be walked with one stride are merged (so any contiguous layout becomes a
    single row dimension); sizes are padded with 1 in front to exactly ``MAX_LEADING_DIMS``. Kernels
    decompose a flat row id with these sizes, so arbitrary strides work without a copy.

    Raises ``ValueError`` when more than three non-mergeable leading dims remain.
    """
    sizes, strides = [], []
    for size, stride in zip(tensor.shape[:-1], tensor.stride()[:-1]):
        if size == 1:
            continue
        if sizes and strides[-1] == stride * size:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    if len(sizes) > MAX_LEADING_DIMS:
        raise ValueError(
            f"the leading dimensions of a tensor with shape {tuple(tensor.shape)} and strides "
            f"{tensor.stride()} cannot be walked as {MAX_LEADING_DIMS} strided dimensions; "
            "pass a tensor whose leading dimensions are mergeable (e.g. .contiguous() scores)"
        )
    pad = MAX_LEADING_DIMS - len(sizes)
    return [1] * pad + sizes, [0] * pad + strides


@triton.jit
def row_start(base_ptr, row, rows_1, rows_2, stride_r0, stride_r1, stride_r2):
    """Pointer to the first element of flat row ``row`` of a tensor described by
    ``leading_dims_as_rows`` (sizes ``[_, rows_1, rows_2]`` and the three strides)."""
    index_2 = row % rows_2
    index_1 = (row // rows_2) % rows_1
    index_0 = row // (rows_2 * rows_1)
    return base_ptr + index_0 * stride_r0 + index_1 * stride_r1 + index_2 * stride_r2


#: programs CUDA accepts on grid axis 0 (axes 1 and 2 stop at 65,535)
GRID_X_LIMIT = 2**31 - 1


def rows_by_tiles_grid(n_rows: int, n_tiles: int) -> tuple[int]:
    """A one-axis grid of ``n_rows × n_tiles`` programs (decoded by ``row_and_tile``): both counts
    grow with the input (batch × heads × layers, and length), so neither may sit on axis 1 or 2,
    whose 65,535 a 67M-token row or a batch of 8,192 × 8 heads would pass."""
    programs = n_rows * n_tiles
    if programs > GRID_X_LIMIT:
        raise ValueError(f"{n_rows} rows of {n_tiles} tiles make {programs} programs; a launch "
                         f"takes at most {GRID_X_LIMIT}")
    return (programs,)


@triton.jit
def row_and_tile(n_tiles):
    """``(row, tile)`` of this program in a ``rows_by_tiles_grid``, int64; the tiles of a row are
    neighbouring programs, so they read neighbouring memory."""
    program = tl.program_id(0).to(tl.int64)
    return program // n_tiles, program % n_tiles
