"""Benchmark of the selection policies on model-sized score tensors ``[B, L, H_kv, T]``.

Each case is checked against a naive baseline that gets the same answer by brute force — a full
stable sort of every row (or of every pooled group) — and timed against it. Selection must stay
small next to the scoring itself (a prefill of the proxy model over ``T`` tokens).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for

from proxykv.kernels import pool_scores
from proxykv.policies import get_policy, normalize_head_scores


def sorted_top_mask(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The naive way: stable-sort each row descending (ties keep index order), keep a prefix."""
    order = torch.sort(rows, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(rows.shape[-1], device=rows.device).expand_as(rows)
    keep_sorted = (rank < counts.unsqueeze(-1)) & (rows.gather(-1, order) > float("-inf"))
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def naive_topk(scores: torch.Tensor, budget: int) -> torch.Tensor:
    rows = scores.reshape(-1, scores.shape[-1])
    counts = torch.full((rows.shape[0],), budget, device=scores.device)
    return sorted_top_mask(rows, counts).view(scores.shape)


def naive_head_budget_global(scores: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    """The floor by each head's own scores, the rest by one sort of the normalised scores (the
    policy's default, ``normalize="softmax"``) over the model."""
    batch, layers, heads, _ = scores.shape
    floor_mask = naive_topk(scores, int(alpha * budget + 0.5))
    compared = normalize_head_scores(scores, "softmax")
    rest = compared.masked_fill(floor_mask, float("-inf")).reshape(batch, -1)
    counts = torch.full((batch,), budget * layers * heads, device=scores.device) \
        - floor_mask.reshape(batch, -1).sum(-1)
    return floor_mask | sorted_top_mask(rest, counts).view(scores.shape)


def naive_pooled_window(scores: torch.Tensor, budget: int, window: int, kernel_size: int,
                        mode: str, impl: str) -> torch.Tensor:
    seq_len = scores.shape[-1]
    hidden = scores.clone()
    hidden[..., seq_len - window:] = float("-inf")
    pooled = pool_scores(hidden, kernel_size, mode=mode, impl=impl)
    mask = naive_topk(pooled, budget - window)
    mask[..., seq_len - window:] = True
    return mask


def check_same_as_naive(name: str, op, naive) -> None:
    selection = op()
    selection.validate()
    if not torch.equal(selection.to_mask(), naive()):
        raise AssertionError(f"{name}: kept positions differ from the naive sort")


def run(recorder: Recorder, quick: bool) -> None:
    device = recorder.device
    pool_impl = recorder.impl
    if quick:
        lengths = [4096]
    else:
        lengths = [32768, 131072] if device.type == "cuda" else [8192, 32768]
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        # [B, L, H_kv, T] scores of a 32-layer model with 8 KV heads (Llama-3-8B-like).
        scores = torch.randn(1, 32, 8, length, generator=generator).to(device)
        budget = length // 10  # keep_ratio 0.1
        # (name, policy, what runs it, naive baseline, baseline name); selection itself is torch
        # code on either device, only the pooling dispatches to a kernel.
        cases = [
            ("topk", get_policy("topk"), "torch", partial(naive_topk, scores, budget),
             "sort per head"),
            ("head_budget global", get_policy("head_budget", scope="global", alpha=0.2), "torch",
             partial(naive_head_budget_global, scores, budget, 0.2), "sort per model"),
            ("pooled_window", get_policy("pooled_window", window=32, kernel_size=5, mode="avg",
                                         impl=pool_impl), f"torch+{pool_impl} pool",
             partial(naive_pooled_window, scores, budget, 32, 5, "avg", pool_impl),
             "pool + sort per head"),
        ]
        for name, policy, impl, naive, naive_name in cases:
            op = partial(policy.select, scores, budget=budget)
            recorder.measure(
                f"policy {name}", {"B": 1, "L": 32, "H": 8, "T": length, "budget": budget},
                torch.float32, impl, op, check=partial(check_same_as_naive, name, op, naive),
                baseline=naive, baseline_name=naive_name,
                bytes_moved=scores.numel() * 4,
            )


if __name__ == "__main__":
    sys.exit(main_for(run, "selection policies benchmark"))
