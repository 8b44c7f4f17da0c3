"""Sweep attention_scores launch plans (tile configs x key splits) on a GPU and print the best per
shape, to revisit ``GPU_TILES`` / ``_default_plan`` in proxykv/kernels/attention/triton_impl.py.

    python perf/autotune_attention.py [--quick]

Each plan is checked against the torch implementation before it is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import time_callable  # noqa: E402

from proxykv.kernels._gpu import gpu_limits  # noqa: E402
from proxykv.kernels.attention import triton_impl  # noqa: E402
from proxykv.kernels.attention.torch_impl import attention_scores_torch  # noqa: E402
from proxykv.testing import assert_close  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune_attention needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    shapes = [(64, 32768), (4096, 4096)] if args.quick else \
        [(64, 4096), (64, 32768), (64, 131072), (4096, 4096), (16384, 16384)]
    for t_q, t_k in shapes:
        q = torch.randn(1, 32, t_q, 128, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, 8, t_k, 128, device=device, dtype=torch.bfloat16)
        kwargs = dict(scale=128 ** -0.5, causal=True, q_offset=t_k - t_q, reduce="mean",
                      group_reduce="mean")
        expected = attention_scores_torch(q, k, **kwargs)
        limits = gpu_limits(device)
        default = triton_impl._default_plan(1, 8, 4, t_q, t_k, on_gpu=True, limits=limits)
        results = []
        for block_m, block_n, num_warps in triton_impl.GPU_TILES:
            stages = triton_impl._pipeline_depths(block_m, block_n, 128, 2, limits.shared_memory)
            if stages is None:  # the tile cannot be pipelined in this GPU's shared memory
                continue
            for n_splits in sorted({1, default.n_splits, 4 * default.n_splits}):
                plan = triton_impl.LaunchPlan(block_m, block_n, n_splits, num_warps, *stages)

                def run(plan=plan):
                    return triton_impl.attention_scores_triton(q, k, plan=plan, **kwargs)

                try:
                    assert_close(run(), expected, dtype=q.dtype)
                except AssertionError as error:
                    print(f"  {plan}: WRONG ({error})")
                    continue
                results.append((time_callable(run, device).median_ms, plan))
        results.sort(key=lambda r: r[0])
        print(f"T_q={t_q} T_k={t_k}: default {default}")
        for ms, plan in results[:5]:
            print(f"  {ms:8.3f} ms  {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
