"""Triton kernels for ``attention_scores``: two passes, neither materialising the attention matrix.

Pass 1 — ``attention_lse_fwd_kernel`` (skipped when the caller passes ``lse``): online softmax in
base 2 over key tiles, giving every query row's log-sum-exp. A program owns ``BLOCK_M`` rows of the
flattened (query head of the group, query) space of one KV head — so a group's query heads share
each K tile — and one *split* of the keys. The launch plan chooses the number of splits by shape:

* few queries (an observation window, ``T_q`` up to ~128): few row blocks, so the keys are split
  until the grid fills the GPU even at batch 1; the per-split results are merged with a
  log-sum-exp over splits (a tiny tensor);
* many queries (reconstruction, ``T_q`` in the thousands): the row blocks alone fill the GPU and
  there is a single split — plain flash-attention forward without the ``P @ V`` product.

Pass 2 — ``attention_scores_fwd_kernel``: *key-stationary*. A program loads one ``BLOCK_N`` tile of
K once and streams every query of every head of its GQA group past it (like the dK/dV loop of a
flash-attention backward), recomputing ``p = exp2(s - lse)`` tile by tile into a ``[BLOCK_M,
BLOCK_N]`` accumulator that it reduces over rows once (per head only when the query and group
reductions mix max and mean). Each key's score is therefore produced by exactly one program in a
fixed order: results are deterministic and need neither atomics (``max``) nor per-query-block
partial buffers plus a second reduction (sums). Under causal masking a key block starts its query
loop at the first query that can see it, and only the tiles that straddle the diagonal are masked.

The instruction counts of both inner loops, the launch plans and the throughput they imply are in
docs/compile-report.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from proxykv._backend import interpreter_enabled
from proxykv.kernels._compile import TRITON_POINTER_TYPES, CompileSpec
from proxykv.kernels._fast_math import _fast_div
from proxykv.kernels._gpu import H100, PROGRAMS_PER_SM, GpuLimits, gpu_limits

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
REDUCE_CODES = {"mean": 0, "sum": 1, "max": 2}


@triton.jit
def _logits(q, k_t, UPCAST: tl.constexpr, DOT_IEEE: tl.constexpr):
    """``q @ k^T`` of a ``[M, D]`` and a ``[D, N]`` tile, float32."""
    if UPCAST:
        q = q.to(tl.float32)
        k_t = k_t.to(tl.float32)
    if DOT_IEEE:
        return tl.dot(q, k_t, input_precision="ieee")
    return tl.dot(q, k_t)


@triton.jit
def _tile_rows(BLOCK: tl.constexpr, WIDE_TILE_OFFSETS: tl.constexpr):
    """``0 .. BLOCK - 1``, the rows of a streamed tile. Their offsets from the tile's first row are
    loop-invariant: in int32 they are computed once and each tile adds one 64-bit scalar base. The
    launcher asks for int64 when ``(BLOCK - 1) * stride + (BLOCK_D - 1) * stride_d`` could reach
    2**31."""
    rows = tl.arange(0, BLOCK)
    if WIDE_TILE_OFFSETS:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def _online_log2_sum_exp(row_max, row_sum, s, qk_scale2):
    """Fold a ``[BLOCK_M, BLOCK_N]`` tile of logits into each row's running max and sum of
    ``exp2(qk_scale2 * s - max)`` (``qk_scale2 > 0``: the max is taken before scaling, so the
    exponent is one fused multiply-add)."""
    new_max = tl.maximum(row_max, tl.max(s, axis=1) * qk_scale2)
    row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(
        tl.exp2(s * qk_scale2 - new_max[:, None]), axis=1)
    return new_max, row_sum


@triton.jit
def _online_log2_sum_exp_guarded(row_max, row_sum, s, qk_scale2):
    """``_online_log2_sum_exp`` for tiles in which a row may see no key although it saw none
    before either (a sliding window: a row's keys are no longer a prefix of the split): the shift
    stays finite, so such a row keeps max ``-inf`` and sum 0 instead of NaN."""
    new_max = tl.maximum(row_max, tl.max(s, axis=1) * qk_scale2)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    row_sum = row_sum * tl.exp2(row_max - shift) + tl.sum(
        tl.exp2(s * qk_scale2 - shift[:, None]), axis=1)
    return new_max, row_sum


@triton.jit
def _capped_log2_logits(s, cap_scale2, cap2):
    """Soft-capped logits in base 2, ``log2(e) * softcap * tanh(scale * s / softcap)``, from raw
    ``s = q·k``; ``cap_scale2 = 2 log2(e) scale / softcap`` and ``cap2 = log2(e) softcap``.

    ``tanh(x) = 1 - 2 / (exp(2x) + 1)`` with one exp2 and an approximate division
    (``_fast_div``): for large ``x`` the exp2 overflows to inf and the result is ``+cap2``, for
    very negative ``x`` it underflows to 0 and the result is ``-cap2`` — never NaN. Near 0 the
    absolute error is float32's (~1e-7 · softcap), which is what a logit needs (not a relative
    one). libdevice's ``tanh`` does not run under the interpreter (it returns None there)."""
    return cap2 - _fast_div(2.0 * cap2, tl.exp2(s * cap_scale2) + 1.0)


@triton.jit
def _lse_masked_tile(row_max, row_sum, q, k_head_ptr, k_tile_offsets, tile_keys, dim_ok,
                     key_start, split_end, query_pos, window, stride_kt, qk_scale2, cap_scale2,
                     cap2, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Pass 1's masked key tile: mask causal (window) and split end, fold into the running max
    and sum. With ``softcap`` the logits are capped first (the max is then taken after scaling);
    with ``window`` a row may see none of the tile, so the update is guarded. Without either it
    is the plain tile (the flags are constexpr: the same code as before they existed)."""
    key_ok = tile_keys < split_end - key_start
    k_t = tl.load(k_head_ptr + key_start * stride_kt + k_tile_offsets,
                  mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
    visible = key_ok[None, :]
    if CAUSAL:
        visible = visible & (tile_keys[None, :] <= (query_pos - key_start)[:, None])
    if HAS_WINDOW:
        visible = visible & (tile_keys[None, :] > (query_pos - window - key_start)[:, None])
    if HAS_SOFTCAP:
        s = tl.where(visible, _capped_log2_logits(_logits(q, k_t, UPCAST, DOT_IEEE), cap_scale2,
                                                  cap2), float("-inf"))
        scale2 = 1.0
    else:
        s = tl.where(visible, _logits(q, k_t, UPCAST, DOT_IEEE), float("-inf"))
        scale2 = qk_scale2
    if HAS_WINDOW:
        return _online_log2_sum_exp_guarded(row_max, row_sum, s, scale2)
    return _online_log2_sum_exp(row_max, row_sum, s, scale2)


@triton.jit(do_not_specialize=["group_size", "T_q", "T_k", "q_offset", "keys_per_split",
                             "row_blocks", "window"])
def attention_lse_fwd_kernel(
    q_ptr, k_ptr, valid_len_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_ls, stride_lb, stride_lh, stride_lt,
    H_kv, group_size, T_q, T_k, q_offset, keys_per_split, row_blocks, qk_scale2,
    cap_scale2, cap2, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_VALID_LEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_IEEE: tl.constexpr, WIDE_TILE_OFFSETS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)  # (b * H_kv + kv_head) * row_blocks + row_block
    pid_bh = program // row_blocks
    row_block = program % row_blocks
    split = tl.program_id(1).to(tl.int64)
    batch = pid_bh // H_kv
    kv_head = pid_bh % H_kv

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group_size * T_q
    # Rows past the group's last re-read it: the loops need no row mask, and the store drops them.
    rows = tl.minimum(rows, group_size * T_q - 1)
    queries = rows % T_q
    heads = kv_head * group_size + rows // T_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load((q_ptr + batch * stride_qb + heads * stride_qh + queries * stride_qt)[:, None]
                + dims[None, :] * stride_qd, mask=dim_ok[None, :], other=0.0)
    query_pos = q_offset + queries

    key_end = T_k
    if HAS_VALID_LEN:
        key_end = tl.minimum(key_end, tl.load(valid_len_ptr + batch).to(tl.int64))
    split_start = split * keys_per_split
    split_end = tl.minimum(key_end, split_start + keys_per_split)
    # Keys before seen_by_all are visible to every row: whole tiles of them take no mask.
    seen_by_all = split_end
    if CAUSAL:
        split_end = tl.minimum(split_end, tl.max(query_pos, axis=0) + 1)
        seen_by_all = tl.minimum(split_end, tl.min(query_pos, axis=0) + 1)
    interior_end = split_start + tl.maximum(seen_by_all - split_start, 0) // BLOCK_N * BLOCK_N

    k_head_ptr = k_ptr + batch * stride_kb + kv_head * stride_kh
    tile_keys = _tile_rows(BLOCK_N, WIDE_TILE_OFFSETS)
    k_tile_offsets = tile_keys[None, :] * stride_kt + dims[:, None] * stride_kd  # [D, N]
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    interior_start = split_start
    if HAS_WINDOW:
        # Row r sees keys (query_pos - window, query_pos]. Tiles below every row's window are
        # skipped; those a row's lower window edge crosses take the mask; then the tiles every
        # row sees in full, then the causal tail.
        first_seen = tl.min(query_pos, axis=0) - window + 1  # the lowest key a row sees
        first_seen_by_all = tl.max(query_pos, axis=0) - window + 1
        window_start = split_start + tl.maximum(first_seen - split_start, 0) // BLOCK_N * BLOCK_N
        interior_start = split_start + tl.cdiv(tl.maximum(first_seen_by_all - split_start, 0),
                                               BLOCK_N) * BLOCK_N
        interior_start = tl.maximum(window_start, tl.minimum(interior_start, interior_end))
        interior_end = tl.maximum(interior_end, interior_start)
        for key_start in range(window_start, interior_start, BLOCK_N):
            row_max, row_sum = _lse_masked_tile(
                row_max, row_sum, q, k_head_ptr, k_tile_offsets, tile_keys, dim_ok, key_start,
                split_end, query_pos, window, stride_kt, qk_scale2, cap_scale2, cap2, CAUSAL,
                HAS_SOFTCAP, HAS_WINDOW, UPCAST, DOT_IEEE)
    for key_start in range(interior_start, interior_end, BLOCK_N):
        k_t = tl.load(k_head_ptr + key_start * stride_kt + k_tile_offsets, mask=dim_ok[:, None],
                      other=0.0)
        if HAS_SOFTCAP:  # cap first: the max is taken after scaling
            row_max, row_sum = _online_log2_sum_exp(
                row_max, row_sum,
                _capped_log2_logits(_logits(q, k_t, UPCAST, DOT_IEEE), cap_scale2, cap2), 1.0)
        else:
            row_max, row_sum = _online_log2_sum_exp(row_max, row_sum,
                                                    _logits(q, k_t, UPCAST, DOT_IEEE), qk_scale2)
    for key_start in range(interior_end, split_end, BLOCK_N):
        row_max, row_sum = _lse_masked_tile(
            row_max, row_sum, q, k_head_ptr, k_tile_offsets, tile_keys, dim_ok, key_start,
            split_end, query_pos, window, stride_kt, qk_scale2, cap_scale2, cap2, CAUSAL,
            HAS_SOFTCAP, HAS_WINDOW, UPCAST, DOT_IEEE)
    # The keys a row sees form a prefix of every split (causal and valid-length masks), so its
    # first tile either shows it a key or it sees none at all. A row that sees none has computed
    # -inf - -inf = NaN above; NaN > 0 is false, so it gets lse = -inf here. (With a window the
    # masked tiles take the guarded update: such a row keeps sum 0.)
    seen = row_sum > 0
    lse2 = tl.where(seen, row_max + tl.log2(tl.where(seen, row_sum, 1.0)), float("-inf"))
    lse_offsets = (split * stride_ls + batch * stride_lb + heads * stride_lh + queries * stride_lt)
    tl.store(lse_ptr + lse_offsets, lse2 / _LOG2E, mask=row_ok)


@triton.jit
def _query_tile_log2_probs(q_head_ptr, lse_head_ptr, query_start, T_q, q_tile_offsets, dim_ok,
                           k_t, stride_qt, stride_lt, qk_scale2, cap_scale2, cap2,
                           BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, DOT_IEEE: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr):
    """``log2`` of the probabilities ``[BLOCK_M, BLOCK_N]`` of queries ``query_start + i`` of one
    head for the keys of ``k_t``; ``-inf`` for rows past ``T_q`` and rows that see no key."""
    queries = query_start + tl.arange(0, BLOCK_M)
    row_ok = queries < T_q
    # int64 base: query_start * stride_qt passes 2**31 for a [B, T, H, D] cache at
    # H_q * D = 16384, T_q = 128k.
    q = tl.load(q_head_ptr + tl.cast(query_start, tl.int64) * stride_qt + q_tile_offsets,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    lse = tl.load(lse_head_ptr + queries.to(tl.int64) * stride_lt, mask=row_ok,
                  other=float("-inf"))
    # A row that sees no key (lse = -inf), or is past T_q, must contribute 0, not exp2(+inf).
    lse2 = tl.where(lse != float("-inf"), lse * _LOG2E, float("inf"))
    if HAS_SOFTCAP:
        return _capped_log2_logits(_logits(q, k_t, UPCAST, DOT_IEEE), cap_scale2,
                                   cap2) - lse2[:, None]
    return _logits(q, k_t, UPCAST, DOT_IEEE) * qk_scale2 - lse2[:, None]


@triton.jit
def _window_visible(visible, q_offset, query_start, key_start, window, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """``visible`` and the window's lower edge for a ``[BLOCK_M, BLOCK_N]`` tile of queries from
    ``query_start`` and keys from ``key_start``: key ``j`` is hidden from the query at position
    ``p`` iff ``j <= p - window``, in int32 in-tile indices (clamped so nothing overflows)."""
    last_hidden = tl.maximum(q_offset + query_start - key_start - window, -BLOCK_M).to(tl.int32)
    return visible & (tl.arange(0, BLOCK_N)[None, :]
                      > (tl.arange(0, BLOCK_M) + last_hidden)[:, None])


@triton.jit
def _accumulate(acc, log2_probs, REDUCE: tl.constexpr):
    """Fold a tile into the ``[BLOCK_M, BLOCK_N]`` accumulator. ``max`` keeps the largest log2
    probability and exponentiates once at the end (exp2 is monotonic), so its loop has no exp2."""
    if REDUCE == 2:
        return tl.maximum(acc, log2_probs)
    return acc + tl.exp2(log2_probs)


@triton.jit
def _reduce_rows(acc, REDUCE: tl.constexpr):
    """``[BLOCK_N]`` reduction over the rows of the accumulator: probabilities, not logs."""
    if REDUCE == 2:
        return tl.exp2(tl.max(acc, axis=0))
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["group_size", "T_q", "T_k", "q_offset", "key_blocks", "window"])
def attention_scores_fwd_kernel(
    q_ptr, k_ptr, lse_ptr, valid_len_ptr, out_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_lb, stride_lh, stride_lt,
    stride_ob, stride_oh,
    H_kv, group_size, T_q, T_k, q_offset, key_blocks, qk_scale2, cap_scale2, cap2, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_VALID_LEN: tl.constexpr, REDUCE: tl.constexpr,
    GROUP_MAX: tl.constexpr, UPCAST: tl.constexpr, DOT_IEEE: tl.constexpr,
    WIDE_TILE_OFFSETS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)  # (b * H_kv + kv_head) * key_blocks + key_block
    pid_bh = program // key_blocks
    key_block = program % key_blocks
    batch = pid_bh // H_kv
    kv_head = pid_bh % H_kv

    key_end = T_k
    if HAS_VALID_LEN:
        key_end = tl.minimum(key_end, tl.load(valid_len_ptr + batch).to(tl.int64))
    key_start = key_block * BLOCK_N
    keys = key_start + tl.arange(0, BLOCK_N)
    key_ok = keys < key_end
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    k_t = tl.load(k_ptr + batch * stride_kb + kv_head * stride_kh + keys[None, :] * stride_kt
                  + dims[:, None] * stride_kd, mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
    q_tile_offsets = (_tile_rows(BLOCK_M, WIDE_TILE_OFFSETS)[:, None] * stride_qt
                      + dims[None, :] * stride_qd)

    # The loops have no key mask: a key past key_end only changes its own column, which the store
    # overwrites with -inf. A block of such keys needs no query at all.
    query_end = tl.where(key_start < key_end, T_q, 0)
    diagonal_start = 0
    interior_start = 0
    if CAUSAL:
        # Tiles before interior_start hold a query that does not see every key of the block and
        # take the causal mask; from there on no tile is masked.
        first_seeing = tl.maximum(key_start - q_offset, 0)
        first_seeing_all = tl.maximum(key_start + BLOCK_N - 1 - q_offset, 0)
        diagonal_start = (first_seeing // BLOCK_M * BLOCK_M).to(tl.int32)
        interior_start = tl.minimum(tl.cdiv(first_seeing_all, BLOCK_M) * BLOCK_M,
                                    query_end).to(tl.int32)
    diagonal_end = interior_start
    interior_end = query_end
    seeing_end = query_end
    if HAS_WINDOW:  # (needs CAUSAL)
        # Query i (position q_offset + i) sees key j iff j <= q_offset + i < j + window: some key
        # of the block is seen by the queries before seeing_end, every key by those in
        # [interior_start, interior_end) (whole tiles); the rest take the causal and window mask.
        seeing_end = tl.minimum(query_end, tl.maximum(
            key_start + BLOCK_N - 1 + window - q_offset, 0)).to(tl.int32)
        seen_by_all_end = tl.maximum(key_start + window - q_offset, 0) // BLOCK_M * BLOCK_M
        diagonal_end = tl.minimum(interior_start, seeing_end)
        interior_end = tl.maximum(interior_start,
                                  tl.minimum(seen_by_all_end, query_end)).to(tl.int32)
    # The query and group reductions fold into one over every (head, query) row unless they differ
    # in kind (reduces_per_head, on the host): then each head is reduced on its own.
    PER_HEAD: tl.constexpr = GROUP_MAX != (REDUCE == 2)
    empty = float("-inf") if REDUCE == 2 else 0.0
    acc = tl.full([BLOCK_M, BLOCK_N], empty, tl.float32)
    group_acc = tl.zeros([BLOCK_N], tl.float32)  # the heads so far, when reduced per head
    for member in range(0, group_size):
        head = kv_head * group_size + member
        q_head_ptr = q_ptr + batch * stride_qb + head * stride_qh
        lse_head_ptr = lse_ptr + batch * stride_lb + head * stride_lh
        for query_start in range(diagonal_start, diagonal_end, BLOCK_M):
            log2_probs = _query_tile_log2_probs(q_head_ptr, lse_head_ptr, query_start, T_q,
                                                q_tile_offsets, dim_ok, k_t, stride_qt, stride_lt,
                                                qk_scale2, cap_scale2, cap2, BLOCK_M, UPCAST,
                                                DOT_IEEE, HAS_SOFTCAP)
            # In-tile int32 indices: key j is visible to query i iff j <= i + last_visible. (A
            # [1, N] against an [M, 1] that moves with the loop: an [M, N] index difference would
            # be hoisted out of the loops and hold BLOCK_M * BLOCK_N / threads registers.)
            last_visible = (q_offset + query_start - key_start).to(tl.int32)
            visible = (tl.arange(0, BLOCK_N)[None, :]
                       <= (tl.arange(0, BLOCK_M) + last_visible)[:, None])
            if HAS_WINDOW:
                visible = _window_visible(visible, q_offset, query_start, key_start, window,
                                          BLOCK_M, BLOCK_N)
            acc = _accumulate(acc, tl.where(visible, log2_probs, float("-inf")), REDUCE)
        for query_start in range(interior_start, interior_end, BLOCK_M):
            log2_probs = _query_tile_log2_probs(q_head_ptr, lse_head_ptr, query_start, T_q,
                                                q_tile_offsets, dim_ok, k_t, stride_qt, stride_lt,
                                                qk_scale2, cap_scale2, cap2, BLOCK_M, UPCAST,
                                                DOT_IEEE, HAS_SOFTCAP)
            acc = _accumulate(acc, log2_probs, REDUCE)
        if HAS_WINDOW:  # the queries whose window's lower edge crosses the block
            for query_start in range(interior_end, seeing_end, BLOCK_M):
                log2_probs = _query_tile_log2_probs(q_head_ptr, lse_head_ptr, query_start, T_q,
                                                    q_tile_offsets, dim_ok, k_t, stride_qt,
                                                    stride_lt, qk_scale2, cap_scale2, cap2,
                                                    BLOCK_M, UPCAST, DOT_IEEE, HAS_SOFTCAP)
                visible = _window_visible(tl.full([BLOCK_M, BLOCK_N], 1, tl.int1), q_offset,
                                          query_start, key_start, window, BLOCK_M, BLOCK_N)
                acc = _accumulate(acc, tl.where(visible, log2_probs, float("-inf")), REDUCE)
        if PER_HEAD:
            head_scores = _reduce_rows(acc, REDUCE)
            if REDUCE == 0:
                head_scores = head_scores / T_q
            if GROUP_MAX:
                group_acc = tl.maximum(group_acc, head_scores)
            else:
                group_acc += head_scores
            acc = tl.full([BLOCK_M, BLOCK_N], empty, tl.float32)
    if PER_HEAD:
        if not GROUP_MAX:
            group_acc = group_acc / group_size
    else:
        group_acc = _reduce_rows(acc, REDUCE)
        if REDUCE == 0:
            group_acc = group_acc / (T_q * group_size)
        elif REDUCE == 1:
            group_acc = group_acc / group_size
    tl.store(out_ptr + batch * stride_ob + kv_head * stride_oh + keys,
             tl.where(key_ok, group_acc, float("-inf")), mask=keys < T_k)


# --------------------------------------------------------------------------------- launch plan

@dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes, key splits and pipeline depths of one call: ``n_splits`` and ``num_stages``
    are pass 1's, ``score_stages`` pass 2's."""

    block_m: int
    block_n: int
    n_splits: int
    num_warps: int = 4
    num_stages: int = 2
    score_stages: int = 2


# (BLOCK_M, BLOCK_N, num_warps) of the GPU plans. fp16/bf16: 128-row tiles on 8 warps (two
# warpgroups sharing each K or Q tile) for reconstruction-length queries, 64 x 64 on 4 warps for
# an observation window (few rows; the keys are split instead). Pass 2 keeps two [BLOCK_M,
# BLOCK_N] float32 tiles per program (the dot and the accumulator) plus the K tile: the narrower
# tiles keep it from spilling where it needs more (D = 256; reductions that mix max and mean, whose
# per-head epilogue holds extra values). fp32 runs an FMA (IEEE) dot that holds its operands in
# registers: 16 x 16 is the largest tile whose pass 1 does not spill. Every choice is compiled and
# checked for spills by tests/test_compile.py.
LONG_QUERY_TILE = (128, 128, 8)
LONG_QUERY_NARROW_TILE = (128, 64, 8)
WINDOW_TILE = (64, 64, 4)
WIDE_HEAD_PER_HEAD_TILE = (64, 64, 8)
FP32_TILE = (16, 16, 4)
#: queries above this many are reconstruction-length (the long-query tile)
WINDOW_QUERIES = 128
# Every tile a GPU plan may use; perf/autotune_attention.py sweeps them.
GPU_TILES = [WINDOW_TILE, WIDE_HEAD_PER_HEAD_TILE, (64, 128, 4), LONG_QUERY_NARROW_TILE,
             LONG_QUERY_TILE]
MAX_STAGES = 3
# A third stage of queries spills pass 2 at 128 x 128 (compile report).
MAX_SCORE_STAGES = 2
#: CUDA's limit on grid axes 1 and 2 (axis 0 takes up to 2**31 - 1 programs)
GRID_YZ_LIMIT = 65535


# Shared memory beyond the tiles: the scratch of reductions across warps (1 KiB at most in every
# compiled variant; 64 x 64 on 8 warps needs it).
REDUCTION_SCRATCH_BYTES = 4096


def shared_memory_bytes(block_m: int, block_n: int, head_dim: int, itemsize: int, stages: int,
                        score_stages: int) -> tuple[int, int]:
    """Shared memory of (pass 1, pass 2): the tile a program keeps (Q in pass 1, K in pass 2) once,
    the tile it streams once per pipeline stage, and reduction scratch. An upper bound:
    ``tests/test_compile.py`` checks it against what the compiler allocates."""
    row_bytes = _block_d(head_dim) * itemsize
    return ((block_m + stages * block_n) * row_bytes + REDUCTION_SCRATCH_BYTES,
            (block_n + score_stages * block_m) * row_bytes + REDUCTION_SCRATCH_BYTES)


def _pipeline_depths(block_m: int, block_n: int, head_dim: int, itemsize: int,
                     shared_memory: int, min_stages: int = 2) -> tuple[int, int] | None:
    """The deepest ``(num_stages, score_stages)`` that fit in ``shared_memory``, each pass on its
    own; None when either pass cannot have ``min_stages``."""
    def deepest(pass_index: int, most: int) -> int:
        return max((stages for stages in range(min_stages, most + 1)
                    if shared_memory_bytes(block_m, block_n, head_dim, itemsize, stages,
                                           stages)[pass_index] <= shared_memory), default=0)

    stages, score_stages = deepest(0, MAX_STAGES), deepest(1, MAX_SCORE_STAGES)
    return (stages, score_stages) if stages and score_stages else None


def reduces_per_head(reduce_code: int, group_max: bool) -> bool:
    """Whether pass 2 reduces each head on its own (``PER_HEAD`` in the kernel): the query and
    group reductions differ in kind, a max of sums or a mean of maxima."""
    return group_max != (reduce_code == REDUCE_CODES["max"])


def _preferred_tile(t_q: int, head_dim: int, itemsize: int,
                    per_head: bool, features: bool = False) -> tuple[int, int, int]:
    if itemsize == 4:
        return FP32_TILE
    # Soft-capping and windows hold more per logit (the tanh, a second mask, a third loop): the
    # tiles that hold a per-head epilogue keep them in registers too (compile report).
    narrow = per_head or features
    if head_dim > 128 and narrow:
        return WIDE_HEAD_PER_HEAD_TILE
    if t_q <= WINDOW_QUERIES:
        return WINDOW_TILE
    return LONG_QUERY_NARROW_TILE if head_dim > 128 or narrow else LONG_QUERY_TILE


def gpu_tile_and_stages(t_q: int, head_dim: int, itemsize: int, *, per_head: bool = False,
                        features: bool = False,
                        limits: GpuLimits = H100) -> tuple[tuple[int, int, int], int, int]:
    """``((BLOCK_M, BLOCK_N, num_warps), num_stages, score_stages)`` of a GPU plan: the preferred
    tile for the shape (``per_head``: the query and group reductions mix max and mean;
    ``features``: soft-capping or a window), or a smaller one when the preferred one cannot be
    pipelined (two stages) in the device's shared memory; each pass pipelined as deep as shared
    memory allows."""
    preferred = _preferred_tile(t_q, head_dim, itemsize, per_head, features)
    smaller = WINDOW_TILE if itemsize < 4 else FP32_TILE
    # A smaller tile two stages deep before the preferred one unpipelined.
    for min_stages, tile in dict.fromkeys([(2, preferred), (2, smaller), (1, preferred),
                                           (1, smaller), (1, FP32_TILE)]):
        depths = _pipeline_depths(tile[0], tile[1], head_dim, itemsize, limits.shared_memory,
                                  min_stages)
        if depths is not None:
            return (tile, *depths)
    raise ValueError(f"no attention_scores tile fits in {limits.shared_memory} bytes of shared "
                     f"memory at head dim {head_dim}")


def _default_plan(batch: int, h_kv: int, group: int, t_q: int, t_k: int, on_gpu: bool, *,
                  head_dim: int = 128, itemsize: int = 2, per_head: bool = False,
                  features: bool = False, limits: GpuLimits = H100) -> LaunchPlan:
    if on_gpu:
        (block_m, block_n, num_warps), stages, score_stages = gpu_tile_and_stages(
            t_q, head_dim, itemsize, per_head=per_head, features=features, limits=limits)
        target = PROGRAMS_PER_SM * limits.sm_count
    else:  # the interpreter: fewer, larger programs run faster; splits still exercised
        (block_m, block_n, num_warps), stages, score_stages = (32, 32, 4), 2, 2
        target = 4
    row_blocks = triton.cdiv(group * t_q, block_m)
    key_blocks = triton.cdiv(t_k, block_n)
    wanted = math.ceil(target / max(1, batch * h_kv * row_blocks))
    return LaunchPlan(block_m, block_n, max(1, min(wanted, key_blocks)), num_warps, stages,
                      score_stages)


def launch_grids(batch: int, h_kv: int, group: int, t_q: int, t_k: int, *,
                 plan: LaunchPlan | None = None, on_gpu: bool = True, head_dim: int = 128,
                 itemsize: int = 2):
    """``(pass-1 grid, pass-2 grid, keys_per_split)`` of a call (``plan`` default: the default
    plan on an H100), computed without launching anything."""
    plan = plan or _default_plan(batch, h_kv, group, t_q, t_k, on_gpu, head_dim=head_dim,
                                 itemsize=itemsize)
    # The splits go on grid axis 1 (at most GRID_YZ_LIMIT): fewer, longer ones past that.
    wanted_keys = max(triton.cdiv(t_k, plan.n_splits), triton.cdiv(t_k, GRID_YZ_LIMIT))
    keys_per_split = triton.cdiv(wanted_keys, plan.block_n) * plan.block_n
    n_splits = triton.cdiv(t_k, keys_per_split)
    # The counts that grow with T (row blocks, key blocks) share axis 0 with B * H_kv: its limit
    # is 2**31 - 1 programs, where axes 1 and 2 stop at 65,535 (a group of 32 at 128k queries
    # already makes 65,536 row blocks of 64).
    lse_grid = (batch * h_kv * triton.cdiv(group * t_q, plan.block_m), n_splits)
    scores_grid = (batch * h_kv * triton.cdiv(t_k, plan.block_n),)
    return lse_grid, scores_grid, keys_per_split


def _flags(dtype: torch.dtype) -> dict:
    interpreting = interpreter_enabled()
    return {
        # ENV.md: the interpreter's tl.dot is wrong on bf16; fp32 operands are exact there.
        "UPCAST": interpreting and dtype == torch.bfloat16,
        # tl.dot on fp32 defaults to TF32 on the GPU; scores must match the fp32 reference.
        "DOT_IEEE": dtype == torch.float32,
    }


def _feature_args(scale: float, softcap: float | None, window: int | None) -> dict:
    """The soft-capping and window arguments of both kernels (placeholders when off)."""
    return {"cap_scale2": 0.0 if softcap is None else 2 * LOG2E * scale / softcap,
            "cap2": 0.0 if softcap is None else LOG2E * softcap,
            "window": 0 if window is None else window,
            "HAS_SOFTCAP": softcap is not None, "HAS_WINDOW": window is not None}


def row_lse_triton(q, k, *, scale, causal, q_offset, key_valid_len, plan: LaunchPlan,
                   softcap: float | None = None, window: int | None = None):
    """Pass 1: natural-log row log-sum-exp ``[B, H_q, T_q]`` float32 of the (soft-capped) logits
    over the keys each row sees (keys only: sinks are folded in by the caller)."""
    b, h_q, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    grid, _, keys_per_split = launch_grids(b, h_kv, group, t_q, t_k, plan=plan)
    n_splits = grid[1]
    partial = torch.empty(n_splits, b, h_q, t_q, dtype=torch.float32, device=q.device)
    attention_lse_fwd_kernel[grid](
        q_ptr=q, k_ptr=k, valid_len_ptr=key_valid_len if key_valid_len is not None else q,
        lse_ptr=partial,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2), stride_kd=k.stride(3),
        stride_ls=partial.stride(0), stride_lb=partial.stride(1), stride_lh=partial.stride(2),
        stride_lt=partial.stride(3),
        H_kv=h_kv, group_size=group, T_q=t_q, T_k=t_k, q_offset=q_offset,
        keys_per_split=keys_per_split, row_blocks=triton.cdiv(group * t_q, plan.block_m),
        qk_scale2=scale * LOG2E, **_feature_args(scale, softcap, window),
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        CAUSAL=causal, HAS_VALID_LEN=key_valid_len is not None, **_flags(q.dtype),
        WIDE_TILE_OFFSETS=_wide_tile_offsets(plan.block_n, k.stride(2), d, k.stride(3)),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return partial[0] if n_splits == 1 else torch.logsumexp(partial, dim=0)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _wide_tile_offsets(block: int, stride_t: int, head_dim: int, stride_d: int) -> bool:
    """Whether the in-tile offsets of a streamed ``[block, BLOCK_D]`` tile can reach 2**31 and the
    kernel must compute them in int64 (``_tile_rows``)."""
    return (block - 1) * stride_t + (_block_d(head_dim) - 1) * stride_d >= 2 ** 31


def attention_scores_triton(q, k, *, scale, causal, q_offset, reduce, group_reduce,
                            key_valid_len=None, lse=None, softcap=None, sinks=None, window=None,
                            plan: LaunchPlan | None = None):
    b, h_q, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    if window is not None and window >= q_offset + t_q:
        window = None  # every query's window reaches key 0: the causal mask alone
    if plan is None:
        plan = _default_plan(b, h_kv, group, t_q, t_k, q.is_cuda and not interpreter_enabled(),
                             head_dim=d, itemsize=q.element_size(),
                             per_head=reduces_per_head(REDUCE_CODES[reduce],
                                                       group_reduce == "max"),
                             features=softcap is not None or window is not None,
                             limits=gpu_limits(q.device))
    if key_valid_len is not None:
        key_valid_len = key_valid_len.to(torch.int64)  # [B]: the kernels read int64
    if lse is None:
        lse = row_lse_triton(q, k, scale=scale, causal=causal, q_offset=q_offset,
                             key_valid_len=key_valid_len, plan=plan, softcap=softcap,
                             window=window)
    if sinks is not None:  # the sink's exp(sinks[h]) joins each row's denominator
        lse = torch.logaddexp(lse, sinks.to(lse.device, torch.float32)[None, :, None])
    out = torch.empty(b, h_kv, t_k, dtype=torch.float32, device=q.device)
    _, grid, _ = launch_grids(b, h_kv, group, t_q, t_k, plan=plan)
    attention_scores_fwd_kernel[grid](
        q_ptr=q, k_ptr=k, lse_ptr=lse,
        valid_len_ptr=key_valid_len if key_valid_len is not None else q, out_ptr=out,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2), stride_kd=k.stride(3),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_lt=lse.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1),
        H_kv=h_kv, group_size=group, T_q=t_q, T_k=t_k, q_offset=q_offset,
        key_blocks=triton.cdiv(t_k, plan.block_n), qk_scale2=scale * LOG2E,
        **_feature_args(scale, softcap, window),
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        CAUSAL=causal, HAS_VALID_LEN=key_valid_len is not None, REDUCE=REDUCE_CODES[reduce],
        GROUP_MAX=group_reduce == "max", **_flags(q.dtype),
        WIDE_TILE_OFFSETS=_wide_tile_offsets(plan.block_m, q.stride(2), d, q.stride(3)),
        num_warps=plan.num_warps, num_stages=plan.score_stages,
    )
    return out


# ------------------------------------------------------------------------------ compile specs

# (CAUSAL, HAS_VALID_LEN, REDUCE, GROUP_MAX): the masking/reduction branches of the kernels.
_DEFAULT_FLAGS = (True, True, REDUCE_CODES["mean"], False)
_OTHER_FLAGS = [
    (True, False, REDUCE_CODES["max"], True),  # KVzip reconstruction
    (False, False, REDUCE_CODES["sum"], False),  # non-causal
    (True, False, REDUCE_CODES["max"], False),  # a mean of maxima: reduced per head
]
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
# One query length of each kind the plans tell apart: an observation window, a reconstruction.
_PLAN_QUERY_LENGTHS = (WINDOW_QUERIES, 4 * WINDOW_QUERIES)
_PLAN_HEAD_DIMS = {"bfloat16": (64, 80, 96, 128, 256), "float16": (128, 256),
                   "float32": (128, 256)}


# (HAS_SOFTCAP, HAS_WINDOW): the attention features (sinks change no kernel: they fold into the
# row log-sum-exp on the host).
_NO_FEATURES = (False, False)
_FEATURES = [((True, True), (128, 256), (_DEFAULT_FLAGS, _OTHER_FLAGS[0])),  # Gemma 2 + window
             ((True, False), (128,), (_DEFAULT_FLAGS,)),
             ((False, True), (128,), (_DEFAULT_FLAGS,))]


def _compile_variants():
    """``(dtype, head_dim, tile, stages, score_stages, flags, hot, features)`` to compile: every
    plan the launcher picks on an H100 (``hot``: it must not spill) — both query-length kinds at
    every head dim in bf16 and at D = 128 and 256 in fp16 and fp32, each masking/reduction branch
    at D = 128 and 256 in bf16 — the other tiles the autotuner tries, at D = 128, and the
    soft-capping/window variants (bf16, both plans; not hot: reported, not required spill-free)."""
    def plan(dtype, head_dim, t_q, flags, features=_NO_FEATURES, hot=True):
        per_head = reduces_per_head(reduce_code=flags[2], group_max=flags[3])
        return (dtype, head_dim, *gpu_tile_and_stages(t_q, head_dim, _ITEMSIZE[dtype],
                                                      per_head=per_head,
                                                      features=features != _NO_FEATURES),
                flags, hot, features)

    for dtype, head_dims in _PLAN_HEAD_DIMS.items():
        for head_dim in head_dims:
            for t_q in _PLAN_QUERY_LENGTHS:
                yield plan(dtype, head_dim, t_q, _DEFAULT_FLAGS)
    for flags in _OTHER_FLAGS:
        for head_dim in (128, 256):
            for t_q in _PLAN_QUERY_LENGTHS:
                yield plan("bfloat16", head_dim, t_q, flags)
    for tile in GPU_TILES:
        stages = _pipeline_depths(*tile[:2], 128, 2, H100.shared_memory)
        yield ("bfloat16", 128, tile, *stages, _DEFAULT_FLAGS, False, _NO_FEATURES)
    for features, head_dims, flag_sets in _FEATURES:
        for head_dim in head_dims:
            for flags in flag_sets:
                for t_q in _PLAN_QUERY_LENGTHS:
                    yield plan("bfloat16", head_dim, t_q, flags, features, hot=False)


def _compile_specs():
    """One spec per distinct variant of each kernel (pass 1 ignores the reductions)."""
    common_strides = {f"stride_{t}{a}": "i64" for t in "qk" for a in "bhtd"}
    specs = {}
    features_signature = {"cap_scale2": "fp32", "cap2": "fp32", "window": "i32"}
    for (dtype, head_dim, tile, stages, score_stages, flags, hot,
         features) in _compile_variants():
        block_m, block_n, num_warps = tile
        causal, has_valid_len, reduce_code, group_max = flags
        has_softcap, has_window = features
        ptr = TRITON_POINTER_TYPES[dtype]
        tiles = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "BLOCK_M": block_m,
                 "BLOCK_N": block_n, "UPCAST": False, "DOT_IEEE": dtype == "float32",
                 "WIDE_TILE_OFFSETS": False, "CAUSAL": causal, "HAS_VALID_LEN": has_valid_len,
                 "HAS_SOFTCAP": has_softcap, "HAS_WINDOW": has_window}
        tag = f"{dtype},D={head_dim},M={block_m},N={block_n},w={num_warps}"
        tag += ",softcap" * has_softcap + ",window" * has_window
        masks = "" if flags[:2] == _DEFAULT_FLAGS[:2] else \
            f",causal={causal},valid_len={has_valid_len}"
        reductions = "" if flags[2:] == _DEFAULT_FLAGS[2:] else \
            f",reduce={reduce_code},group_max={group_max}"
        lse_shared, scores_shared = shared_memory_bytes(block_m, block_n, head_dim,
                                                        _ITEMSIZE[dtype], stages, score_stages)
        # fp32 runs its dot in IEEE precision (FMA, no tensor cores) to match the fp32 reference.
        launch = dict(num_warps=num_warps, uses_dot=dtype != "float32",
                      unit_strides=("stride_qd", "stride_kd"))
        lse_spec = CompileSpec(
            name=f"attention_lse_fwd_kernel[{tag}{masks},stages={stages}]",
            kernel=attention_lse_fwd_kernel,
            signature={"q_ptr": ptr, "k_ptr": ptr, "valid_len_ptr": "*i64",
                       "lse_ptr": "*fp32", **common_strides,
                       **{f"stride_l{a}": "i64" for a in "sbht"},
                       "H_kv": "i32", "group_size": "i32", "T_q": "i32", "T_k": "i32",
                       "q_offset": "i32", "keys_per_split": "i32", "row_blocks": "i32",
                       "qk_scale2": "fp32", **features_signature},
            constexprs=tiles, num_stages=stages, shared_bound=lse_shared, hot=hot, **launch)
        scores_spec = CompileSpec(
            name=f"attention_scores_fwd_kernel[{tag}{masks}{reductions},stages={score_stages}]",
            kernel=attention_scores_fwd_kernel,
            signature={"q_ptr": ptr, "k_ptr": ptr, "lse_ptr": "*fp32", "valid_len_ptr": "*i64",
                       "out_ptr": "*fp32", **common_strides,
                       **{f"stride_l{a}": "i64" for a in "bht"},
                       "stride_ob": "i64", "stride_oh": "i64",
                       "H_kv": "i32", "group_size": "i32", "T_q": "i32", "T_k": "i32",
                       "q_offset": "i32", "key_blocks": "i32", "qk_scale2": "fp32",
                       **features_signature},
            constexprs={**tiles, "REDUCE": reduce_code, "GROUP_MAX": group_max},
            num_stages=score_stages, shared_bound=scores_shared, hot=hot, **launch)
        for spec in (lse_spec, scores_spec):
            if spec.name not in specs or spec.hot:
                specs[spec.name] = spec
    # The int64 in-tile offsets of a huge stride, once per kernel on the reconstruction plan.
    long_tile = f"bfloat16,D=128,M={LONG_QUERY_TILE[0]},N={LONG_QUERY_TILE[1]}"
    wide = [dataclasses.replace(spec, name=spec.name.replace("]", ",wide_offsets]"), hot=False,
                                constexprs={**spec.constexprs, "WIDE_TILE_OFFSETS": True})
            for spec in specs.values() if long_tile in spec.name and "causal" not in spec.name
            and not (spec.constexprs["HAS_SOFTCAP"] or spec.constexprs["HAS_WINDOW"])]
    return [*specs.values(), *wide]


COMPILE_SPECS = _compile_specs()
