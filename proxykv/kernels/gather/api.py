"""Public entry points of the sparse KV gathers: uniform (same count per head) and ragged (packed
per-head segments, the layout of ``Selection.layer(l)`` for per-head budgets)."""

from __future__ import annotations

import torch

from proxykv import _validation
from proxykv._backend import OpSpec, dispatch, register_op
from proxykv._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    bounds_statistics,
    check_dim,
    check_int32_size,
    check_nonempty,
    check_same_device,
    check_same_dtype,
    check_segment_bounds,
    check_tensor,
    first_true_index,
    raise_for_bounds,
    segment_values_statistics,
    to_int32_metadata,
)
from proxykv.kernels.gather.reference import gather_kv_ragged_reference, gather_kv_reference
from proxykv.kernels.gather.torch_impl import gather_kv_ragged_torch, gather_kv_torch

# ------------------------------------------------------------------------------------ validation

def check_kv_pair(k, v) -> torch.device:
    """``k`` and ``v``: ``[B, H_kv, T, D]`` float tensors of one shape, dtype and device, no
    dimension empty, ``T`` within int32 (the indices the kernels read)."""
    check_tensor("k", k, ndim=4, layout="[B, H_kv, T, D]", dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, layout="[B, H_kv, T, D]", dtypes=FLOAT_DTYPES)
    check_same_dtype(k=k, v=v)
    device = check_same_device(k=k, v=v)
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)} [B, H_kv, T, D], got "
                         f"{tuple(v.shape)}")
    check_nonempty("k", k, "[B, H_kv, T, D]")
    check_int32_size("k", "T", k.shape[2], "positions")
    return device


def check_out_pair(out, shape: tuple[int | None, ...], dtype: torch.dtype, device: torch.device,
                   what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` is a pair ``(k_out, v_out)`` of tensors of ``shape``, ``dtype`` and ``device``.

    A leading ``None`` in ``shape`` (the row count of a ``[M, D]`` pair with spare room) is taken
    from ``out[0]``; both tensors must then have that many rows."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"out must be a pair (k_out, v_out) of tensors, got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    if shape and shape[0] is None:
        check_tensor("out[0]", out[0], ndim=len(shape), layout=what, dtypes=(dtype,))
        shape = (out[0].shape[0], *shape[1:])
    for label, tensor in zip(("out[0]", "out[1]"), out):
        check_tensor(label, tensor, dtypes=(dtype,))
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{label} must have shape {tuple(shape)} {what}, got "
                             f"{tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"{label} must be on {device} (the device of k), got {tensor.device}")
    return out[0], out[1]


def _check_ragged_values(indices: torch.Tensor, cu_seqlens: torch.Tensor, seq_len: int,
                         h_kv: int, out_cu_seqlens: torch.Tensor | None, out_rows: int) -> None:
    """Every value check of a ragged gather, read to the host in one device sync."""
    total = indices.numel()
    stats = bounds_statistics(cu_seqlens)
    if out_cu_seqlens is not None:
        stats += bounds_statistics(out_cu_seqlens)
        capacity = out_cu_seqlens[1:] - out_cu_seqlens[:-1]
        stats.append(first_true_index(capacity < cu_seqlens[1:] - cu_seqlens[:-1]))
    if total:
        stats += segment_values_statistics(indices, cu_seqlens)
    values = torch.stack(stats).tolist()
    raise_for_bounds("cu_seqlens", values[:3], total=total, total_what="N = indices.numel()")
    if out_cu_seqlens is not None:
        raise_for_bounds("out_cu_seqlens", values[3:6], total=out_rows,
                         total_what="the number of rows of out")
        if values[6] >= 0:
            segment = values[6]
            raise ValueError(f"out_cu_seqlens gives segment {segment} room for fewer rows than "
                             f"cu_seqlens puts in it ({_segment_text(segment, h_kv)})")
        values = values[:3] + values[7:]
    if not total:
        return
    low, high, unsorted_at = values[3:]
    if low < 0 or high >= seq_len:
        raise ValueError(f"indices must lie in [0, T) = [0, {seq_len}), got values in "
                         f"[{low}, {high}]")
    if unsorted_at >= 0:
        position = unsorted_at + 1
        segment = int(torch.searchsorted(cu_seqlens.long(), torch.tensor(
            [position], device=cu_seqlens.device), right=True)) - 1
        raise ValueError(
            f"indices must be strictly increasing within each segment (ascending, no repeats): "
            f"segment {segment} ({_segment_text(segment, h_kv)}) has {int(indices[position - 1])} "
            f"then {int(indices[position])} at packed positions {position - 1}, {position}")


def _segment_text(segment: int, h_kv: int) -> str:
    return f"b={segment // h_kv}, h={segment % h_kv}"


# ------------------------------------------------------------------------------------ public ops

def gather_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    check_indices: bool = True,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the same number of positions in every KV head: ``k_sel[b, h, j] = k[b, h, indices[b, h,
    j]]`` (and the same for ``v``).

    Args:
        k, v: ``[B, H_kv, T, D]`` float16/bfloat16/float32, same shape, dtype and device, any
            strides (a slice of a pre-allocated cache, ``[B, T, H, D]`` storage seen through a
            permute...); every dimension >= 1 and ``T <= 2**31 - 1``. Only the kept rows are
            read; the cache is never copied whole.
        indices: int32/int64 ``[B, H_kv, n]`` (any strides; ``n = 0`` keeps nothing): the kept
            positions of each head, ascending and unique, in ``[0, T)``
            (``Selection.layer(l).indices`` of a uniform selection). The kernels read int32:
            int64 indices are converted (a copy of the indices only), never wrapped.
        out: optional pair ``(k_out, v_out)`` of ``[B, H_kv, n, D]`` tensors (dtype and device of
            ``k``, any strides) written in place and returned. They must not overlap ``k``/``v``.
        check_indices: verify the values of ``indices`` (range, ascending, unique). This reads them
            to the host: a device synchronisation per call. Pass False on a hot path whose indices
            are known good (e.g. made by ``Selection``); out-of-range indices then read arbitrary
            memory. int64 indices are still checked to fit int32 (one sync); int32 ones cost none.
        impl: ``"triton"``, ``"torch"`` or None (see ``proxykv.backend_info``).

    Returns:
        ``(k_sel, v_sel)``, each ``[B, H_kv, n, D]`` in the dtype of ``k`` — ``out`` when given,
        else new contiguous tensors.

    Raises:
        TypeError: a non-tensor, or a tensor of a dtype the argument does not take.
        ValueError: a wrong rank or shape, an empty dimension of ``k``, ``T`` past int32, tensors
            on different devices (or ``meta``), index values out of range or out of order.

    Not checked: overlap of ``out`` with ``k``/``v``; with ``check_indices=False``, the index values
    (beyond fitting int32).
    """
    device = check_kv_pair(k, v)
    check_tensor("indices", indices, ndim=3, layout="[B, H_kv, n]", dtypes=INDEX_DTYPES)
    check_same_device(k=k, indices=indices)
    b, h_kv, seq_len, d = k.shape
    check_dim("indices", indices, 0, b, "batch size B")
    check_dim("indices", indices, 1, h_kv, "KV head count H_kv")
    n = indices.shape[-1]
    if out is not None:
        out = check_out_pair(out, (b, h_kv, n, d), k.dtype, device, "[B, H_kv, n, D]")
    if check_indices:
        _validation.check_indices("indices", indices, upper=seq_len, sorted_last_dim=True)
    (indices,) = to_int32_metadata(values_checked=check_indices, indices=indices)
    _, run = dispatch("gather_kv", impl, device)
    return run(k, v, indices, out)


def gather_kv_ragged(
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    out_cu_seqlens: torch.Tensor | None = None,
    check_indices: bool = True,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a different number of positions per KV head and pack them: segment ``s = b * H_kv + h``
    holds the kept rows of head ``h`` of batch ``b``.

    ``k_packed[cu_seqlens[s] + j] = k[b, h, indices[cu_seqlens[s] + j]]`` for
    ``0 <= j < cu_seqlens[s + 1] - cu_seqlens[s]`` (and the same for ``v``).

    Args:
        k, v: ``[B, H_kv, T, D]`` float16/bfloat16/float32, same shape, dtype and device, any
            strides; every dimension >= 1 and ``T <= 2**31 - 1``. Only the kept rows are read.
        indices: int32/int64 ``[N]``, ``N <= 2**31 - 1`` (``N = 0`` keeps nothing): the packed
            kept positions, ascending and unique within each segment, in ``[0, T)``
            (``Selection.layer(l).indices`` of a ragged selection); a non-contiguous ``[N]`` view
            is read through its stride.
        cu_seqlens: int32/int64 ``[B * H_kv + 1]`` (``torch.cumsum`` gives int64): segment bounds,
            starting at 0, non-decreasing, ending at ``N``. Empty segments (equal neighbours) are
            allowed.
        out: optional pair ``(k_out, v_out)`` of ``[M, D]`` tensors (dtype and device of ``k``, any
            strides), written in place and returned; ``M = N`` unless ``out_cu_seqlens`` is given.
        out_cu_seqlens: optional int32/int64 ``[B * H_kv + 1]`` (needs ``out``, with
            ``M <= 2**31 - 1``): write segment ``s`` at rows ``out_cu_seqlens[s] …`` of ``out``
            instead of ``cu_seqlens[s] …`` — a layout with spare room after each segment, as
            ``RaggedKVCache`` keeps. Same rules as
            ``cu_seqlens`` but ending at ``M``, and every segment's room
            ``out_cu_seqlens[s + 1] - out_cu_seqlens[s]`` at least its length. Rows in the spare
            room are left untouched.
        check_indices: verify ``cu_seqlens``, ``out_cu_seqlens`` and the index values (range,
            ascending and unique within each segment). This reads them to the host: one device
            synchronisation. With False, bad metadata reads or writes arbitrary memory.
        impl: ``"triton"``, ``"torch"`` or None (see ``proxykv.backend_info``).

    The kernels read ``indices``, ``cu_seqlens`` and ``out_cu_seqlens`` as int32: int64 ones are
    converted (a copy of the metadata only) and never wrapped — with ``check_indices=False`` their
    values are still checked to fit int32 (one device sync, none for int32 metadata).

    Returns:
        ``(k_packed, v_packed)``, each ``[N, D]`` (or ``out``) in the dtype of ``k``.

    Raises:
        TypeError: a non-tensor, or a tensor of a dtype the argument does not take.
        ValueError: a wrong rank or shape, an empty dimension of ``k``, a count (``T``, ``N``,
            ``M``) past int32, tensors on different devices (or ``meta``), metadata values out of
            range or out of order.

    Not checked: overlap of ``out`` with ``k``/``v``; with ``check_indices=False``, all values
    (beyond fitting int32).
    """
    device = check_kv_pair(k, v)
    check_tensor("indices", indices, ndim=1, layout="[N]", dtypes=INDEX_DTYPES)
    b, h_kv, seq_len, d = k.shape
    check_segment_bounds("cu_seqlens", cu_seqlens, num_segments=b * h_kv,
                         segments_what="B * H_kv")
    check_same_device(k=k, indices=indices, cu_seqlens=cu_seqlens, out_cu_seqlens=out_cu_seqlens)
    total = indices.numel()
    check_int32_size("indices", "N", total, "rows")
    out_rows = total
    if out_cu_seqlens is not None:
        if out is None:
            raise ValueError("out_cu_seqlens needs out: the buffers the segments are written into")
        check_segment_bounds("out_cu_seqlens", out_cu_seqlens, num_segments=b * h_kv,
                             segments_what="B * H_kv")
        out = check_out_pair(out, (None, d), k.dtype, device, "[M, D]")
        out_rows = out[0].shape[0]
        check_int32_size("out[0]", "M", out_rows, "rows")
    elif out is not None:
        out = check_out_pair(out, (total, d), k.dtype, device, "[N, D]")
    if check_indices:
        _check_ragged_values(indices, cu_seqlens, seq_len, h_kv, out_cu_seqlens, out_rows)
    indices, cu_seqlens, out_cu_seqlens = to_int32_metadata(
        values_checked=check_indices, indices=indices, cu_seqlens=cu_seqlens,
        out_cu_seqlens=out_cu_seqlens)
    _, run = dispatch("gather_kv_ragged", impl, device)
    return run(k, v, indices, cu_seqlens, out, out_cu_seqlens)


# ------------------------------------------------------------------------------ registration

def _example_kv(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    storage_k = torch.randn(2, 41, 3, 24, generator=generator)  # [B, T, H, D] storage
    storage_v = torch.randn(2, 41, 3, 24, generator=generator)
    return storage_k.to(device).permute(0, 2, 1, 3), storage_v.to(device).permute(0, 2, 1, 3)


def _example_uniform(device: torch.device):
    k, v = _example_kv(device)
    generator = torch.Generator().manual_seed(1)
    indices = torch.rand(2, 3, 41, generator=generator).argsort(-1)[..., :17].sort(-1).values
    return (k, v, indices.to(device)), {}


def _example_ragged(device: torch.device):
    k, v = _example_kv(device)
    generator = torch.Generator().manual_seed(2)
    mask = torch.rand(6, 41, generator=generator) < torch.tensor(
        [0.1, 0.5, 0.0, 1.0, 0.3, 0.7])[:, None]
    indices = mask.nonzero()[:, 1].to(torch.int32)
    cu_seqlens = torch.cat([torch.zeros(1), mask.sum(-1).cumsum(0)]).to(torch.int32)
    return (k, v, indices.to(device), cu_seqlens.to(device)), {}


register_op(OpSpec(
    name="gather_kv",
    api=gather_kv,
    torch_impl=gather_kv_torch,
    triton_launcher="proxykv.kernels.gather.triton_impl:gather_kv_triton",
    reference=gather_kv_reference,
    example=_example_uniform,
))

register_op(OpSpec(
    name="gather_kv_ragged",
    api=gather_kv_ragged,
    torch_impl=gather_kv_ragged_torch,
    triton_launcher="proxykv.kernels.gather.triton_impl:gather_kv_ragged_triton",
    reference=gather_kv_ragged_reference,
    example=_example_ragged,
))
