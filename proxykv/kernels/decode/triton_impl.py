"""Triton kernels for ``ragged_decode_attention``: split-K ("flash-decoding") over ragged segments.

``ragged_decode_attention_fwd_kernel`` — a program owns one segment (KV head ``h`` of batch ``b``)
and one *split* of its keys (``keys_per_split`` of them, a multiple of ``BLOCK_N``), and handles all
``G = H_q / H_kv`` query heads of the GQA group at once, so each K/V tile is read from memory once.
It runs the base-2 online softmax over its key tiles. The logits are computed transposed —
``K_tile [BLOCK_N, D] @ Q^T [D, BLOCK_G]`` and ``V^T [D, BLOCK_N] @ P^T [BLOCK_N, BLOCK_G]`` — so the
large dimensions (keys, D) are the MMA's M side and the few query heads (padded to 16) its N side:
on sm_90 that is a legal ``wgmma`` shape, where ``Q @ K^T`` with M = G < 64 would not be.

The split size is uniform across segments (planned on the host from the longest segment), so
every busy program does at most the same amount of work whatever the per-head budgets; programs
past the end of a shorter segment exit without writing. Each busy split writes its normalised
partial output and its base-2 log-sum-exp; ``ragged_decode_merge_fwd_kernel`` combines a query
head's splits (``out = Σ 2^(lse_i - m) o_i / Σ 2^(lse_i - m)``). When one split covers the longest
segment the decode kernel writes the final output itself and no merge runs.

A query head whose segment is empty outputs zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from proxykv._backend import interpreter_enabled
from proxykv.kernels._compile import TRITON_POINTER_TYPES, CompileSpec

LOG2E = 1.4426950408889634


@triton.jit
def _segment_bounds(cu_seqlens_ptr, seq_lens_ptr, segment, HAS_SEQ_LENS: tl.constexpr):
    """(first row, number of valid rows) of a segment of the (possibly capacity-padded) layout."""
    start = tl.load(cu_seqlens_ptr + segment).to(tl.int64)
    if HAS_SEQ_LENS:
        length = tl.load(seq_lens_ptr + segment).to(tl.int64)
    else:
        length = tl.load(cu_seqlens_ptr + segment + 1).to(tl.int64) - start
    return start, length


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr, DOT_IEEE: tl.constexpr):
    if UPCAST:  # ENV.md: the interpreter's tl.dot is wrong on bf16
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if DOT_IEEE:  # fp32 inputs: no TF32 rounding, the output must match an fp32 reference
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit(do_not_specialize=["keys_per_split", "num_splits"])
def ragged_decode_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, seq_lens_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr,
    num_kv_heads, group_size, keys_per_split, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_kn, stride_kd, stride_vn, stride_vd,
    qk_scale2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr, SINGLE_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    batch = segment // num_kv_heads
    kv_head = segment % num_kv_heads
    seg_start, seg_len = _segment_bounds(cu_seqlens_ptr, seq_lens_ptr, segment, HAS_SEQ_LENS)
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, seg_len)

    members = tl.arange(0, BLOCK_G)
    member_ok = members < group_size
    heads = kv_head * group_size + members
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_t = tl.load(q_ptr + batch * stride_qb + heads[None, :] * stride_qh + dims[:, None] * stride_qd,
                  mask=member_ok[None, :] & dim_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_G]

    row_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_G], tl.float32)
    acc_t = tl.zeros([BLOCK_D, BLOCK_G], tl.float32)
    for key_start in range(key_lo, key_hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < key_hi
        rows = seg_start + keys
        tile_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + rows[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=tile_mask, other=0.0)
        logits_t = _mma(k, q_t, UPCAST, DOT_IEEE) * qk_scale2  # [BLOCK_N, BLOCK_G]
        logits_t = tl.where(key_ok[:, None], logits_t, float("-inf"))
        # Every tile holds at least one valid key, so new_max is finite from the first tile on.
        new_max = tl.maximum(row_max, tl.max(logits_t, axis=0))
        p_t = tl.exp2(logits_t - new_max[None, :])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p_t, axis=0)
        v = tl.load(v_ptr + rows[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=tile_mask, other=0.0)
        acc_t = acc_t * rescale[None, :] + _mma(tl.trans(v), p_t.to(v.dtype), UPCAST, DOT_IEEE)
        row_max = new_max

    has_keys = row_sum > 0
    out_t = acc_t / tl.where(has_keys, row_sum, 1.0)[None, :]
    query_rows = batch * num_kv_heads * group_size + heads  # row of [B * H_q]
    if SINGLE_SPLIT:
        # An empty segment leaves acc_t = 0: its query heads output zeros.
        tl.store(out_ptr + query_rows[None, :] * HEAD_DIM + dims[:, None],
                 out_t.to(out_ptr.dtype.element_ty), mask=member_ok[None, :] & dim_ok[:, None])
    else:
        # A split past the end of its segment writes nothing; the merge reads only busy splits.
        # (key_lo broadcast first: Triton's interpreter rejects a vector & scalar-bool mask.)
        busy_member = member_ok & ((members * 0 + key_lo) < seg_len)
        partial_rows = query_rows * num_splits + split
        tl.store(partial_out_ptr + partial_rows[None, :] * HEAD_DIM + dims[:, None], out_t,
                 mask=busy_member[None, :] & dim_ok[:, None])
        lse2 = row_max + tl.log2(tl.where(has_keys, row_sum, 1.0))
        tl.store(partial_lse_ptr + partial_rows, lse2, mask=busy_member)


@triton.jit(do_not_specialize=["keys_per_split", "num_splits"])
def ragged_decode_merge_fwd_kernel(
    partial_out_ptr, partial_lse_ptr, cu_seqlens_ptr, seq_lens_ptr, out_ptr,
    group_size, keys_per_split, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr,
):
    query_row = tl.program_id(0).to(tl.int64)  # b * H_q + query head
    segment = query_row // group_size          # = b * H_kv + query head // group_size
    _, seg_len = _segment_bounds(cu_seqlens_ptr, seq_lens_ptr, segment, HAS_SEQ_LENS)
    busy_splits = tl.minimum(tl.cdiv(seg_len, keys_per_split), num_splits)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lse_base = partial_lse_ptr + query_row * num_splits
    out_base = partial_out_ptr + query_row * num_splits * HEAD_DIM

    lse_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for first in range(0, busy_splits, BLOCK_S):
        splits = first + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_base + splits, mask=splits < busy_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    shift = tl.max(lse_max, axis=0)
    shift = tl.where(shift == float("-inf"), 0.0, shift)  # no busy split: avoid -inf - -inf

    weight_sum = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for first in range(0, busy_splits, BLOCK_S):
        splits = first + tl.arange(0, BLOCK_S)
        split_ok = splits < busy_splits
        weight = tl.exp2(tl.load(lse_base + splits, mask=split_ok, other=float("-inf")) - shift)
        partial = tl.load(out_base + splits[:, None] * HEAD_DIM + dims[None, :],
                          mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * partial, axis=0)
        weight_sum += weight
    total = tl.sum(weight_sum, axis=0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + query_row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


# ------------------------------------------------------------------------------ launch plan

@dataclass(frozen=True)
class DecodePlan:
    block_n: int
    keys_per_split: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3


# Enough busy programs to fill an H100/H200 (132 SMs) several times over at batch 1.
GPU_TARGET_PROGRAMS = 4 * 132
# A split covers at least this many key tiles, so the partial outputs it writes and the merge
# reads stay a few percent of its K/V traffic.
GPU_MIN_TILES_PER_SPLIT = 4
MERGE_BLOCK_S = 16


def gpu_tile(dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_N, num_stages)`` on a GPU. fp32 runs the FMA (IEEE) dot, whose operand staging
    needs about twice the shared memory per tile: smaller tiles and one stage less fit D = 256
    within sm_80's 163 KiB."""
    return (32, 2) if dtype == torch.float32 else (64, 3)


def plan_decode(max_seq_len: int, num_segments: int, dtype: torch.dtype, on_gpu: bool,
                keys_per_split: int | None = None) -> DecodePlan:
    """Split every segment into pieces of ``keys_per_split`` keys (uniform across segments),
    chosen so the longest segment alone spreads over ``target / num_segments`` programs."""
    if on_gpu:
        (block_n, num_stages), target = gpu_tile(dtype), GPU_TARGET_PROGRAMS
        min_tiles = GPU_MIN_TILES_PER_SPLIT
    else:  # the interpreter: few, large programs are fastest; splits are still exercised
        block_n, num_stages, target, min_tiles = 32, 1, 4, 1
    if keys_per_split is None:
        tiles = max(1, triton.cdiv(max_seq_len, block_n))
        wanted_splits = max(1, min(triton.cdiv(target, num_segments), tiles // min_tiles))
        keys_per_split = triton.cdiv(tiles, wanted_splits) * block_n
    elif keys_per_split < 1 or keys_per_split % block_n:
        raise ValueError(f"keys_per_split must be a positive multiple of BLOCK_N={block_n}, "
                         f"got {keys_per_split}")
    num_splits = max(1, triton.cdiv(max_seq_len, keys_per_split))
    return DecodePlan(block_n, keys_per_split, num_splits, num_stages=num_stages)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _block_g(group_size: int) -> int:
    return max(16, triton.next_power_of_2(group_size))  # tl.dot needs N >= 16


def ragged_decode_attention_triton(q, k_packed, v_packed, cu_seqlens, seq_lens, *, scale,
                                   max_seq_len, plan: DecodePlan | None = None):
    b, h_q, d = q.shape
    num_segments = cu_seqlens.numel() - 1
    h_kv = num_segments // b
    group = h_q // h_kv
    if plan is None:
        plan = plan_decode(max_seq_len, num_segments, q.dtype,
                           q.is_cuda and not interpreter_enabled())
    out = torch.empty(b, h_q, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    single = plan.num_splits == 1
    if single:
        partial_out = partial_lse = out  # unused
    else:
        partial_out = torch.empty(b * h_q, plan.num_splits, d, dtype=torch.float32,
                                  device=q.device)
        partial_lse = torch.empty(b * h_q, plan.num_splits, dtype=torch.float32, device=q.device)
    seq_lens_arg = seq_lens if seq_lens is not None else cu_seqlens
    dtype = q.dtype
    ragged_decode_attention_fwd_kernel[(num_segments, plan.num_splits)](
        q_ptr=q, k_ptr=k_packed, v_ptr=v_packed, cu_seqlens_ptr=cu_seqlens,
        seq_lens_ptr=seq_lens_arg, out_ptr=out, partial_out_ptr=partial_out,
        partial_lse_ptr=partial_lse,
        num_kv_heads=h_kv, group_size=group, keys_per_split=plan.keys_per_split,
        num_splits=plan.num_splits,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qd=q.stride(2),
        stride_kn=k_packed.stride(0), stride_kd=k_packed.stride(1),
        stride_vn=v_packed.stride(0), stride_vd=v_packed.stride(1),
        qk_scale2=scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_G=_block_g(group), BLOCK_N=plan.block_n,
        HAS_SEQ_LENS=seq_lens is not None, SINGLE_SPLIT=single,
        UPCAST=interpreter_enabled() and dtype == torch.bfloat16,
        DOT_IEEE=dtype == torch.float32,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if not single:
        ragged_decode_merge_fwd_kernel[(b * h_q,)](
            partial_out_ptr=partial_out, partial_lse_ptr=partial_lse, cu_seqlens_ptr=cu_seqlens,
            seq_lens_ptr=seq_lens_arg, out_ptr=out,
            group_size=group, keys_per_split=plan.keys_per_split,
            num_splits=plan.num_splits,
            HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_S=MERGE_BLOCK_S,
            HAS_SEQ_LENS=seq_lens is not None, num_warps=4,
        )
    return out


# ------------------------------------------------------------------------------ compile specs

def _compile_specs():
    specs = []
    for dtype_name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16),
                              ("float32", torch.float32)):
        ptr = TRITON_POINTER_TYPES[dtype_name]
        block_n, num_stages = gpu_tile(dtype)
        # BLOCK_G = 16 (groups up to 16) and 32; the single-split epilogue once per dtype.
        variants = [(64, 4, False), (128, 4, False), (256, 4, False), (128, 4, True)]
        if dtype != torch.float32:  # the fp32 FMA path compiles slowly; one BLOCK_G suffices
            variants += [(64, 32, False), (128, 32, False), (256, 32, False)]
        for head_dim, group, single in variants:
            specs.append(CompileSpec(
                name=f"ragged_decode_attention_fwd_kernel[{dtype_name},D={head_dim},G={group},"
                     f"single={single}]",
                kernel=ragged_decode_attention_fwd_kernel,
                signature={"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr,
                           "cu_seqlens_ptr": "*i32", "seq_lens_ptr": "*i32",
                           "out_ptr": ptr, "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32",
                           "num_kv_heads": "i32", "group_size": "i32",
                           "keys_per_split": "i32", "num_splits": "i32",
                           "stride_qb": "i64", "stride_qh": "i64", "stride_qd": "i64",
                           "stride_kn": "i64", "stride_kd": "i64",
                           "stride_vn": "i64", "stride_vd": "i64", "qk_scale2": "fp32"},
                constexprs={"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim),
                            "BLOCK_G": _block_g(group), "BLOCK_N": block_n,
                            "HAS_SEQ_LENS": True, "SINGLE_SPLIT": single,
                            "UPCAST": False, "DOT_IEEE": dtype == torch.float32},
                num_warps=4, num_stages=num_stages,
                # fp32 takes the exact (IEEE) FMA path on purpose: no tensor cores.
                uses_dot=dtype != torch.float32))
        for head_dim in (64, 128, 256):
            specs.append(CompileSpec(
                name=f"ragged_decode_merge_fwd_kernel[{dtype_name},D={head_dim}]",
                kernel=ragged_decode_merge_fwd_kernel,
                signature={"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32",
                           "cu_seqlens_ptr": "*i32", "seq_lens_ptr": "*i32", "out_ptr": ptr,
                           "group_size": "i32", "keys_per_split": "i32", "num_splits": "i32"},
                constexprs={"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim),
                            "BLOCK_S": MERGE_BLOCK_S, "HAS_SEQ_LENS": True},
                num_warps=4))
    return specs


COMPILE_SPECS = _compile_specs()
