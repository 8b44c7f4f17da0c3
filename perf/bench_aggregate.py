"""Benchmark of score aggregation: the fused aggregate_scores against the chain of the separate ops
(reduce_heads → pool_scores → normalize_scores), and each op against its torch implementation.

GPU shape: per-query-head scores of a 32-layer model with 32 query heads and 8 KV heads over 128k
tokens, ``[1, 32, 32, 131072]`` float32 (512 MiB) → ``[1, 32, 8, 131072]``. CPU: the same model at
4096 tokens. GB/s counts the DRAM traffic each algorithm needs at the least (stated per row in
``note``): the fused op reads the scores once and writes the result once, plus a read and a write
of the (4× smaller) result when it normalises.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import Recorder, main_for  # noqa: E402

from proxykv.kernels import pool_scores  # noqa: E402
from proxykv.kernels.aggregate import (  # noqa: E402
    aggregate_scores,
    combine_layers,
    normalize_scores,
    reduce_heads,
)
from proxykv.kernels.aggregate.reference import (  # noqa: E402
    aggregate_scores_reference,
    combine_layers_reference,
    normalize_scores_reference,
    reduce_heads_reference,
)
from proxykv.kernels.aggregate.torch_impl import (  # noqa: E402
    aggregate_scores_torch,
    combine_layers_torch,
    normalize_scores_torch,
    reduce_heads_torch,
)
from proxykv.testing import assert_close  # noqa: E402

LAYERS, QUERY_HEADS, KV_HEADS = 32, 32, 8
GROUP = QUERY_HEADS // KV_HEADS
# (group_mode, pool_kernel_size, pool_mode, normalize): SnapKV-style smoothing with a row sum, and
# a single-pass variant without normalisation.
CHAINS = [("mean", 7, "avg", "sum"), ("max", 7, "max", "none")]


def _scores(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(shape, device=device, generator=generator)
    scores[..., -17:] = float("-inf")  # padded tail, invalid for every head
    return scores


def _expected(device: torch.device, on_gpu, on_cpu):
    """The check's oracle: the float64 reference on CPU; on a GPU (where the reference would
    take minutes at 128k tokens) the torch implementation, itself tested against the reference."""
    return on_gpu() if device.type == "cuda" else on_cpu()


def run(recorder: Recorder, quick: bool) -> None:
    device = recorder.device
    impl = recorder.impl
    if quick:
        lengths = [1024]
    else:
        lengths = [8192, 131072] if device.type == "cuda" else [4096]
    for length in lengths:
        _measure_length(recorder, impl, length)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _measure_length(recorder: Recorder, impl: str, length: int) -> None:
    device = recorder.device
    scores = _scores((1, LAYERS, QUERY_HEADS, length), device)
    in_bytes = scores.numel() * 4
    out_bytes = in_bytes // GROUP
    for group_mode, kernel_size, pool_mode, normalize in CHAINS:
        _measure_fused(recorder, impl, scores, (GROUP, group_mode, kernel_size, pool_mode,
                                                normalize))

    recorder.measure(
        "reduce_heads", {"B": 1, "L": LAYERS, "H_q": QUERY_HEADS, "H_kv": KV_HEADS,
                         "T": length, "mode": "mean"},
        torch.float32, impl, lambda: reduce_heads(scores, GROUP, impl=impl),
        check=lambda: assert_close(
            reduce_heads(scores, GROUP, impl=impl),
            _expected(device, lambda: reduce_heads_torch(scores, GROUP, "mean"),
                      lambda: reduce_heads_reference(scores, GROUP, "mean")),
            name="reduce_heads"),
        baseline=lambda: scores.view(1, LAYERS, KV_HEADS, GROUP, length).mean(-2),
        baseline_name="torch mean(-2) (ignores -inf rules)",
        bytes_moved=in_bytes + out_bytes, extra={"note": "bytes=in+out"},
    )

    reduced = _scores((1, LAYERS, KV_HEADS, length), device)
    recorder.measure(
        "normalize_scores", {"B": 1, "L": LAYERS, "H": KV_HEADS, "T": length, "mode": "sum"},
        torch.float32, impl, lambda: normalize_scores(reduced, mode="sum", impl=impl),
        check=lambda: assert_close(
            normalize_scores(reduced, mode="sum", impl=impl),
            _expected(device, lambda: normalize_scores_torch(reduced, "sum"),
                      lambda: normalize_scores_reference(reduced, "sum")),
            name="normalize_scores"),
        # On CPU the op *is* the torch implementation: no baseline to compare with.
        baseline=(lambda: normalize_scores_torch(reduced, "sum")) if impl != "torch" else None,
        baseline_name="torch implementation",
        bytes_moved=3 * out_bytes, extra={"note": "bytes=2*in+out (two passes over a row)"},
    )

    weights = torch.randn(LAYERS, LAYERS, device=device)
    recorder.measure(
        "combine_layers", {"B": 1, "L_in": LAYERS, "L_out": LAYERS, "H": KV_HEADS, "T": length},
        torch.float32, impl, lambda: combine_layers(reduced, weights, impl=impl),
        check=lambda: assert_close(
            combine_layers(reduced, weights, impl=impl),
            _expected(device, lambda: combine_layers_torch(reduced, weights),
                      lambda: combine_layers_reference(reduced, weights)),
            name="combine_layers"),
        baseline=lambda: torch.einsum("oi,bihT->bohT", weights, reduced),
        baseline_name="torch einsum (ignores -inf rules)",
        bytes_moved=2 * out_bytes, extra={"note": "bytes=in+out"},
    )


def _measure_fused(recorder: Recorder, impl: str, scores: torch.Tensor, args: tuple) -> None:
    """The fused op against the chain of the three public ops, same backend."""
    group_size, group_mode, kernel_size, pool_mode, normalize = args

    def fused():
        return aggregate_scores(scores, group_size=group_size, group_mode=group_mode,
                                pool_kernel_size=kernel_size, pool_mode=pool_mode,
                                normalize=normalize, impl=impl)

    def chain():
        reduced = reduce_heads(scores, group_size, mode=group_mode, impl=impl)
        pooled = pool_scores(reduced, kernel_size, mode=pool_mode, impl=impl)
        return pooled if normalize == "none" else normalize_scores(pooled, mode=normalize,
                                                                   impl=impl)

    def check():
        expected = _expected(recorder.device, lambda: aggregate_scores_torch(scores, *args),
                             lambda: aggregate_scores_reference(scores, *args))
        assert_close(fused(), expected, name="aggregate_scores")
        assert_close(chain(), expected, name="chain of ops")

    in_bytes = scores.numel() * 4
    out_bytes = in_bytes // group_size
    rescale = 2 * out_bytes if normalize != "none" else 0
    batch, layers, heads, length = scores.shape
    recorder.measure(
        "aggregate_scores",
        {"B": batch, "L": layers, "H_q": heads, "H_kv": heads // group_size, "T": length,
         "group_mode": group_mode, "pool": f"{pool_mode}{kernel_size}", "normalize": normalize},
        torch.float32, impl, fused, check=check,
        baseline=chain, baseline_name=f"chain of 3 ops ({impl})",
        bytes_moved=in_bytes + out_bytes + rescale,
        extra={"note": "bytes=in+out" + ("+2*out (rescale)" if rescale else "")},
    )


if __name__ == "__main__":
    sys.exit(main_for(run, "score aggregation benchmark"))
