"""Stride bookkeeping shared by the Triton launchers."""

from __future__ import annotations

import torch

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
