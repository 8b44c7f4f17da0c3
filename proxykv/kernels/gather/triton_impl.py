"""Triton kernels for the KV gathers: memory-bound row copies.

A program copies ``BLOCK_N`` kept rows of K and of V, ``BLOCK_D`` columns at a time. The source
row of each kept entry is ``base(b, h) + position * stride_t``: every kept row is read exactly once
from the strided cache, every output row written once, so traffic is the ideal
``2 · kept rows · D · elem_size`` each for reading and writing (plus 4 bytes of index per row).

* uniform (``gather_kv_fwd_kernel``): programs over (head row ``b * H_kv + h``, block of kept
  entries);
* ragged (``gather_kv_ragged_fwd_kernel``): programs over blocks of the *packed* entries, so the
  work is split evenly however unequal the segments are; each entry finds its segment by a binary
  search of ``cu_seqlens`` (``ceil(log2(B * H_kv))`` cached loads), with no host-side planning and
  no device sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from proxykv.kernels._compile import TRITON_POINTER_TYPES, CompileSpec
from proxykv.kernels._layout import row_and_tile, rows_by_tiles_grid

# Bytes of one K (or V) tile a program moves per D step: enough in flight per SM to saturate HBM
# on H100/H200 with 4 warps, small enough for registers (16 KiB of K and 16 KiB of V = 256 B per
# thread).
TILE_BYTES = 16 * 1024
NUM_WARPS = 4


@triton.jit
def _copy_kv_rows(k_ptr, k_offsets, v_ptr, v_offsets, k_out_ptr, k_out_offsets, v_out_ptr,
                  v_out_offsets, row_ok, stride_kd, stride_vd, stride_okd, stride_ovd,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copy ``HEAD_DIM`` columns of K rows (starting at ``k_ptr + k_offsets``) and V rows to the
    outputs. Both tiles are loaded before either is stored, so each program has two loads in
    flight instead of waiting for one round trip per tensor."""
    for d_start in tl.static_range(0, HEAD_DIM, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
        k_tile = tl.load(k_ptr + k_offsets[:, None] + dims[None, :] * stride_kd, mask=mask)
        v_tile = tl.load(v_ptr + v_offsets[:, None] + dims[None, :] * stride_vd, mask=mask)
        tl.store(k_out_ptr + k_out_offsets[:, None] + dims[None, :] * stride_okd, k_tile,
                 mask=mask)
        tl.store(v_out_ptr + v_out_offsets[:, None] + dims[None, :] * stride_ovd, v_tile,
                 mask=mask)


@triton.jit(do_not_specialize=["num_selected"])
def gather_kv_fwd_kernel(
    k_ptr, v_ptr, indices_ptr, k_out_ptr, v_out_ptr,
    num_kv_heads, num_selected,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ib, stride_ih, stride_in,
    stride_okb, stride_okh, stride_okn, stride_okd,
    stride_ovb, stride_ovh, stride_ovn, stride_ovd,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head_row, block = row_and_tile(tl.cdiv(num_selected, BLOCK_N))
    batch = head_row // num_kv_heads
    head = head_row % num_kv_heads
    entries = block * BLOCK_N + tl.arange(0, BLOCK_N)
    entry_ok = entries < num_selected
    positions = tl.load(indices_ptr + batch * stride_ib + head * stride_ih + entries * stride_in,
                        mask=entry_ok, other=0).to(tl.int64)
    _copy_kv_rows(k_ptr + batch * stride_kb + head * stride_kh, positions * stride_kt,
                  v_ptr + batch * stride_vb + head * stride_vh, positions * stride_vt,
                  k_out_ptr + batch * stride_okb + head * stride_okh, entries * stride_okn,
                  v_out_ptr + batch * stride_ovb + head * stride_ovh, entries * stride_ovn,
                  entry_ok, stride_kd, stride_vd, stride_okd, stride_ovd, HEAD_DIM, BLOCK_D)


@triton.jit
def segment_of(cu_seqlens_ptr, entries, num_segments, search_steps):
    """For each packed entry, the last segment whose start is at or before it — the segment that
    holds it (empty segments share their start with the next one and are skipped).
    ``search_steps`` = ``ceil(log2(num_segments))``. int32 (segments are ``B * H_kv``): int64
    here made the caller's division by ``num_kv_heads`` a call that spilled around it."""
    low = tl.zeros_like(entries).to(tl.int32)
    high = low + (num_segments - 1)
    for _ in range(search_steps):
        middle = (low + high + 1) // 2
        starts_before = tl.load(cu_seqlens_ptr + middle).to(tl.int64) <= entries
        low = tl.where(starts_before, middle, low)
        high = tl.where(starts_before, high, middle - 1)
    return low


@triton.jit(do_not_specialize=["total", "num_segments", "search_steps"])
def gather_kv_ragged_fwd_kernel(
    k_ptr, v_ptr, indices_ptr, cu_seqlens_ptr, out_cu_seqlens_ptr, k_out_ptr, v_out_ptr,
    num_kv_heads, num_segments, total, search_steps,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_in,
    stride_okn, stride_okd, stride_ovn, stride_ovd,
    HAS_OUT_CU: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    entries = block * BLOCK_N + tl.arange(0, BLOCK_N)
    entry_ok = entries < total
    positions = tl.load(indices_ptr + entries * stride_in, mask=entry_ok, other=0).to(tl.int64)
    segments = segment_of(cu_seqlens_ptr, entries, num_segments, search_steps)
    batch = (segments // num_kv_heads).to(tl.int64)
    head = (segments % num_kv_heads).to(tl.int64)
    out_rows = entries
    if HAS_OUT_CU:
        out_rows = (entries - tl.load(cu_seqlens_ptr + segments).to(tl.int64)
                    + tl.load(out_cu_seqlens_ptr + segments).to(tl.int64))
    _copy_kv_rows(k_ptr, batch * stride_kb + head * stride_kh + positions * stride_kt,
                  v_ptr, batch * stride_vb + head * stride_vh + positions * stride_vt,
                  k_out_ptr, out_rows * stride_okn, v_out_ptr, out_rows * stride_ovn,
                  entry_ok, stride_kd, stride_vd, stride_okd, stride_ovd, HEAD_DIM, BLOCK_D)


# ------------------------------------------------------------------------------ launchers

def tile_shape(head_dim: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_D)``: D in steps of at most 128 columns, rows to fill ``TILE_BYTES``."""
    block_d = min(128, max(16, triton.next_power_of_2(head_dim)))
    return max(16, TILE_BYTES // (block_d * element_size)), block_d


def gather_grid(batch: int, h_kv: int, n: int, block_n: int) -> tuple[int]:
    """The launch grid of ``gather_kv_fwd_kernel``: (batch × KV head) rows of ``n`` entries."""
    return rows_by_tiles_grid(batch * h_kv, triton.cdiv(n, block_n))


def gather_kv_triton(k, v, indices, out, *, block_n: int | None = None,
                     num_warps: int = NUM_WARPS):
    """``block_n``/``num_warps`` override the tile for tuning sweeps (``perf/bench_gather.py``)."""
    b, h_kv, _, d = k.shape
    n = indices.shape[-1]
    if out is None:
        out = (torch.empty(b, h_kv, n, d, dtype=k.dtype, device=k.device),
               torch.empty(b, h_kv, n, d, dtype=v.dtype, device=v.device))
    k_out, v_out = out
    if k_out.numel() == 0:
        return k_out, v_out
    default_n, block_d = tile_shape(d, k.element_size())
    block_n = block_n or default_n
    gather_kv_fwd_kernel[gather_grid(b, h_kv, n, block_n)](
        k_ptr=k, v_ptr=v, indices_ptr=indices, k_out_ptr=k_out, v_out_ptr=v_out,
        num_kv_heads=h_kv, num_selected=n,
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vt=v.stride(2), stride_vd=v.stride(3),
        stride_ib=indices.stride(0), stride_ih=indices.stride(1), stride_in=indices.stride(2),
        stride_okb=k_out.stride(0), stride_okh=k_out.stride(1), stride_okn=k_out.stride(2),
        stride_okd=k_out.stride(3),
        stride_ovb=v_out.stride(0), stride_ovh=v_out.stride(1), stride_ovn=v_out.stride(2),
        stride_ovd=v_out.stride(3),
        HEAD_DIM=d, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return k_out, v_out


def gather_kv_ragged_triton(k, v, indices, cu_seqlens, out, out_cu_seqlens, *,
                            block_n: int | None = None, num_warps: int = NUM_WARPS):
    """``block_n``/``num_warps`` override the tile for tuning sweeps (``perf/bench_gather.py``)."""
    b, h_kv, _, d = k.shape
    total = indices.numel()
    if out is None:
        out = (torch.empty(total, d, dtype=k.dtype, device=k.device),
               torch.empty(total, d, dtype=v.dtype, device=v.device))
    k_out, v_out = out
    if total == 0:
        return k_out, v_out
    num_segments = b * h_kv
    default_n, block_d = tile_shape(d, k.element_size())
    block_n = block_n or default_n
    gather_kv_ragged_fwd_kernel[(triton.cdiv(total, block_n),)](
        k_ptr=k, v_ptr=v, indices_ptr=indices, cu_seqlens_ptr=cu_seqlens,
        out_cu_seqlens_ptr=out_cu_seqlens if out_cu_seqlens is not None else cu_seqlens,
        k_out_ptr=k_out, v_out_ptr=v_out,
        num_kv_heads=h_kv, num_segments=num_segments, total=total,
        search_steps=(num_segments - 1).bit_length(),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vt=v.stride(2), stride_vd=v.stride(3),
        stride_in=indices.stride(0),
        stride_okn=k_out.stride(0), stride_okd=k_out.stride(1),
        stride_ovn=v_out.stride(0), stride_ovd=v_out.stride(1),
        HAS_OUT_CU=out_cu_seqlens is not None, HEAD_DIM=d, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return k_out, v_out


# ------------------------------------------------------------------------------ compile specs

def _compile_specs():
    strides = lambda prefix, axes: {f"stride_{prefix}{a}": "i64" for a in axes}
    specs = []
    for dtype in ("float16", "bfloat16", "float32"):
        ptr = TRITON_POINTER_TYPES[dtype]
        element_size = 4 if dtype == "float32" else 2
        for head_dim in (64, 96, 128, 256):
            block_n, block_d = tile_shape(head_dim, element_size)
            tiles = {"HEAD_DIM": head_dim, "BLOCK_N": block_n, "BLOCK_D": block_d}
            tag = f"{dtype},D={head_dim}"
            specs.append(CompileSpec(
                name=f"gather_kv_fwd_kernel[{tag}]", kernel=gather_kv_fwd_kernel,
                signature={"k_ptr": ptr, "v_ptr": ptr, "indices_ptr": "*i32",
                           "k_out_ptr": ptr, "v_out_ptr": ptr,
                           "num_kv_heads": "i32", "num_selected": "i32",
                           **strides("k", "bhtd"), **strides("v", "bhtd"), **strides("i", "bhn"),
                           **strides("ok", "bhnd"), **strides("ov", "bhnd")},
                constexprs=tiles, num_warps=NUM_WARPS, hot=True,
                unit_strides=("stride_kd", "stride_vd", "stride_okd", "stride_ovd")))
            for has_out_cu in (False, True):
                specs.append(CompileSpec(
                    name=f"gather_kv_ragged_fwd_kernel[{tag},out_cu={has_out_cu}]",
                    kernel=gather_kv_ragged_fwd_kernel,
                    signature={"k_ptr": ptr, "v_ptr": ptr, "indices_ptr": "*i32",
                               "cu_seqlens_ptr": "*i32", "out_cu_seqlens_ptr": "*i32",
                               "k_out_ptr": ptr, "v_out_ptr": ptr,
                               "num_kv_heads": "i32", "num_segments": "i32", "total": "i32",
                               "search_steps": "i32",
                               **strides("k", "bhtd"), **strides("v", "bhtd"), "stride_in": "i64",
                               **strides("ok", "nd"), **strides("ov", "nd")},
                    constexprs={**tiles, "HAS_OUT_CU": has_out_cu}, num_warps=NUM_WARPS,
                    # Without out_cu, ptxas saves one predicate word to the stack once per
                    # program at 256-512 B rows (P2R + STL, 8 B, outside the copy): exempt from
                    # the no-spill rule, as it costs nothing measurable.
                    hot=has_out_cu,
                    unit_strides=("stride_kd", "stride_vd", "stride_okd", "stride_ovd")))
    return specs


COMPILE_SPECS = _compile_specs()
