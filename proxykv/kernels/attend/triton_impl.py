"""Triton kernels for ``ragged_attention``: a chunk of new tokens (``T_new >= 1``) attending over a
per-head compacted KV cache, split-K ("flash-decoding") over ragged segments.

``ragged_attention_fwd_kernel`` — a program owns one segment (KV head ``h`` of batch ``b``), one
block of ``BLOCK_M`` *query rows* of that segment and one *split* of its keys. The query rows of a
segment are the ``T_new × G`` pairs (new token ``t``, query head ``g`` of the GQA group) flattened
``t``-major, so GQA heads share every K/V tile load and one block covers consecutive token
positions (its causal limits are close together). The logits are computed transposed —
``K_tile [BLOCK_N, D] @ Q^T [D, BLOCK_M]`` and ``V^T [D, BLOCK_N] @ P^T [BLOCK_N, BLOCK_M]`` — so
keys and D are the MMA's M side and the query rows (as few as one token's heads, padded to 16) its
N side: on sm_90 a legal ``wgmma`` shape even for decode, where ``Q @ K^T`` with M = G < 64 would
not be.

Visibility: the last ``T_new`` valid rows of a segment are the new tokens' own K/V; query row
``(t, g)`` sees the segment's first ``seq_len - T_new + t + 1`` rows. Base-2 online softmax; a row
that sees no key of a split contributes nothing (its log-sum-exp is ``-inf``).

The split size is uniform across segments (planned on the host from the longest segment), so
every busy program does at most the same work whatever the per-head budgets; programs past the
end of a shorter segment exit without writing. Each busy split writes its normalised partial
output and its base-2 log-sum-exp; ``ragged_attention_merge_fwd_kernel`` combines a query row's
splits (``out = Σ 2^(lse_i - m) o_i / Σ 2^(lse_i - m)``). When one split covers the longest segment
the main kernel writes the final output itself and no merge runs.

Grid: axis 0 = segments × query blocks (up to 2^31 - 1), axis 1 = splits (a few hundred at most).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from proxykv._backend import interpreter_enabled
from proxykv.kernels._compile import TRITON_POINTER_TYPES, CompileSpec
from proxykv.kernels._fast_math import _fast_div
from proxykv.kernels._gpu import H100, PROGRAMS_PER_SM, gpu_limits

LOG2E = 1.4426950408889634
# the kernels' LSE is base 2; the API's is natural
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)


@triton.jit
def _segment_bounds(cu_seqlens_ptr, seq_lens_ptr, segment, HAS_SEQ_LENS: tl.constexpr):
    """(first row, number of valid rows) of a segment of the (possibly room-padded) layout."""
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


@triton.jit
def _capped_log2_logits(s, cap_scale2, cap2):
    """Soft-capped logits in base 2, ``log2(e) * softcap * tanh(scale * s / softcap)``, from raw
    ``s = q·k``; ``cap_scale2 = 2 log2(e) scale / softcap``, ``cap2 = log2(e) softcap``. ``tanh(x)
    = 1 - 2 / (exp(2x) + 1)``: exp2 overflows to inf (-> +cap2) or underflows to 0 (-> -cap2) for
    large ``|x|``, never NaN (as in the attention_scores kernels)."""
    return cap2 - _fast_div(2.0 * cap2, tl.exp2(s * cap_scale2) + 1.0)


@triton.jit(do_not_specialize=["num_new", "keys_per_split", "num_splits", "num_query_blocks",
                               "window"])
def ragged_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, seq_lens_ptr,
    out_ptr, lse_ptr, partial_out_ptr, partial_lse_ptr, sinks_ptr, key_positions_ptr,
    num_kv_heads, group_size, num_new, keys_per_split, num_splits, num_query_blocks,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kn, stride_kd, stride_vn, stride_vd,
    qk_scale2, cap_scale2, cap2, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr, SINGLE_SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_IEEE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    segment = program // num_query_blocks
    query_block = program % num_query_blocks
    batch = segment // num_kv_heads
    kv_head = segment % num_kv_heads
    seg_start, seg_len = _segment_bounds(cu_seqlens_ptr, seq_lens_ptr, segment, HAS_SEQ_LENS)
    context_len = seg_len - num_new  # rows before the new tokens' own

    # Query rows of this block: (token t, group member g), t-major.
    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_new * group_size
    tokens = rows // group_size
    heads = kv_head * group_size + rows % group_size
    visible = context_len + tokens + 1  # keys [0, visible) are seen by each row
    last_token = tl.minimum(query_block * BLOCK_M + BLOCK_M - 1, num_new * group_size - 1)
    block_visible = context_len + last_token // group_size + 1
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, block_visible)

    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_t = tl.load(q_ptr + batch * stride_qb + heads[None, :] * stride_qh
                  + tokens[None, :] * stride_qt + dims[:, None] * stride_qd,
                  mask=row_ok[None, :] & dim_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_M]

    if HAS_WINDOW:
        # A row sees the keys at positions > its own row's position - window (the new tokens'
        # own rows are the segment's last T_new valid rows).
        own_rows = context_len + tokens
        window_floor = tl.load(key_positions_ptr + seg_start + own_rows,
                               mask=row_ok & (own_rows >= 0), other=0).to(tl.int64) - window
        if key_positions_ptr.dtype.element_ty == tl.int32:
            # int32 positions (RaggedKVCache's) compare in int32, the floor saturated at INT32_MIN
            # (every position above it is seen): half the registers of an int64 [N, M] compare.
            window_floor = tl.maximum(window_floor, -2147483648).to(tl.int32)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([BLOCK_D, BLOCK_M], tl.float32)
    for key_start in range(key_lo, key_hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < key_hi
        tile_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + (seg_start + keys)[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=tile_mask, other=0.0)
        if HAS_SOFTCAP:  # [BLOCK_N, BLOCK_M]
            logits_t = _capped_log2_logits(_mma(k, q_t, UPCAST, DOT_IEEE), cap_scale2, cap2)
        else:
            logits_t = _mma(k, q_t, UPCAST, DOT_IEEE) * qk_scale2  # [BLOCK_N, BLOCK_M]
        if HAS_WINDOW:
            key_pos = tl.load(key_positions_ptr + seg_start + keys, mask=key_ok, other=0)
            logits_t = tl.where((keys[:, None] < visible[None, :])
                                & (key_pos[:, None] > window_floor[None, :]), logits_t,
                                float("-inf"))
        else:
            logits_t = tl.where(keys[:, None] < visible[None, :], logits_t, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits_t, axis=0))
        # A row that has seen no key yet keeps max -inf: shift by 0 so -inf - -inf never occurs.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p_t = tl.exp2(logits_t - shift[None, :])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p_t, axis=0)
        v = tl.load(v_ptr + (seg_start + keys)[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=tile_mask, other=0.0)
        acc_t = acc_t * rescale[None, :] + _mma(tl.trans(v), p_t.to(v.dtype), UPCAST, DOT_IEEE)
        row_max = new_max

    has_keys = row_sum > 0
    if HAS_SINKS and SINGLE_SPLIT:  # exp(sink) joins the denominator (relative to row_max)
        sink2 = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0) * _LOG2E
        out_t = acc_t / tl.where(has_keys, row_sum + tl.exp2(sink2 - row_max), 1.0)[None, :]
    else:
        out_t = acc_t / tl.where(has_keys, row_sum, 1.0)[None, :]
    lse2 = tl.where(has_keys, row_max + tl.log2(tl.where(has_keys, row_sum, 1.0)), float("-inf"))
    # Row of the [B, H_q, T_new] output: ((b * H_q + head) * T_new + t).
    query_rows = (batch * num_kv_heads * group_size + heads) * num_new + tokens
    if SINGLE_SPLIT:
        # A row that sees no key leaves acc_t = 0: it outputs zeros (and LSE -inf).
        tl.store(out_ptr + query_rows[None, :] * HEAD_DIM + dims[:, None],
                 out_t.to(out_ptr.dtype.element_ty), mask=row_ok[None, :] & dim_ok[:, None])
        if RETURN_LSE:
            tl.store(lse_ptr + query_rows, lse2 * LN2, mask=row_ok)
    else:
        # A split past the end of the block's visible keys writes nothing; the merge reads only
        # busy splits. (key_lo broadcast first: the interpreter rejects a vector & scalar-bool.)
        busy = row_ok & ((rows * 0 + key_lo) < block_visible)
        partial_rows = query_rows * num_splits + split
        tl.store(partial_out_ptr + partial_rows[None, :] * HEAD_DIM + dims[:, None], out_t,
                 mask=busy[None, :] & dim_ok[:, None])
        tl.store(partial_lse_ptr + partial_rows, lse2, mask=busy)


@triton.jit(do_not_specialize=["num_new", "keys_per_split", "num_splits"])
def ragged_attention_merge_fwd_kernel(
    partial_out_ptr, partial_lse_ptr, cu_seqlens_ptr, seq_lens_ptr, out_ptr, lse_ptr, sinks_ptr,
    group_size, num_new, keys_per_split, num_splits, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr, RETURN_LSE: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    query_row = tl.program_id(0).to(tl.int64)  # (b * H_q + query head) * T_new + t
    token = query_row % num_new
    segment = query_row // num_new // group_size  # = b * H_kv + query head // group_size
    _, seg_len = _segment_bounds(cu_seqlens_ptr, seq_lens_ptr, segment, HAS_SEQ_LENS)
    visible = seg_len - num_new + token + 1
    busy_splits = tl.minimum(tl.cdiv(tl.maximum(visible, 0), keys_per_split), num_splits)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lse_base = partial_lse_ptr + query_row * num_splits
    out_base = partial_out_ptr + query_row * num_splits * HEAD_DIM

    lse_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for first in range(0, busy_splits, BLOCK_S):
        splits = first + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_base + splits, mask=splits < busy_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    top = tl.max(lse_max, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)  # no key seen: avoid -inf - -inf

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
    if HAS_SINKS:  # exp(sink) joins the denominator (relative to shift); the LSE stays the keys'
        sink2 = tl.load(sinks_ptr + query_row // num_new % num_heads) * _LOG2E
        out = acc / tl.where(total > 0, total + tl.exp2(sink2 - shift), 1.0)
    else:
        out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + query_row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)
    if RETURN_LSE:
        lse = tl.where(total > 0, shift + tl.log2(tl.where(total > 0, total, 1.0)),
                       float("-inf"))
        tl.store(lse_ptr + query_row, lse * LN2)


# ------------------------------------------------------------------------------ launch plan

@dataclass(frozen=True)
class RaggedAttentionPlan:
    block_m: int
    block_n: int
    keys_per_split: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3


#: CUDA's limit on grid axis 1 (the splits)
GRID_YZ_LIMIT = 65535
# A split covers at least this many key tiles, so the partial outputs it writes and the merge
# reads stay a few percent of its K/V traffic.
GPU_MIN_TILES_PER_SPLIT = 4
MERGE_BLOCK_S = 16
# Elements of the fp32 accumulator [BLOCK_D, BLOCK_M] (and of Q^T) a program holds: 32 registers
# per thread each at 4 warps, so D = 256 keeps 16 query rows, D = 64 keeps 64.
ACCUMULATOR_ELEMENTS = 4096


def gpu_tile(dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_N, num_stages)`` on a GPU. fp32 runs the FMA (IEEE) dot, whose operand staging
    needs about twice the shared memory per tile: smaller tiles and one stage less fit D = 256
    within sm_80's 163 KiB."""
    return (32, 2) if dtype == torch.float32 else (64, 3)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def block_m(query_rows: int, head_dim: int) -> int:
    """Query rows per program: all of a segment's ``T_new × G`` when they fit, at least 16
    (``tl.dot``'s smallest N), at most what keeps the accumulator within registers."""
    cap = max(16, ACCUMULATOR_ELEMENTS // block_d(head_dim))
    return min(cap, max(16, triton.next_power_of_2(query_rows)))


def plan_ragged_attention(max_seq_len: int, num_segments: int, query_rows: int, head_dim: int,
                          dtype: torch.dtype, on_gpu: bool, keys_per_split: int | None = None,
                          total_rows: int | None = None,
                          sm_count: int = H100.sm_count) -> RaggedAttentionPlan:
    """Split every segment into pieces of ``keys_per_split`` keys (uniform across segments).

    Chosen from the total work: the programs that have keys to read number about
    ``(total_rows / keys_per_split + segments) × query blocks``, which should reach the target
    (a few waves of the GPU's ``sm_count`` SMs) — so a batch of short segments beside a long one, or a small
    batch, still fills the machine, where sizing from the longest segment alone left most SMs
    idle. ``total_rows`` (rows of K/V to read, at most; default ``max_seq_len × segments``) is
    known on the host. Splits past a segment's end exit at once. At most ``GRID_YZ_LIMIT``
    splits (grid axis 1)."""
    rows_per_block = block_m(query_rows, head_dim)
    query_blocks = triton.cdiv(query_rows, rows_per_block)
    programs = num_segments * query_blocks
    if on_gpu:
        (block_n, num_stages), target = gpu_tile(dtype), PROGRAMS_PER_SM * sm_count
        min_tiles = GPU_MIN_TILES_PER_SPLIT
    else:  # the interpreter: few, large programs are fastest; splits are still exercised
        block_n, num_stages, target, min_tiles = 32, 1, 4, 1
    tiles = max(1, triton.cdiv(max_seq_len, block_n))
    fewest_tiles = triton.cdiv(tiles, GRID_YZ_LIMIT)  # per split, so splits fit grid axis 1
    if keys_per_split is None:
        total_tiles = triton.cdiv(max(1, total_rows if total_rows is not None
                                      else max_seq_len * num_segments), block_n)
        spare = target - programs  # programs the splits beyond each segment's first may add
        tiles_per_split = tiles if spare <= 0 else triton.cdiv(total_tiles * query_blocks, spare)
        tiles_per_split = max(min_tiles, fewest_tiles, min(tiles, tiles_per_split))
        keys_per_split = tiles_per_split * block_n
    elif keys_per_split < 1 or keys_per_split % block_n:
        raise ValueError(f"keys_per_split must be a positive multiple of BLOCK_N={block_n}, "
                         f"got {keys_per_split}")
    elif keys_per_split < fewest_tiles * block_n:
        raise ValueError(f"keys_per_split={keys_per_split} makes more than {GRID_YZ_LIMIT} "
                         f"splits of a {max_seq_len}-row segment; use at least "
                         f"{fewest_tiles * block_n}")
    num_splits = max(1, triton.cdiv(max_seq_len, keys_per_split))
    return RaggedAttentionPlan(rows_per_block, block_n, keys_per_split, num_splits,
                               num_stages=num_stages)


def ragged_attention_triton(q, k_packed, v_packed, cu_seqlens, seq_lens, *, scale, max_seq_len,
                            return_lse, total_rows: int | None = None,
                            plan: RaggedAttentionPlan | None = None, softcap=None, sinks=None,
                            window=None, key_positions=None):
    """``q [B, H_q, T_new, D]`` → ``out [B, H_q, T_new, D]`` (and natural-log LSE of the keys
    ``[B, H_q, T_new]`` float32 when ``return_lse``). Inputs are validated by the API (``sinks``
    float32 ``[H_q]``; ``key_positions`` with ``window``)."""
    b, h_q, num_new, d = q.shape
    num_segments = cu_seqlens.numel() - 1
    h_kv = num_segments // b
    group = h_q // h_kv
    query_rows = num_new * group
    if plan is None:
        plan = plan_ragged_attention(max_seq_len, num_segments, query_rows, d, q.dtype,
                                     q.is_cuda and not interpreter_enabled(),
                                     total_rows=total_rows,
                                     sm_count=gpu_limits(q.device).sm_count)
    out = torch.empty(b, h_q, num_new, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, num_new, dtype=torch.float32, device=q.device) if return_lse \
        else out
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    single = plan.num_splits == 1
    if single:
        partial_out = partial_lse = out  # unused
    else:
        partial_out = torch.empty(b * h_q * num_new, plan.num_splits, d, dtype=torch.float32,
                                  device=q.device)
        partial_lse = torch.empty(b * h_q * num_new, plan.num_splits, dtype=torch.float32,
                                  device=q.device)
    seq_lens_arg = seq_lens if seq_lens is not None else cu_seqlens
    num_query_blocks = triton.cdiv(query_rows, plan.block_m)
    ragged_attention_fwd_kernel[(num_segments * num_query_blocks, plan.num_splits)](
        q_ptr=q, k_ptr=k_packed, v_ptr=v_packed, cu_seqlens_ptr=cu_seqlens,
        seq_lens_ptr=seq_lens_arg, out_ptr=out, lse_ptr=lse, partial_out_ptr=partial_out,
        partial_lse_ptr=partial_lse, sinks_ptr=sinks if sinks is not None else lse,
        key_positions_ptr=key_positions if window is not None else cu_seqlens,
        num_kv_heads=h_kv, group_size=group, num_new=num_new,
        keys_per_split=plan.keys_per_split, num_splits=plan.num_splits,
        num_query_blocks=num_query_blocks,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2), stride_qd=q.stride(3),
        stride_kn=k_packed.stride(0), stride_kd=k_packed.stride(1),
        stride_vn=v_packed.stride(0), stride_vd=v_packed.stride(1),
        qk_scale2=scale * LOG2E,
        cap_scale2=0.0 if softcap is None else 2 * LOG2E * scale / softcap,
        cap2=0.0 if softcap is None else LOG2E * softcap, window=0 if window is None else window,
        HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        HAS_SEQ_LENS=seq_lens is not None, SINGLE_SPLIT=single, RETURN_LSE=return_lse,
        UPCAST=interpreter_enabled() and q.dtype == torch.bfloat16,
        DOT_IEEE=q.dtype == torch.float32, HAS_SOFTCAP=softcap is not None,
        HAS_SINKS=sinks is not None, HAS_WINDOW=window is not None,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if not single:
        ragged_attention_merge_fwd_kernel[(b * h_q * num_new,)](
            partial_out_ptr=partial_out, partial_lse_ptr=partial_lse, cu_seqlens_ptr=cu_seqlens,
            seq_lens_ptr=seq_lens_arg, out_ptr=out, lse_ptr=lse,
            sinks_ptr=sinks if sinks is not None else partial_lse,
            group_size=group, num_new=num_new, keys_per_split=plan.keys_per_split,
            num_splits=plan.num_splits, num_heads=h_q,
            HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_S=MERGE_BLOCK_S,
            HAS_SEQ_LENS=seq_lens is not None, RETURN_LSE=return_lse,
            HAS_SINKS=sinks is not None, num_warps=4,
        )
    return (out, lse) if return_lse else out


def ragged_decode_attention_triton(q, k_packed, v_packed, cu_seqlens, seq_lens, *, scale,
                                   max_seq_len, total_rows: int | None = None,
                                   plan: RaggedAttentionPlan | None = None, softcap=None,
                                   sinks=None, window=None, key_positions=None):
    """``q [B, H_q, D]``: the one-token case (every valid row visible) → ``[B, H_q, D]``."""
    return ragged_attention_triton(q[:, :, None], k_packed, v_packed, cu_seqlens, seq_lens,
                                   scale=scale, max_seq_len=max_seq_len, return_lse=False,
                                   total_rows=total_rows, plan=plan, softcap=softcap,
                                   sinks=sinks, window=window,
                                   key_positions=key_positions)[:, :, 0]


# ------------------------------------------------------------------------------ compile specs

_NO_FEATURES = (False, False, False)  # (HAS_SOFTCAP, HAS_SINKS, HAS_WINDOW)


def _fwd_spec(dtype_name: str, head_dim: int, rows: int, single: bool, with_lse: bool,
              features: tuple[bool, bool, bool] = _NO_FEATURES, hot: bool = True) -> CompileSpec:
    dtype = getattr(torch, dtype_name)
    ptr = TRITON_POINTER_TYPES[dtype_name]
    block_n, num_stages = gpu_tile(dtype)
    has_softcap, has_sinks, has_window = features
    tag = ",softcap" * has_softcap + ",sinks" * has_sinks + ",window" * has_window
    return CompileSpec(
        name=f"ragged_attention_fwd_kernel[{dtype_name},D={head_dim},M={rows},"
             f"single={single},lse={with_lse}{tag}]",
        kernel=ragged_attention_fwd_kernel,
        signature={"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr,
                   "cu_seqlens_ptr": "*i32", "seq_lens_ptr": "*i32",
                   "out_ptr": ptr, "lse_ptr": "*fp32",
                   "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32",
                   "sinks_ptr": "*fp32", "key_positions_ptr": "*i32",
                   "num_kv_heads": "i32", "group_size": "i32", "num_new": "i32",
                   "keys_per_split": "i32", "num_splits": "i32",
                   "num_query_blocks": "i32",
                   "stride_qb": "i64", "stride_qh": "i64", "stride_qt": "i64",
                   "stride_qd": "i64", "stride_kn": "i64", "stride_kd": "i64",
                   "stride_vn": "i64", "stride_vd": "i64", "qk_scale2": "fp32",
                   "cap_scale2": "fp32", "cap2": "fp32", "window": "i32"},
        constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim),
                    "BLOCK_M": rows, "BLOCK_N": block_n,
                    "HAS_SEQ_LENS": True, "SINGLE_SPLIT": single,
                    "RETURN_LSE": with_lse, "UPCAST": False,
                    "DOT_IEEE": dtype == torch.float32, "HAS_SOFTCAP": has_softcap,
                    "HAS_SINKS": has_sinks, "HAS_WINDOW": has_window},
        num_warps=4, num_stages=num_stages,
        unit_strides=("stride_qd", "stride_kd", "stride_vd"),
        # fp32 takes the exact (IEEE) FMA path on purpose: no tensor cores, and it is not
        # the path a GPU run takes (hot: must not spill).
        uses_dot=dtype != torch.float32, hot=hot and dtype != torch.float32)


def _merge_spec(dtype_name: str, head_dim: int, has_sinks: bool = False,
                hot: bool = True) -> CompileSpec:
    return CompileSpec(
        name=f"ragged_attention_merge_fwd_kernel[{dtype_name},D={head_dim}"
             f"{',sinks' * has_sinks}]",
        kernel=ragged_attention_merge_fwd_kernel,
        signature={"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32",
                   "cu_seqlens_ptr": "*i32", "seq_lens_ptr": "*i32",
                   "out_ptr": TRITON_POINTER_TYPES[dtype_name], "lse_ptr": "*fp32",
                   "sinks_ptr": "*fp32", "group_size": "i32", "num_new": "i32",
                   "keys_per_split": "i32", "num_splits": "i32", "num_heads": "i32"},
        constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim),
                    "BLOCK_S": MERGE_BLOCK_S, "HAS_SEQ_LENS": True,
                    "RETURN_LSE": True, "HAS_SINKS": has_sinks},
        num_warps=4, hot=hot)


def _compile_specs():
    specs = []
    for dtype_name in ("float16", "bfloat16", "float32"):
        # Decode (one token, a group of up to 16 heads: BLOCK_M = 16) and a question chunk
        # (BLOCK_M at its cap for D); the single-split epilogue with the LSE once per dtype.
        variants = [(64, 16, False, False), (128, 16, False, False), (256, 16, False, False),
                    (128, 16, True, True)]
        if dtype_name != "float32":  # the fp32 FMA path compiles slowly; decode variants suffice
            variants += [(64, block_m(1 << 20, 64), False, True),
                         (128, block_m(1 << 20, 128), False, False)]
        specs += [_fwd_spec(dtype_name, *variant) for variant in variants]
        specs += [_merge_spec(dtype_name, head_dim) for head_dim in (64, 128, 256)]
    # Soft-capping, sinks and a sliding window all on (Gemma 2 / gpt-oss layers), bf16: decode
    # (split and single-split epilogues) and a question chunk, at D = 128 and 256; the merge with
    # sinks. Not hot: reported (registers, spills), not required spill-free.
    every_feature = (True, True, True)
    for head_dim in (128, 256):
        for rows, single, with_lse in ((16, False, False), (16, True, True),
                                       (block_m(1 << 20, head_dim), False, True)):
            specs.append(_fwd_spec("bfloat16", head_dim, rows, single, with_lse, every_feature,
                                   hot=False))
        specs.append(_merge_spec("bfloat16", head_dim, has_sinks=True, hot=False))
    return specs


COMPILE_SPECS = _compile_specs()
