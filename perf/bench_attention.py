"""Benchmarks of attention_scores (issue [scoring]).

GPU (H200 targets from the issue):
  (a) observation window: 64 queries, T_k in {4k, 32k, 128k}, 32 query heads / 8 KV heads, D=128,
      bf16 — time and achieved K bandwidth (K is read once per pass); target within 2x of the
      ~70 us/layer bound at 128k.
  (b) reconstruction: T_q = T_k in {4k, 16k, 32k}, same heads — time and TFLOP/s (causal QK^T in
      both passes); target >= 40% of ~790 TFLOP/s.
  Baseline: torch's scaled_dot_product_attention on the same shapes (what a model's attention
  forward costs; equal FLOPs for the reconstruction case): speedup = SDPA time / scoring time.
CPU:
  (c) the torch implementation on an 8k x 8k reconstruction (8 query heads, 2 KV heads, D=64):
      time and peak memory growth (target < 512 MiB; materialising would need 2 GiB).
Both: each case again with the attention features on (``+features``: Gemma 2's logit
soft-capping at 50, gpt-oss-style sinks, a 4096-key sliding window), checked against the torch
implementation (GPU) or the reference on a small slice (CPU) with the same features; baseline:
the plain op on the same shapes (speedup < 1 = the features' cost).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for  # noqa: E402

from proxykv import attention_scores  # noqa: E402
from proxykv.kernels.attention.reference import attention_scores_reference  # noqa: E402
from proxykv.kernels.attention.torch_impl import attention_scores_torch  # noqa: E402
from proxykv.testing import assert_close  # noqa: E402

SOFTCAP, WINDOW = 50.0, 4096  # the +features cases: Gemma 2's cap and sliding window


def _features(h_q: int, device) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"softcap": SOFTCAP, "window": WINDOW,
            "sinks": (torch.randn(h_q, generator=generator) * 2).to(device)}


def _check_against_torch_impl(q, k, reduce, group_reduce, actual_fn, **features):
    def check():
        expected = attention_scores_torch(q, k, scale=q.shape[-1] ** -0.5, causal=True,
                                          q_offset=k.shape[2] - q.shape[2], reduce=reduce,
                                          group_reduce=group_reduce, **features)
        assert_close(actual_fn(), expected, dtype=q.dtype, name="attention_scores")
    return check


def _sdpa(q, k, causal: bool):
    """The attention forward a model runs on the same shapes (flash/efficient SDPA, V = K): the
    reference cost a scoring pass is compared with."""
    return lambda: F.scaled_dot_product_attention(q, k, k, is_causal=causal, enable_gqa=True)


def run_gpu(recorder: Recorder, quick: bool) -> None:
    device = recorder.device
    h_q, h_kv, d, dtype = 32, 8, 128, torch.bfloat16
    for t_k in ([4096] if quick else [4096, 32768, 131072]):
        q = torch.randn(1, h_q, 64, d, device=device, dtype=dtype)
        k = torch.randn(1, h_kv, t_k, d, device=device, dtype=dtype)

        def op():
            return attention_scores(q, k, reduce="mean", group_reduce="mean")

        recorder.measure(
            "attention_scores/window", {"B": 1, "H_q": h_q, "H_kv": h_kv, "T_q": 64, "T_k": t_k,
                                        "D": d}, dtype, "triton", op,
            check=_check_against_torch_impl(q, k, "mean", "mean", op),
            baseline=_sdpa(q, k, causal=False), baseline_name="torch SDPA, same shapes",
            bytes_moved=2 * k.numel() * k.element_size(),  # K read once per pass
            flops=2 * (2 * h_q * d * 64 * t_k),  # QK^T in both passes
            extra={"note": "gb_per_s counts K bytes of both passes; speedup = SDPA time / "
                           "scoring time"})
        _measure_features(recorder, "attention_scores/window", q, k, "mean", "mean", op,
                          {"B": 1, "H_q": h_q, "H_kv": h_kv, "T_q": 64, "T_k": t_k, "D": d})
    for t in ([4096] if quick else [4096, 16384, 32768]):
        q = torch.randn(1, h_q, t, d, device=device, dtype=dtype)
        k = torch.randn(1, h_kv, t, d, device=device, dtype=dtype)

        def op():
            return attention_scores(q, k, reduce="max", group_reduce="max")

        causal_flops = 2 * (2 * h_q * d * t * t / 2)  # QK^T in both passes, causal half
        recorder.measure(
            "attention_scores/reconstruction", {"B": 1, "H_q": h_q, "H_kv": h_kv, "T_q": t,
                                                "T_k": t, "D": d}, dtype, "triton", op,
            check=_check_against_torch_impl(q, k, "max", "max", op),
            baseline=_sdpa(q, k, causal=True), baseline_name="torch SDPA (causal), same shapes",
            flops=causal_flops,
            extra={"note": "speedup = SDPA time / scoring time (SDPA does QK^T and PV once, "
                           "scoring QK^T twice: equal FLOPs)"})
        _measure_features(recorder, "attention_scores/reconstruction", q, k, "max", "max", op,
                          {"B": 1, "H_q": h_q, "H_kv": h_kv, "T_q": t, "T_k": t, "D": d})


def _measure_features(recorder: Recorder, name: str, q, k, reduce, group_reduce, plain,
                      shape: dict) -> None:
    """The GPU case with softcap, sinks and window on; baseline: the plain op."""
    features = _features(q.shape[1], q.device)

    def op():
        return attention_scores(q, k, reduce=reduce, group_reduce=group_reduce, **features)

    recorder.measure(
        name + "+features", {**shape, "softcap": SOFTCAP, "window": WINDOW, "sinks": True},
        q.dtype, "triton", op,
        check=_check_against_torch_impl(q, k, reduce, group_reduce, op, **features),
        baseline=plain, baseline_name="the plain op, same shapes",
        extra={"note": "speedup = plain time / time with softcap, sinks and window"})


_PEAK_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, time, torch
    from proxykv.kernels.attention.torch_impl import attention_scores_torch

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    t, h_q, h_kv, d = map(int, sys.argv[1:5])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, h_q, t, d, generator=g)
    k = torch.randn(1, h_kv, t, d, generator=g)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter (VmHWM)
    before = status("VmRSS:")
    start = time.perf_counter()
    attention_scores_torch(q, k, scale=d ** -0.5, causal=True, q_offset=0, reduce="max",
                           group_reduce="max")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_growth": status("VmHWM:") - before}))
""")


def run_cpu(recorder: Recorder, quick: bool) -> None:
    t, h_q, h_kv, d = (2048 if quick else 8192), 8, 2, 64
    generator = torch.Generator().manual_seed(0)
    small_q = torch.randn(1, h_q, 384, d, generator=generator)
    small_k = torch.randn(1, h_kv, 384, d, generator=generator)

    def check():  # the same configuration at a size the fp64 reference can materialise
        actual = attention_scores(small_q, small_k, q_offset=0, reduce="max", group_reduce="max",
                                  impl="torch")
        expected = attention_scores_reference(small_q, small_k, scale=d ** -0.5, causal=True,
                                              q_offset=0, reduce="max", group_reduce="max")
        assert_close(actual, expected)

    q = torch.randn(1, h_q, t, d, generator=generator)
    k = torch.randn(1, h_kv, t, d, generator=generator)
    probe = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_PROBE, str(t), str(h_q), str(h_kv),
                            str(d)], capture_output=True, text=True, check=True)
    memory = json.loads(probe.stdout)
    recorder.measure(
        "attention_scores/reconstruction", {"B": 1, "H_q": h_q, "H_kv": h_kv, "T_q": t, "T_k": t,
                                            "D": d}, torch.float32, "torch",
        lambda: attention_scores(q, k, q_offset=0, reduce="max", group_reduce="max",
                                 impl="torch"),
        check=check, flops=2 * h_q * d * t * t,
        extra={"peak_mem_mib": round(memory["peak_growth"] / 2**20, 1),
               "note": f"materialised fp32 attention would be {h_q * t * t * 4 / 2**30:.1f} GiB"})
    features = _features(h_q, "cpu")
    window = min(WINDOW, t // 4)  # a window that masks at either size

    def check_features():
        kwargs = {"q_offset": 0, "reduce": "max", "group_reduce": "max", "window": window // 8,
                      "softcap": SOFTCAP, "sinks": features["sinks"]}
        assert_close(attention_scores(small_q, small_k, impl="torch", **kwargs),
                     attention_scores_reference(small_q, small_k, **kwargs))

    recorder.measure(
        "attention_scores/reconstruction+features",
        {"B": 1, "H_q": h_q, "H_kv": h_kv, "T_q": t, "T_k": t, "D": d, "softcap": SOFTCAP,
         "window": window, "sinks": True}, torch.float32, "torch",
        lambda: attention_scores(q, k, q_offset=0, reduce="max", group_reduce="max",
                                 impl="torch", **{**features, "window": window}),
        check=check_features, flops=2 * h_q * d * t * t,
        baseline=lambda: attention_scores(q, k, q_offset=0, reduce="max", group_reduce="max",
                                          impl="torch"),
        baseline_name="the plain op, same shapes",
        extra={"note": "speedup = plain time / time with softcap, sinks and window (the window "
                       "skips the keys before each chunk's first window)"})


def run(recorder: Recorder, quick: bool) -> None:
    (run_gpu if recorder.device.type == "cuda" else run_cpu)(recorder, quick)


if __name__ == "__main__":
    sys.exit(main_for(run, "attention_scores benchmark"))
