"""Benchmark of pool_scores (SnapKV's score smoothing) against torch's own pooling ops."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for  # noqa: E402

from proxykv import pool_scores  # noqa: E402
from proxykv.kernels.pool.torch_impl import pool_scores_torch  # noqa: E402
from proxykv.testing import assert_close  # noqa: E402


def run(recorder: Recorder, quick: bool) -> None:
    device = recorder.device
    impl = recorder.impl
    # [B, L, H_kv, T] scores of a 32-layer, 8-KV-head model.
    lengths = [4096] if quick else ([4096, 32768, 131072] if device.type == "cuda" else [4096, 32768])
    for length in lengths:
        scores = torch.randn(1, 32, 8, length, device=device)
        for mode in ("max", "avg"):
            def op():
                return pool_scores(scores, 7, mode=mode, impl=impl)

            def check():
                expected = pool_scores_torch(scores.cpu(), 7, mode).to(device)
                assert_close(op(), expected, name="pool_scores")

            recorder.measure(
                "pool_scores", {"B": 1, "L": 32, "H": 8, "T": length, "kernel_size": 7,
                                "mode": mode},
                torch.float32, impl, op, check=check,
                baseline=lambda: torch.nn.functional.max_pool1d(
                    scores.view(-1, 1, length), 7, stride=1, padding=3) if mode == "max" else
                torch.nn.functional.avg_pool1d(scores.view(-1, 1, length), 7, stride=1, padding=3),
                baseline_name=f"torch {mode}_pool1d",
                bytes_moved=2 * scores.numel() * 4,
            )


if __name__ == "__main__":
    sys.exit(main_for(run, "pool_scores benchmark"))
