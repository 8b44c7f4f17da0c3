"""Benchmark of the attend kernel family — ``ragged_attention`` (a chunk of new tokens) and its
one-token case ``ragged_decode_attention`` — over a per-head compacted KV cache, against torch SDPA
over the full (uncompressed) cache with the same queries (FlashAttention / cuDNN / efficient
kernels on the GPU).

Cases, for each context of ``T`` original tokens and each keep ratio:

* **question**: ``T_new = 128`` new tokens whose own K/V rows end every segment; each query sees
  the kept context and the question causally. Baseline: SDPA over the ``T + 128`` full rows with a
  lower-right causal mask (``causal_lower_right``; an explicit boolean mask on an older torch).
* **decode**: one new token (its K/V row ends every segment), every row visible. Baseline: SDPA of
  that one query over the ``T + 1`` full rows.

Keep ratios: 0.3 with per-head budgets (the 8 KV heads keep from ``0.3 / 3`` to ``5 · 0.3 / 3`` of
the context) and 1.0 (the whole context: the kernel's efficiency against SDPA on the same data).
Shapes: an 8B model's layer (32 query heads, 8 KV heads, D = 128), batch 1. GPU: bf16, contexts of
8k, 32k and 128k tokens; bandwidth = bytes of kept K/V read / time, also as a fraction of
4.8 TB/s (H200 HBM3e); a ``keys_per_split`` sweep of the launch plan at 128k, keep 0.3. CPU: fp32,
contexts of 8k and 32k. ``--quick``: the 8k context at keep 0.3 only.

Every case is first checked against the float64 reference on a slice (two segments; the first and
last few question tokens) and, on the GPU, in full against the torch implementation in fp32; at
keep 1.0 the SDPA baseline is checked to compute the same attention.

Also timed, at keep 0.3: one decode step of a ``RaggedKVCache`` (append the token's K/V, then
attend) and one question step (append the question's 128 rows, attend with its 128 queries,
``crop(128)`` back to the compressed context); and each op with the attention features on
(``+features``: Gemma 2's logit soft-capping at 50, gpt-oss-style sinks and a 4096-token sliding
window over the kept rows' original positions), checked like the plain case (reference slices
with the same features), with the plain op's time as the baseline (the features' cost).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for

from proxykv.cache import RaggedKVCache
from proxykv.kernels import gather_kv_ragged, ragged_attention, ragged_decode_attention
from proxykv.kernels.attend import triton_impl
from proxykv.kernels.attend.reference import (
    ragged_attention_reference,
    ragged_decode_attention_reference,
)
from proxykv.selection import Selection
from proxykv.testing import assert_close

H_Q, H_KV, HEAD_DIM = 32, 8, 128
GROUP = H_Q // H_KV
QUESTION = 128  # new tokens of a question
STEP_RESERVE = 256  # appends per RaggedKVCache before the decode-step bench rebuilds it
SPLIT_SWEEP = [256, 512, 1024, 2048, 4096]  # keys per split (GPU)
PEAK_GB_PER_S = 4800.0  # H200 HBM3e
CHECK_SEGMENTS = 2  # segments the reference check covers
CHECK_TOKENS = 4  # first and last tokens of a question the reference check covers
SOFTCAP, WINDOW = 50.0, 4096  # the +features case: Gemma 2's cap, its sliding window


# ------------------------------------------------------------------------ SDPA over the full cache

def _sdpa_variant(device: torch.device, dtype: torch.dtype) -> tuple[bool, bool]:
    """(lower-right causal bias available, ``enable_gqa`` available) in this torch, probed once on
    tiny tensors."""
    q = torch.randn(1, 4, 2, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(1, 2, 5, HEAD_DIM, device=device, dtype=dtype)
    try:
        from torch.nn.attention.bias import causal_lower_right

        F.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(2, 5),
                                       enable_gqa=True)
        return True, True
    except (ImportError, TypeError, RuntimeError):
        pass
    try:
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return False, True
    except (TypeError, RuntimeError):  # torch < 2.5: no enable_gqa
        return False, False


def _full_cache_sdpa(q, k, v, variant: tuple[bool, bool]):
    """Attention of ``q [B, H_q, T_new, D]`` over the full cache ``k, v [B, H_kv, S, D]`` whose last
    ``T_new`` rows are the new tokens' own: every query sees the context, the new tokens causally."""
    lower_right, gqa = variant
    num_new, rows = q.shape[2], k.shape[2]
    mask = None
    if num_new > 1:
        if lower_right:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(num_new, rows)
        else:
            mask = torch.ones(num_new, rows, dtype=torch.bool, device=q.device).tril(rows - num_new)
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                          v.repeat_interleave(group, 1), attn_mask=mask)


# ------------------------------------------------------------------------------------- the cases

def _keep_mask(batch: int, seq_len: int, keep: float, generator, device):
    """bool ``[B, 1, H_kv, T]``: all positions (keep 1), or per-head fractions from ``keep / 3`` to
    ``5 keep / 3`` in a random head order."""
    if keep >= 1.0:
        return torch.ones(batch, 1, H_KV, seq_len, dtype=torch.bool, device=device)
    scores = torch.rand(batch, 1, H_KV, seq_len, generator=generator, device=device)
    ratios = torch.linspace(keep / 3, keep * 5 / 3, H_KV, device=device).clamp(max=1.0)
    ratios = ratios[torch.randperm(H_KV, generator=generator, device=device)]
    return scores < ratios.reshape(1, 1, H_KV, 1)


@dataclass
class _Case:
    name: str                   # "question" or "decode"
    q: torch.Tensor             # [B, H_q, T_new, D]
    k_ctx: torch.Tensor         # [B, H_kv, T, D] the context
    v_ctx: torch.Tensor
    k_new: torch.Tensor         # [B, H_kv, T_new, D] the new tokens' own K/V
    v_new: torch.Tensor
    k_full: torch.Tensor        # [B, H_kv, T + T_new, D] context then new tokens
    v_full: torch.Tensor
    context_mask: torch.Tensor  # [B, 1, H_kv, T] kept context positions
    k_packed: torch.Tensor      # [N, D] kept context rows then the new rows, per segment
    v_packed: torch.Tensor
    cu_seqlens: torch.Tensor    # int32 [B * H_kv + 1]
    positions: torch.Tensor     # int32 [N] original position of every packed row
    longest: int
    expected: torch.Tensor      # fp32 [B, H_q, T_new, D]: ragged_attention(impl="torch") in fp32
    shape: dict

    @property
    def num_new(self) -> int:
        return self.q.shape[2]

    @property
    def kept_bytes(self) -> int:
        return 2 * self.k_packed.numel() * self.k_packed.element_size()

    @property
    def flops(self) -> float:
        """Multiply-adds of Q·Kᵀ and P·V over the rows each query sees, times 2."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        t = self.num_new
        seen = sum(t * (length - t) + t * (t + 1) // 2 for length in lengths)
        return 4.0 * GROUP * HEAD_DIM * seen


def _build_case(name: str, k_ctx, v_ctx, context_mask, keep: float, num_new: int, generator,
                impl: str) -> _Case:
    batch, _, seq_len, _ = k_ctx.shape
    device, dtype = k_ctx.device, k_ctx.dtype
    k_new, v_new = (torch.randn(batch, H_KV, num_new, HEAD_DIM, generator=generator,
                                device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(batch, H_Q, num_new, HEAD_DIM, generator=generator, device=device, dtype=dtype)
    k_full, v_full = torch.cat([k_ctx, k_new], 2), torch.cat([v_ctx, v_new], 2)
    new_rows = torch.ones(batch, 1, H_KV, num_new, dtype=torch.bool, device=device)
    view = Selection.from_mask(torch.cat([context_mask, new_rows], -1)).to_ragged().layer(0)
    k_packed, v_packed = gather_kv_ragged(k_full, v_full, view.indices, view.cu_seqlens, impl=impl)
    cu_seqlens = view.cu_seqlens.to(torch.int32)
    positions = view.indices.to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    expected = ragged_attention(q.float(), k_packed.float(), v_packed.float(), cu_seqlens,
                                impl="torch")
    shape = {"B": batch, "H_q": H_Q, "H_kv": H_KV, "T": seq_len, "T_new": num_new, "D": HEAD_DIM,
             "keep": keep, "budgets": "per-head" if keep < 1.0 else "all"}
    return _Case(name, q, k_ctx, v_ctx, k_new, v_new, k_full, v_full, context_mask, k_packed,
                 v_packed, cu_seqlens, positions, longest, expected, shape)


def _check_reference_slices(out: torch.Tensor, case: _Case, dtype: torch.dtype,
                            **features) -> None:
    """``out [B, H_q, T_new, D]`` against the float64 reference on the first ``CHECK_SEGMENTS``
    segments (their query heads) and, for a question, its first and last ``CHECK_TOKENS`` tokens:
    the tokens ``lo … hi - 1`` of a segment of ``n`` rows see what they see in the whole question
    when the segment is cut to ``n - (T_new - hi)`` rows. ``features``: softcap, sinks (``[H_q]``),
    window with key_positions, as given to the op."""
    cu = case.cu_seqlens[:CHECK_SEGMENTS + 1]
    heads = CHECK_SEGMENTS * GROUP
    q = case.q[:1, :heads].float()
    if "sinks" in features:
        features = {**features, "sinks": features["sinks"][:heads]}
    if case.num_new == 1:
        expected = ragged_decode_attention_reference(q[:, :, 0], case.k_packed.float(),
                                                     case.v_packed.float(), cu, **features)
        assert_close(out[:1, :heads, 0], expected, dtype=dtype, name=f"{case.name} vs reference")
        return
    lengths = cu[1:] - cu[:-1]
    few = min(CHECK_TOKENS, case.num_new)
    for lo, hi in ((0, few), (case.num_new - few, case.num_new)):
        expected = ragged_attention_reference(q[:, :, lo:hi], case.k_packed.float(),
                                              case.v_packed.float(), cu,
                                              seq_lens=lengths - (case.num_new - hi), **features)
        assert_close(out[:1, :heads, lo:hi], expected, dtype=dtype,
                     name=f"{case.name} tokens {lo}..{hi - 1} vs reference")


# ------------------------------------------------------------------------------------ benchmark

def run(recorder: Recorder, quick: bool) -> None:
    device = recorder.device
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    impl = "triton" if on_gpu else "torch"
    if quick:
        contexts, keeps = [8192], [0.3]
    else:
        contexts, keeps = ([8192, 32768, 131072] if on_gpu else [8192, 32768]), [0.3, 1.0]
    variant = _sdpa_variant(device, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    summary: list[tuple[str, dict | None]] = []
    batch = 1
    for seq_len in contexts:
        k_ctx, v_ctx = (torch.randn(batch, H_KV, seq_len, HEAD_DIM, generator=generator,
                                    device=device, dtype=dtype) for _ in range(2))
        for keep in keeps:
            context_mask = _keep_mask(batch, seq_len, keep, generator, device)
            for name, num_new in (("question", QUESTION), ("decode", 1)):
                case = _build_case(name, k_ctx, v_ctx, context_mask, keep, num_new, generator,
                                   impl)
                sweep = on_gpu and not quick and keep < 1.0 and seq_len == contexts[-1]
                summary += _bench_op(recorder, case, dtype, impl, variant, on_gpu, sweep)
                if keep < 1.0:
                    summary += _bench_cache_step(recorder, case, dtype, impl, variant, on_gpu)
                del case
    _print_summary(summary)


def _measure_kwargs(case: _Case, variant, on_gpu: bool, bytes_moved: float) -> dict:
    return {"baseline": lambda: _full_cache_sdpa(case.q, case.k_full, case.v_full, variant),
            "baseline_name": "torch SDPA over the full cache", "bytes_moved": bytes_moved,
            "peak_gb_per_s": PEAK_GB_PER_S if on_gpu else None}


def _bench_op(recorder: Recorder, case: _Case, dtype, impl: str, variant, on_gpu: bool,
              sweep: bool) -> list[tuple[str, dict | None]]:
    question = case.num_new > 1
    op = "ragged_attention" if question else "ragged_decode_attention"
    q3 = None if question else case.q[:, :, 0].contiguous()
    common = {"max_seq_len": case.longest, "check_segments": False}

    def attend():
        if question:
            return ragged_attention(case.q, case.k_packed, case.v_packed, case.cu_seqlens,
                                    impl=impl, **common)
        return ragged_decode_attention(q3, case.k_packed, case.v_packed, case.cu_seqlens,
                                       impl=impl, **common)

    def as_4d(out):
        return out if question else out[:, :, None]

    def check():
        out = as_4d(attend())
        _check_reference_slices(out, case, dtype)
        if on_gpu:  # on the CPU the timed op is the torch implementation itself
            assert_close(out, case.expected, dtype=dtype, name=f"{op} vs torch impl in fp32")
        if case.shape["keep"] >= 1.0:  # same data: the baseline must compute the same thing
            assert_close(_full_cache_sdpa(case.q, case.k_full, case.v_full, variant),
                         case.expected, dtype=dtype, name="SDPA over the full cache")

    kept_rows = case.k_packed.shape[0] - case.num_new * H_KV * case.q.shape[0]
    context_rows = case.k_ctx.shape[0] * H_KV * case.k_ctx.shape[2]
    row = recorder.measure(op, case.shape, dtype, impl, attend, check=check, flops=case.flops,
                           extra={"kept_fraction": kept_rows / context_rows,
                                  "longest_segment": case.longest},
                           **_measure_kwargs(case, variant, on_gpu, case.kept_bytes))
    rows = [(f"{case.name:<8} T={case.shape['T']:>6} keep={case.shape['keep']} {impl}", row)]
    rows += _bench_features(recorder, case, dtype, impl, attend, as_4d)

    for keys_per_split in SPLIT_SWEEP if sweep else []:
        plan = triton_impl.plan_ragged_attention(case.longest, case.cu_seqlens.numel() - 1,
                                                 case.num_new * GROUP, HEAD_DIM, dtype, True,
                                                 keys_per_split=keys_per_split)

        def planned(plan=plan):
            if question:
                return triton_impl.ragged_attention_triton(
                    case.q, case.k_packed, case.v_packed, case.cu_seqlens, None,
                    scale=HEAD_DIM ** -0.5, max_seq_len=case.longest, return_lse=False, plan=plan)
            return triton_impl.ragged_decode_attention_triton(
                q3, case.k_packed, case.v_packed, case.cu_seqlens, None, scale=HEAD_DIM ** -0.5,
                max_seq_len=case.longest, plan=plan)

        label = f"triton[keys_per_split={keys_per_split},splits={plan.num_splits}]"
        row = recorder.measure(op, case.shape, dtype, label, planned, flops=case.flops,
                               bytes_moved=case.kept_bytes, peak_gb_per_s=PEAK_GB_PER_S,
                               check=lambda planned=planned, label=label: assert_close(
                                   as_4d(planned()), case.expected, dtype=dtype,
                                   name=f"{op} {label}"))
        name = f"{case.name:<8} T={case.shape['T']:>6} keep={case.shape['keep']} split " \
               f"{keys_per_split}"
        rows.append((name, row))
    return rows


def _bench_features(recorder: Recorder, case: _Case, dtype, impl: str, plain,
                    as_4d) -> list[tuple[str, dict | None]]:
    """The op with soft-capping, sinks and a sliding window on; baseline: the plain op."""
    question = case.num_new > 1
    op = ("ragged_attention" if question else "ragged_decode_attention") + "+features"
    generator = torch.Generator().manual_seed(1)
    features = {"softcap": SOFTCAP, "window": WINDOW, "key_positions": case.positions,
                "sinks": (torch.randn(H_Q, generator=generator) * 2).to(case.q.device)}
    common = {"max_seq_len": case.longest, "check_segments": False, "impl": impl, **features}

    def attend():
        if question:
            return ragged_attention(case.q, case.k_packed, case.v_packed, case.cu_seqlens,
                                    **common)
        return ragged_decode_attention(case.q[:, :, 0], case.k_packed, case.v_packed,
                                       case.cu_seqlens, **common)

    def check():
        _check_reference_slices(as_4d(attend()), case, dtype,
                                **{n: v.cpu() if isinstance(v, torch.Tensor) else v
                                   for n, v in features.items()})

    row = recorder.measure(op, {**case.shape, "softcap": SOFTCAP, "window": WINDOW, "sinks": True},
                           dtype, impl, attend, check=check, flops=case.flops,
                           baseline=plain, baseline_name=f"the plain {op.split('+')[0]}",
                           bytes_moved=case.kept_bytes,
                           peak_gb_per_s=PEAK_GB_PER_S if case.q.is_cuda else None)
    return [((f"{case.name:<8} T={case.shape['T']:>6} keep={case.shape['keep']} {impl} "
             f"+features"), row)]


def _bench_cache_step(recorder: Recorder, case: _Case, dtype, impl: str, variant,
                      on_gpu: bool) -> list[tuple[str, dict | None]]:
    """One step of a ``RaggedKVCache`` built from the case's compressed context: a decode step
    (append one row, attend) or a question step (append the question, attend, crop it back)."""
    batch = case.q.shape[0]
    selection = Selection.from_mask(case.context_mask)
    segments = batch * H_KV
    row_bytes = 2 * HEAD_DIM * case.k_packed.element_size()  # one K row and one V row
    context_bytes = case.kept_bytes - row_bytes * segments * case.num_new

    def build(reserve_steps: int) -> RaggedKVCache:
        return RaggedKVCache.from_selection([(case.k_ctx, case.v_ctx)], selection,
                                            reserve_steps=reserve_steps, impl=impl)

    if case.num_new > 1:
        op = "RaggedKVCache.append+attend+crop"
        cache = build(case.num_new)
        before = cache.lengths(0)

        def step():
            cache.append(0, case.k_new, case.v_new)
            out = cache.attend(0, case.q, impl=impl)
            cache.crop(case.num_new)
            return out

        def check():
            assert_close(step(), case.expected, dtype=dtype, name="RaggedKVCache question step")
            assert cache.num_repacks == 0 and torch.equal(cache.lengths(0), before), \
                "the question step changed the cache"

        # Read: the kept rows and the question's; written: the question's rows.
        step_bytes = case.kept_bytes + row_bytes * segments * case.num_new
    else:
        op = "RaggedKVCache.append+attend"
        q3 = case.q[:, :, 0].contiguous()
        # The cache has STEP_RESERVE spare rows per segment and is rebuilt (amortised over
        # STEP_RESERVE calls) once they are used, so the timed region never repacks and the
        # attended length stays within STEP_RESERVE rows of the kept length.
        state = {"cache": None, "steps": STEP_RESERVE}

        def step():
            if state["steps"] == STEP_RESERVE:
                state["cache"] = build(STEP_RESERVE)
                state["steps"] = 0
            state["cache"].append(0, case.k_new, case.v_new)
            state["steps"] += 1
            return state["cache"].attend(0, q3, impl=impl)

        def check():
            probe = build(STEP_RESERVE)
            probe.append(0, case.k_new, case.v_new)
            assert_close(probe.attend(0, q3, impl=impl), case.expected[:, :, 0], dtype=dtype,
                         name="RaggedKVCache decode step")
            assert probe.num_repacks == 0

        # Read per step: the kept rows plus, on average, half the reserve of appended rows per
        # segment; written: one K and one V row per segment.
        step_bytes = context_bytes + row_bytes * segments * ((STEP_RESERVE + 1) / 2 + 1)
    row = recorder.measure(op, case.shape, dtype, impl, step, check=check,
                           **_measure_kwargs(case, variant, on_gpu, step_bytes))
    return [(f"{case.name:<8} T={case.shape['T']:>6} keep={case.shape['keep']} cache step", row)]


def _print_summary(summary: list[tuple[str, dict | None]]) -> None:
    print("# attend summary: median ms [p20, p80], speed-up vs torch SDPA over the full cache "
          "(+features: vs the plain op)", flush=True)
    for name, row in summary:
        if row is None:
            print(f"#   {name:<42} REFUSED", flush=True)
            continue
        text = (f"#   {name:<42} {row['median_ms']:9.3f} ms [{row['p20_ms']:.3f}, "
                f"{row['p80_ms']:.3f}]")
        if "speedup" in row:
            base = "plain" if "+features" in name else "SDPA"
            text += f"  x{row['speedup']:6.2f} ({base} {row['baseline']['median_ms']:.3f} ms)"
        if "fraction_of_peak_bw" in row:
            text += f"  {row['gb_per_s']:7.1f} GB/s = {100 * row['fraction_of_peak_bw']:.0f}%"
        print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main_for(run, "attend (ragged attention / decode) benchmark"))
