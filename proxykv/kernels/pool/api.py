"""Public entry point of the score pooling op."""

from __future__ import annotations

import torch

from proxykv._backend import OpSpec, dispatch, register_op
from proxykv._validation import as_score_tensor, check_choice, check_int
from proxykv.kernels.pool.reference import pool_scores_reference
from proxykv.kernels.pool.torch_impl import pool_scores_torch

POOL_MODES = ("max", "avg")


def pool_scores(
    scores: torch.Tensor,
    kernel_size: int,
    *,
    mode: str = "max",
    impl: str | None = None,
) -> torch.Tensor:
    """Pool scores along their last axis with a centred odd window (SnapKV's smoothing step).

    Args:
        scores: float32 (or float64, read as float32) ``[..., T]``, any strides, every dimension
            >= 1, on a CPU or CUDA device; larger = more important, ``-inf`` marks an invalid
            position. Up to three leading dimensions that cannot be merged into one stride are
            supported (``[B, L, H, T]`` with any strides always is).
        kernel_size: odd int >= 1. ``out[..., t]`` pools positions ``t - k//2 … t + k//2``; the
            window is truncated at the sequence ends (no padding enters the result).
        mode: ``"max"`` — maximum over the window; ``"avg"`` — mean over the window's valid
            (``!= -inf``) entries.
        impl: ``"triton"``, ``"torch"`` or None (see ``proxykv.backend_info``).

    Returns:
        float32 tensor with the shape of ``scores``, contiguous, on the same device. A position that
        is ``-inf`` in ``scores`` stays ``-inf``: pooling never turns an invalid position into a
        finite score. ``+inf`` is a score like any other: every valid position whose window holds
        ``+inf`` pools to ``+inf`` (``-inf`` entries take no part, so no NaN arises).

    Raises:
        TypeError / ValueError: see ``as_score_tensor``; a bad ``kernel_size``, ``mode``, ``impl``.

    Not checked (costs a device sync): NaN entries; they propagate.
    """
    scores = as_score_tensor("scores", scores, min_ndim=1, layout="[..., T]")
    check_int("kernel_size", kernel_size, minimum=1, odd=True)
    check_choice("mode", mode, POOL_MODES)
    _, run = dispatch("pool_scores", impl, scores.device)
    return run(scores, kernel_size, mode)


def _example(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 4, 37, generator=generator)
    scores[0, 1, 2, 5:9] = float("-inf")
    return (scores.to(device), 5), {"mode": "avg"}


register_op(OpSpec(
    name="pool_scores",
    api=pool_scores,
    torch_impl=pool_scores_torch,
    triton_launcher="proxykv.kernels.pool.triton_impl:pool_scores_triton",
    reference=lambda scores, kernel_size, mode="max": pool_scores_reference(
        scores, kernel_size, mode),
    example=_example,
))
