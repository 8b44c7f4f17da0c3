"""Benchmark of ragged decode attention (one new token per sequence) over a per-head compacted cache,
against dense decode attention over the full cache with torch SDPA (FlashAttention / cuDNN /
efficient kernels on the GPU).

Shapes: an 8B model's layer (32 query heads, 8 KV heads, D = 128). GPU: a 128k-token context in
bf16, keeping 30% with uniform and with per-head budgets (10%-50%), plus 100% (kernel efficiency
against SDPA on the same data) and 10%; batch 1 and 4. CPU: 8k tokens in fp32. Ragged decode must
be faster than the dense one roughly in proportion to the kept fraction. Also timed: one decode
step of a ``RaggedKVCache`` (append the token's K/V, then attend).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for

from proxykv.cache import RaggedKVCache
from proxykv.kernels import gather_kv_ragged, ragged_decode_attention
from proxykv.kernels.decode import triton_impl
from proxykv.selection import Selection
from proxykv.testing import assert_close

H_Q, H_KV, HEAD_DIM = 32, 8, 128
STEP_RESERVE = 256  # appends per RaggedKVCache before the append+attend bench rebuilds it
SPLIT_SWEEP = [256, 512, 1024, 2048, 4096]  # keys per split (GPU), for plan_decode's defaults


def _dense_sdpa(q, k, v):
    """Dense decode attention over the full cache: ``q [B, H_q, D]``, ``k, v [B, H_kv, T, D]``."""
    try:
        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    except (TypeError, RuntimeError):  # torch < 2.5: no enable_gqa
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(group, 1),
                                              v.repeat_interleave(group, 1))[:, :, 0]


def _keep_mask(batch: int, seq_len: int, keep: float, ragged: bool, generator, device):
    """bool ``[B, 1, H_kv, T]``: exactly ``keep · T`` random positions per head (uniform), or
    per-head fractions from ``keep / 3`` to ``5 keep / 3`` (ragged)."""
    if keep >= 1.0:
        return torch.ones(batch, 1, H_KV, seq_len, dtype=torch.bool, device=device)
    scores = torch.rand(batch, 1, H_KV, seq_len, generator=generator, device=device)
    if not ragged:
        kept = scores.topk(int(keep * seq_len), dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept, True)
    ratios = torch.linspace(keep / 3, keep * 5 / 3, H_KV, device=device).clamp(max=1.0)
    ratios = ratios[torch.randperm(H_KV, generator=generator, device=device)]
    return scores < ratios.reshape(1, 1, H_KV, 1)


def run(recorder: Recorder, quick: bool) -> None:
    device = recorder.device
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu:
        seq_len = 16384 if quick else 131072
        cases = [(1, 0.3, False), (1, 0.3, True)] if quick else [
            (1, 0.3, False), (1, 0.3, True), (1, 1.0, False), (1, 0.1, True), (4, 0.3, True)]
    else:
        seq_len = 2048 if quick else 8192
        cases = [(1, 0.3, True)] if quick else [(1, 0.3, False), (1, 0.3, True), (1, 1.0, False)]
    generator = torch.Generator(device=device).manual_seed(0)
    for batch, keep, ragged in cases:
        _bench_case(recorder, dtype, generator, batch, seq_len, keep, ragged,
                    sweep=on_gpu and not quick and batch == 1 and keep == 0.3 and ragged)


def _bench_case(recorder: Recorder, dtype: torch.dtype, generator: torch.Generator, batch: int,
                seq_len: int, keep: float, ragged: bool, sweep: bool) -> None:
    device = recorder.device
    impl = "triton" if device.type == "cuda" else "torch"
    k, v = (torch.randn(batch, H_KV, seq_len, HEAD_DIM, generator=generator, device=device,
                        dtype=dtype) for _ in range(2))
    q = torch.randn(batch, H_Q, HEAD_DIM, generator=generator, device=device, dtype=dtype)
    mask = _keep_mask(batch, seq_len, keep, ragged, generator, device)
    view = Selection.from_mask(mask).to_ragged().layer(0)
    k_packed, v_packed = gather_kv_ragged(k, v, view.indices, view.cu_seqlens, impl=impl)
    cu_seqlens = view.cu_seqlens
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    kept_bytes = 2 * k_packed.numel() * k_packed.element_size()
    expected = ragged_decode_attention(q.float(), k_packed.float(), v_packed.float(), cu_seqlens,
                                       impl="torch")
    shape = {"B": batch, "H_q": H_Q, "H_kv": H_KV, "T": seq_len, "D": HEAD_DIM, "keep": keep,
             "budgets": "per-head" if ragged else "uniform"}
    dense = {"baseline": lambda: _dense_sdpa(q, k, v),
             "baseline_name": "torch SDPA over the full cache"}

    def decode():
        return ragged_decode_attention(q, k_packed, v_packed, cu_seqlens, max_seq_len=longest,
                                       check_segments=False, impl=impl)

    recorder.measure("ragged_decode_attention", shape, dtype, impl, decode,
                     check=lambda: assert_close(decode(), expected, dtype=dtype,
                                                name="ragged_decode_attention"),
                     bytes_moved=kept_bytes,
                     extra={"kept_fraction": k_packed.shape[0] / (batch * H_KV * seq_len)},
                     **dense)

    for keys_per_split in SPLIT_SWEEP if sweep else []:
        plan = triton_impl.plan_decode(longest, cu_seqlens.numel() - 1, dtype, True,
                                       keys_per_split=keys_per_split)

        def planned(plan=plan):
            return triton_impl.ragged_decode_attention_triton(
                q, k_packed, v_packed, cu_seqlens, None, scale=HEAD_DIM ** -0.5,
                max_seq_len=longest, plan=plan)

        recorder.measure("ragged_decode_attention", shape, dtype,
                         f"triton[keys_per_split={keys_per_split},splits={plan.num_splits}]",
                         planned, bytes_moved=kept_bytes,
                         check=lambda planned=planned: assert_close(
                             planned(), expected, dtype=dtype, name="planned decode"))

    if keep == 1.0 or batch != 1:
        return
    # One decode step of a RaggedKVCache: append the new token's K/V, then attend. The cache is
    # built with STEP_RESERVE spare rows per segment and rebuilt (amortised over STEP_RESERVE
    # calls) once they are used, so the timed region never repacks and the attended length stays
    # within STEP_RESERVE rows of the kept length.
    selection = Selection.from_mask(mask)
    k_new = torch.randn(batch, H_KV, HEAD_DIM, device=device, dtype=dtype)
    state = {"cache": None, "steps": STEP_RESERVE}

    def step():
        if state["steps"] == STEP_RESERVE:
            state["cache"] = RaggedKVCache.from_selection([(k, v)], selection,
                                                          reserve_steps=STEP_RESERVE, impl=impl)
            state["steps"] = 0
        cache = state["cache"]
        cache.append(0, k_new, k_new)
        state["steps"] += 1
        return cache.attend(0, q, impl=impl)

    def step_check():
        probe = RaggedKVCache.from_selection([(k, v)], selection, impl=impl)
        probe.append(0, k_new, k_new)
        keys, values, packed_cu, _ = probe.to_packed(0)
        reference = ragged_decode_attention(q.float(), keys.float(), values.float(), packed_cu,
                                            impl="torch")
        assert_close(probe.attend(0, q, impl=impl), reference, dtype=dtype,
                     name="RaggedKVCache step")
        assert state["cache"] is None or state["cache"].num_repacks == 0

    # Read per step: the kept rows plus, on average, half the reserve of appended rows per
    # segment; written: one K and one V row per segment.
    segments = batch * H_KV
    row_bytes = 2 * HEAD_DIM * k_packed.element_size()  # one K row and one V row
    step_bytes = kept_bytes + row_bytes * segments * ((STEP_RESERVE + 1) / 2 + 1)
    recorder.measure("RaggedKVCache.append+attend", shape, dtype, impl, step, check=step_check,
                     bytes_moved=step_bytes, **dense)


if __name__ == "__main__":
    sys.exit(main_for(run, "ragged decode attention benchmark"))
