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
flash-attention backward), recomputing ``p = exp2(s - lse)`` tile by tile and reducing over queries
in registers, then over the group's heads. Each key's score is therefore produced by exactly one
program in a fixed order: results are deterministic and need neither atomics (``max``) nor
per-query-block partial buffers plus a second reduction (sums). Under causal masking a key block
starts its query loop at the first query that can see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from proxykv._backend import interpreter_enabled
from proxykv.kernels._compile import TRITON_POINTER_TYPES, CompileSpec

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
REDUCE_CODES = {"mean": 0, "sum": 1, "max": 2}


@triton.jit
def _load_q_tile(row_ptrs, row_ok, dims, stride_qd, HEAD_DIM: tl.constexpr):
    """``[M, BLOCK_D]`` tile of queries whose rows start at ``row_ptrs`` (zeros where masked)."""
    return tl.load(row_ptrs[:, None] + dims[None, :] * stride_qd,
                   mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _scaled_logits(q, k_t, qk_scale2, UPCAST: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Base-2 logits ``log2(e) * scale * q @ k^T`` of a ``[M, D]`` and a ``[D, N]`` tile."""
    if UPCAST:
        q = q.to(tl.float32)
        k_t = k_t.to(tl.float32)
    if DOT_IEEE:
        s = tl.dot(q, k_t, input_precision="ieee")
    else:
        s = tl.dot(q, k_t)
    return s * qk_scale2


@triton.jit(do_not_specialize=["group_size", "T_q", "T_k", "q_offset", "keys_per_split",
                             "row_blocks"])
def attention_lse_fwd_kernel(
    q_ptr, k_ptr, valid_len_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_ls, stride_lb, stride_lh, stride_lt,
    H_kv, group_size, T_q, T_k, q_offset, keys_per_split, row_blocks, qk_scale2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_VALID_LEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)  # (b * H_kv + kv_head) * row_blocks + row_block
    pid_bh = program // row_blocks
    row_block = program % row_blocks
    split = tl.program_id(1).to(tl.int64)
    batch = pid_bh // H_kv
    kv_head = pid_bh % H_kv

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group_size * T_q
    queries = rows % T_q
    heads = kv_head * group_size + rows // T_q
    dims = tl.arange(0, BLOCK_D)
    q = _load_q_tile(q_ptr + batch * stride_qb + heads * stride_qh + queries * stride_qt, row_ok,
                     dims, stride_qd, HEAD_DIM)
    query_pos = q_offset + queries

    key_end = T_k
    if HAS_VALID_LEN:
        key_end = tl.minimum(key_end, tl.load(valid_len_ptr + batch).to(tl.int64))
    split_start = split * keys_per_split
    split_end = tl.minimum(key_end, split_start + keys_per_split)
    if CAUSAL:
        last_query_pos = tl.max(tl.where(row_ok, query_pos, 0), axis=0)
        split_end = tl.minimum(split_end, last_query_pos + 1)

    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for key_start in range(split_start, split_end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < split_end
        k_t = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None] * stride_kd,
                      mask=key_ok[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)
        s = _scaled_logits(q, k_t, qk_scale2, UPCAST, DOT_IEEE)
        visible = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= query_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]),
                                                                axis=1)
        row_max = new_max
    # The keys a row sees form a prefix of every split (causal and valid-length masks), so its
    # first tile either shows it a key or it sees none at all. A row that sees none has computed
    # -inf - -inf = NaN above; NaN > 0 is false, so it gets lse = -inf here.
    seen = row_sum > 0
    lse2 = tl.where(seen, row_max + tl.log2(tl.where(seen, row_sum, 1.0)), float("-inf"))
    lse_offsets = (split * stride_ls + batch * stride_lb + heads * stride_lh + queries * stride_lt)
    tl.store(lse_ptr + lse_offsets, lse2 / _LOG2E, mask=row_ok)


@triton.jit(do_not_specialize=["group_size", "T_q", "T_k", "q_offset", "key_blocks"])
def attention_scores_fwd_kernel(
    q_ptr, k_ptr, lse_ptr, valid_len_ptr, out_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_lb, stride_lh, stride_lt,
    stride_ob, stride_oh,
    H_kv, group_size, T_q, T_k, q_offset, key_blocks, qk_scale2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_VALID_LEN: tl.constexpr, REDUCE: tl.constexpr,
    GROUP_MAX: tl.constexpr, UPCAST: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)  # (b * H_kv + kv_head) * key_blocks + key_block
    pid_bh = program // key_blocks
    key_block = program % key_blocks
    batch = pid_bh // H_kv
    kv_head = pid_bh % H_kv

    key_end = T_k
    if HAS_VALID_LEN:
        key_end = tl.minimum(key_end, tl.load(valid_len_ptr + batch).to(tl.int64))
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < key_end
    dims = tl.arange(0, BLOCK_D)
    k_t = tl.load(k_ptr + batch * stride_kb + kv_head * stride_kh + keys[None, :] * stride_kt
                  + dims[:, None] * stride_kd,
                  mask=key_ok[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)

    first_query = 0
    if CAUSAL:
        first_query = tl.maximum(key_block * BLOCK_N - q_offset, 0)
        first_query = (first_query // BLOCK_M) * BLOCK_M

    group_acc = tl.zeros([BLOCK_N], tl.float32)
    for member in range(0, group_size):
        head = kv_head * group_size + member
        head_acc = tl.zeros([BLOCK_N], tl.float32)
        for query_start in range(first_query, T_q, BLOCK_M):
            # int64: without a causal mask the loop starts at a 32-bit 0, and queries *
            # stride_qt passes 2**31 for a [B, T, H, D] cache at H_q * D = 16384, T_q = 128k.
            queries = tl.arange(0, BLOCK_M).to(tl.int64) + query_start
            row_ok = queries < T_q
            q = _load_q_tile(q_ptr + batch * stride_qb + head * stride_qh + queries * stride_qt,
                             row_ok, dims, stride_qd, HEAD_DIM)
            lse = tl.load(lse_ptr + batch * stride_lb + head * stride_lh + queries * stride_lt,
                          mask=row_ok, other=float("inf"))
            # A row that sees no key (lse = -inf) must contribute 0, not exp2(+inf).
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
            s = _scaled_logits(q, k_t, qk_scale2, UPCAST, DOT_IEEE)
            visible = row_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= (q_offset + queries)[:, None])
            p = tl.exp2(tl.where(visible, s - lse2[:, None], float("-inf")))
            if REDUCE == 2:
                head_acc = tl.maximum(head_acc, tl.max(p, axis=0))
            else:
                head_acc += tl.sum(p, axis=0)
        if REDUCE == 0:
            head_acc = head_acc / T_q
        if GROUP_MAX:
            group_acc = tl.maximum(group_acc, head_acc)
        else:
            group_acc += head_acc
    if not GROUP_MAX:
        group_acc = group_acc / group_size
    group_acc = tl.where(key_ok, group_acc, float("-inf"))
    tl.store(out_ptr + batch * stride_ob + kv_head * stride_oh + keys, group_acc, mask=keys < T_k)


# --------------------------------------------------------------------------------- launch plan

@dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes and key splits of one call. ``n_splits`` only affects pass 1."""

    block_m: int
    block_n: int
    n_splits: int
    num_warps: int = 4
    num_stages: int = 2


# (BLOCK_M, BLOCK_N, num_warps, num_stages) a GPU plan may use (perf/autotune_attention.py sweeps
# them); each compiles for sm_80/sm_90 up to BLOCK_D = 256 (tests/test_compile.py).
GPU_CONFIGS = [(64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)]
#: CUDA's limit on grid axes 1 and 2 (axis 0 takes up to 2**31 - 1 programs)
GRID_YZ_LIMIT = 65535
# Enough programs to keep every SM of an H100/H200 (132) busy several times over.
TARGET_PROGRAMS = 4 * 132


def _default_plan(batch: int, h_kv: int, group: int, t_q: int, t_k: int,
                  on_gpu: bool) -> LaunchPlan:
    if on_gpu:
        block_m = 64
        block_n = 128 if t_q > 128 else 64
        num_warps = 4
    else:  # the interpreter: fewer, larger programs run faster; splits still exercised
        block_m, block_n, num_warps = 32, 32, 4
    row_blocks = triton.cdiv(group * t_q, block_m)
    key_blocks = triton.cdiv(t_k, block_n)
    wanted = math.ceil((TARGET_PROGRAMS if on_gpu else 4) / max(1, batch * h_kv * row_blocks))
    return LaunchPlan(block_m, block_n, max(1, min(wanted, key_blocks)), num_warps)


def launch_grids(batch: int, h_kv: int, group: int, t_q: int, t_k: int, *,
                 plan: LaunchPlan | None = None, on_gpu: bool = True):
    """``(pass-1 grid, pass-2 grid, keys_per_split)`` of a call (``plan`` default: the default
    plan), computed without launching anything."""
    plan = plan or _default_plan(batch, h_kv, group, t_q, t_k, on_gpu)
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


def row_lse_triton(q, k, *, scale, causal, q_offset, key_valid_len, plan: LaunchPlan):
    """Pass 1: natural-log row log-sum-exp ``[B, H_q, T_q]`` float32."""
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
        qk_scale2=scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        CAUSAL=causal, HAS_VALID_LEN=key_valid_len is not None, **_flags(q.dtype),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return partial[0] if n_splits == 1 else torch.logsumexp(partial, dim=0)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def attention_scores_triton(q, k, *, scale, causal, q_offset, reduce, group_reduce,
                            key_valid_len=None, lse=None, plan: LaunchPlan | None = None):
    b, h_q, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    if plan is None:
        plan = _default_plan(b, h_kv, group, t_q, t_k, q.is_cuda and not interpreter_enabled())
    if key_valid_len is not None:
        key_valid_len = key_valid_len.to(torch.int64)  # [B]: the kernels read int64
    if lse is None:
        lse = row_lse_triton(q, k, scale=scale, causal=causal, q_offset=q_offset,
                             key_valid_len=key_valid_len, plan=plan)
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
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        CAUSAL=causal, HAS_VALID_LEN=key_valid_len is not None, REDUCE=REDUCE_CODES[reduce],
        GROUP_MAX=group_reduce == "max", **_flags(q.dtype),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return out


# ------------------------------------------------------------------------------ compile specs

# (CAUSAL, HAS_VALID_LEN, REDUCE, GROUP_MAX): the masking/reduction branches of the kernels.
_DEFAULT_FLAGS = (True, True, REDUCE_CODES["mean"], False)
_OTHER_FLAGS = [(False, False, REDUCE_CODES["max"], True), (True, False, REDUCE_CODES["sum"], False)]


def _compile_variants():
    """(dtype, head_dim, config, flags) to compile: every config and dtype at D=128, the configs
    the default plan picks at every other supported head dim, and every masking/reduction branch
    once."""
    plan_configs = [c for c in GPU_CONFIGS if c[0] == 64 and c[2] == 4]
    for dtype in ("float16", "bfloat16", "float32"):
        for config in GPU_CONFIGS:
            yield dtype, 128, config, _DEFAULT_FLAGS
    for head_dim in (64, 80, 96, 256):
        for config in plan_configs:
            yield "bfloat16", head_dim, config, _DEFAULT_FLAGS
    for flags in _OTHER_FLAGS:
        yield "bfloat16", 128, plan_configs[0], flags


def _compile_specs():
    common_strides = {f"stride_{t}{a}": "i64" for t in "qk" for a in "bhtd"}
    specs = []
    for dtype, head_dim, config, flags in _compile_variants():
        block_m, block_n, num_warps, num_stages = config
        causal, has_valid_len, reduce_code, group_max = flags
        ptr = TRITON_POINTER_TYPES[dtype]
        tiles = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "BLOCK_M": block_m,
                 "BLOCK_N": block_n, "UPCAST": False, "DOT_IEEE": dtype == "float32",
                 "CAUSAL": causal, "HAS_VALID_LEN": has_valid_len}
        tag = f"{dtype},D={head_dim},M={block_m},N={block_n},w={num_warps}"
        if flags != _DEFAULT_FLAGS:
            tag += f",causal={causal},valid_len={has_valid_len},reduce={reduce_code}," \
                   f"group_max={group_max}"
        # fp32 runs its dot in IEEE precision (FMA, no tensor cores) to match the fp32 reference.
        launch = dict(num_warps=num_warps, num_stages=num_stages, uses_dot=dtype != "float32",
                      unit_strides=("stride_qd", "stride_kd"))
        specs.append(CompileSpec(
            name=f"attention_lse_fwd_kernel[{tag}]", kernel=attention_lse_fwd_kernel,
            signature={"q_ptr": ptr, "k_ptr": ptr, "valid_len_ptr": "*i64",
                       "lse_ptr": "*fp32", **common_strides,
                       **{f"stride_l{a}": "i64" for a in "sbht"},
                       "H_kv": "i32", "group_size": "i32", "T_q": "i32", "T_k": "i32",
                       "q_offset": "i32", "keys_per_split": "i32", "row_blocks": "i32",
                       "qk_scale2": "fp32"},
            constexprs=tiles, **launch))
        specs.append(CompileSpec(
            name=f"attention_scores_fwd_kernel[{tag}]", kernel=attention_scores_fwd_kernel,
            signature={"q_ptr": ptr, "k_ptr": ptr, "lse_ptr": "*fp32", "valid_len_ptr": "*i64",
                       "out_ptr": "*fp32", **common_strides,
                       **{f"stride_l{a}": "i64" for a in "bht"},
                       "stride_ob": "i64", "stride_oh": "i64",
                       "H_kv": "i32", "group_size": "i32", "T_q": "i32", "T_k": "i32",
                       "q_offset": "i32", "key_blocks": "i32", "qk_scale2": "fp32"},
            constexprs={**tiles, "REDUCE": reduce_code, "GROUP_MAX": group_max}, **launch))
    return specs


COMPILE_SPECS = _compile_specs()
