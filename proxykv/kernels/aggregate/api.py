"""Public entry points of the score aggregation ops.

They turn raw per-query-head attention scores into what a policy ranks: reduce the query heads of
each GQA group to their KV head (``reduce_heads``), smooth along the sequence (``pool_scores``, in
``proxykv.kernels.pool``), normalise each row (``normalize_scores``) — or all three in one pass
(``aggregate_scores``) — and mix scores across layers (``combine_layers``, for aligners).

Scores are float32 (float64 is accepted and read as float32; see ``as_score_tensor`` for the
input checks), larger = more important, ``-inf`` = invalid position. The infinity rules, in one
place:

* ``reduce_heads``: an output position is ``-inf`` exactly when every head of the group is ``-inf``
  there. ``"max"`` takes the maximum; ``"mean"`` averages the heads that are not ``-inf`` (a head
  that cannot see a position neither votes nor drags the mean down), so it is ``+inf`` where a head
  that sees the position is ``+inf``.
* ``normalize_scores``: ``-inf`` stays ``-inf`` and is left out of the row's sum/max. A row holding
  ``+inf`` (given, or produced by the group mean or pooling) normalises to its limit: ``"sum"``
  gives each ``+inf`` entry ``1 / (number of +inf entries in the row)``, ``"max"`` gives them 1,
  and every finite entry becomes 0. Never NaN from non-NaN input.
* ``combine_layers``: ``-inf`` where any layer with a non-zero weight is ``-inf``.
"""

from __future__ import annotations

import torch

from proxykv._backend import OpSpec, dispatch, register_op
from proxykv._validation import (
    as_score_tensor,
    check_choice,
    check_dim,
    check_int,
    check_same_device,
    check_tensor,
)
from proxykv.kernels.aggregate.reference import (
    aggregate_scores_reference,
    combine_layers_reference,
    normalize_scores_reference,
    reduce_heads_reference,
)
from proxykv.kernels.aggregate.torch_impl import (
    aggregate_scores_torch,
    combine_layers_torch,
    normalize_scores_torch,
    reduce_heads_torch,
)
from proxykv.kernels.pool.api import POOL_MODES

GROUP_MODES = ("mean", "max")
NORMALIZE_MODES = ("sum", "max", "none")

_TRITON = "proxykv.kernels.aggregate.triton_impl"


def _grouped_scores(scores, group_size) -> torch.Tensor:
    """Checked float32 ``scores [..., H_q, T]`` whose heads split into groups of ``group_size``."""
    scores = as_score_tensor("scores", scores, min_ndim=2, layout="[..., H_q, T]")
    check_int("group_size", group_size, minimum=1)
    heads = scores.shape[-2]
    if heads % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must divide the number of query heads H_q={heads} "
            f"(scores.shape[-2]; scores has shape {tuple(scores.shape)})")
    return scores


def reduce_heads(
    scores: torch.Tensor,
    group_size: int,
    *,
    mode: str = "mean",
    impl: str | None = None,
) -> torch.Tensor:
    """Reduce each GQA group of query heads to one score row per KV head.

    Args:
        scores: float32 (or float64, read as float32) ``[..., H_q, T]``, any strides, every
            dimension >= 1, on a CPU or CUDA device. The leading dimensions are carried through
            (``[B, H_q, T]``, ``[B, L, H_q, T]`` …); with ``impl="triton"``, up to three leading
            dimensions *including* ``H_q / group_size`` that cannot be merged into one stride are
            supported (any ``[B, L, H_q, T]`` layout is).
        group_size: ``H_q // H_kv``, int >= 1 dividing ``H_q``. Query head ``h`` belongs to group
            (KV head) ``h // group_size``.
        mode: ``"mean"`` — mean over the group's heads that are not ``-inf`` at the position;
            ``"max"`` — maximum over the group's heads.
        impl: ``"triton"``, ``"torch"`` or None (see ``proxykv.backend_info``).

    Returns:
        float32 ``[..., H_q // group_size, T]``, contiguous, on the device of ``scores``. A position
        is ``-inf`` exactly when it is ``-inf`` for every head of the group, and ``+inf`` when a
        head that is not ``-inf`` there is ``+inf`` (never NaN from non-NaN input).

    Raises:
        TypeError / ValueError: see ``as_score_tensor``; a bad ``group_size``, ``mode``, ``impl``.

    Not checked (costs a device sync): NaN entries; they propagate.
    """
    scores = _grouped_scores(scores, group_size)
    check_choice("mode", mode, GROUP_MODES)
    _, run = dispatch("reduce_heads", impl, scores.device)
    return run(scores, group_size, mode)


def normalize_scores(
    scores: torch.Tensor,
    *,
    mode: str = "sum",
    impl: str | None = None,
) -> torch.Tensor:
    """Normalise each row of scores along its last axis (T).

    Args:
        scores: float32 (or float64, read as float32) ``[..., T]``, any strides, every dimension
            >= 1, on a CPU or CUDA device (up to three unmergeable leading dimensions with
            ``impl="triton"``, as for ``pool_scores``).
        mode: ``"sum"`` — divide the row by the sum of the absolute values of its valid entries
            (L1; for non-negative scores such as attention mass the row then sums to 1);
            ``"max"`` — divide by the largest absolute value of its valid entries (L∞; the largest
            non-negative score becomes 1); ``"none"`` — a float32 copy. Dividing by a magnitude
            keeps the order of positions within a row for scores of any sign.
        impl: ``"triton"``, ``"torch"`` or None.

    Returns:
        float32 tensor with the shape of ``scores``, contiguous. ``-inf`` entries stay ``-inf`` and
        take no part in the sum/max. A row whose divisor is 0 — all its valid entries are 0, or
        it has none (fully ``-inf``) — is returned unchanged (zeros stay zeros, ``-inf`` stays
        ``-inf``). A row holding ``+inf`` normalises to its limit: ``"sum"`` gives each ``+inf``
        entry ``1 / (number of +inf entries in the row)``, ``"max"`` gives them 1, and every
        finite entry becomes 0. No NaN is ever produced from non-NaN input.

    Raises:
        TypeError / ValueError: see ``as_score_tensor``; a bad ``mode`` or ``impl``.

    Not checked (costs a device sync): NaN entries (they propagate through their row), and rows
    whose sum of finite magnitudes overflows float32 (their result is unspecified).
    """
    scores = as_score_tensor("scores", scores, min_ndim=1, layout="[..., T]")
    check_choice("mode", mode, NORMALIZE_MODES)
    _, run = dispatch("normalize_scores", impl, scores.device)
    return run(scores, mode)


def aggregate_scores(
    scores: torch.Tensor,
    *,
    group_size: int,
    group_mode: str = "mean",
    pool_kernel_size: int = 1,
    pool_mode: str = "max",
    normalize: str = "none",
    impl: str | None = None,
) -> torch.Tensor:
    """Group reduce → pool → normalise in one pass over the scores.

    Equal (up to float32 rounding) to::

        normalize_scores(pool_scores(reduce_heads(scores, group_size, mode=group_mode),
                                     pool_kernel_size, mode=pool_mode), mode=normalize)

    but the Triton path reads ``scores`` once and writes the (``group_size`` times smaller) result
    once; normalising adds one in-place rescale pass over the result, because a 128k-token row's
    sum/max is only known once the whole row is pooled. No intermediate tensor is allocated beyond
    a ``[rows, T / 1024]`` buffer of per-tile partial sums.

    Args:
        scores: float32 (or float64, read as float32) ``[..., H_q, T]``, any strides, every
            dimension >= 1 (see ``reduce_heads``).
        group_size: int >= 1 dividing ``H_q``; 1 skips the group reduction.
        group_mode: ``"mean"`` or ``"max"`` (see ``reduce_heads``).
        pool_kernel_size: odd int >= 1, centred window along T (see ``pool_scores``); 1 skips
            pooling.
        pool_mode: ``"max"`` or ``"avg"`` (see ``pool_scores``).
        normalize: ``"sum"``, ``"max"`` or ``"none"`` (see ``normalize_scores``).
        impl: ``"triton"``, ``"torch"`` or None.

    Returns:
        float32 ``[..., H_q // group_size, T]``, contiguous. A position is ``-inf`` exactly when it
        is ``-inf`` for every head of its group. ``+inf`` follows the rules of the three ops (see
        the module docstring): a row that holds ``+inf`` after pooling normalises to its limit.

    Raises:
        TypeError / ValueError: see ``as_score_tensor``; a bad ``group_size``, mode, window or
        ``impl``.

    Not checked (costs a device sync): NaN entries; they propagate.
    """
    scores = _grouped_scores(scores, group_size)
    check_choice("group_mode", group_mode, GROUP_MODES)
    check_int("pool_kernel_size", pool_kernel_size, minimum=1, odd=True)
    check_choice("pool_mode", pool_mode, POOL_MODES)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    _, run = dispatch("aggregate_scores", impl, scores.device)
    return run(scores, group_size, group_mode, pool_kernel_size, pool_mode, normalize)


def combine_layers(
    scores: torch.Tensor,
    weights: torch.Tensor,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Weighted sum over layers at every (batch, head, position): ``out[:, o] = Σ_i w[o, i] s[:, i]``.

    Args:
        scores: float32 (or float64, read as float32) ``[B, L_in, H, T]``, any strides, every
            dimension >= 1, on a CPU or CUDA device.
        weights: float32 ``[L_out, L_in]``, any strides, on the device of ``scores``; any sign.
        impl: ``"triton"``, ``"torch"`` or None.

    Returns:
        float32 ``[B, L_out, H, T]``, contiguous. ``out[b, o, h, t]`` is ``-inf`` when
        ``scores[b, i, h, t]`` is ``-inf`` for some layer ``i`` with ``weights[o, i] != 0`` (of
        either sign); a layer whose weight is exactly 0 takes no part, even where it is ``-inf``.
        A row of ``weights`` that is all zero therefore gives 0 at every position.

    Raises:
        TypeError / ValueError: see ``as_score_tensor``; ``weights`` not float32 ``[L_out, L_in]``
        with ``L_out >= 1`` on the device of ``scores``.

    Not checked (costs a device sync): NaN or infinite weights, NaN or ``+inf`` scores (``+inf``
    times a negative weight reads as an invalid ``-inf``; mixed with weights of both signs it
    gives NaN).
    """
    scores = as_score_tensor("scores", scores, ndim=4, layout="[B, L_in, H, T]")
    check_tensor("weights", weights, ndim=2, layout="[L_out, L_in]", dtypes=(torch.float32,))
    check_same_device(scores=scores, weights=weights)
    check_dim("weights", weights, 1, scores.shape[1], "the number of input layers L_in")
    if weights.shape[0] == 0:
        raise ValueError(f"weights must have at least one output layer (L_out >= 1), got shape "
                         f"{tuple(weights.shape)}")
    _, run = dispatch("combine_layers", impl, scores.device)
    return run(scores, weights)


def _example_scores(device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 8, 45, generator=generator)
    scores[0, 1, 0:4, 7:12] = float("-inf")   # invalid for a whole group
    scores[1, 2, 5, 20:30] = float("-inf")    # invalid for one head of a group
    scores[1, 0, :, :] = float("-inf")        # a fully invalid row
    return scores.to(device)


def _example_combine(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 5, 3, 40, generator=generator)
    scores[0, 1, 2, 3:9] = float("-inf")
    weights = torch.randn(4, 5, generator=generator)
    weights[2, 1] = 0.0
    return (scores.to(device), weights.to(device)), {}


register_op(OpSpec(
    name="reduce_heads",
    api=reduce_heads,
    torch_impl=reduce_heads_torch,
    triton_launcher=f"{_TRITON}:reduce_heads_triton",
    reference=reduce_heads_reference,
    example=lambda device: ((_example_scores(device), 4), {"mode": "mean"}),
))

register_op(OpSpec(
    name="normalize_scores",
    api=normalize_scores,
    torch_impl=normalize_scores_torch,
    triton_launcher=f"{_TRITON}:normalize_scores_triton",
    reference=normalize_scores_reference,
    example=lambda device: ((_example_scores(device),), {"mode": "sum"}),
))

register_op(OpSpec(
    name="aggregate_scores",
    api=aggregate_scores,
    torch_impl=aggregate_scores_torch,
    triton_launcher=f"{_TRITON}:aggregate_scores_triton",
    reference=aggregate_scores_reference,
    example=lambda device: ((_example_scores(device),), {
        "group_size": 4, "group_mode": "mean", "pool_kernel_size": 5, "pool_mode": "avg",
        "normalize": "sum"}),
))

register_op(OpSpec(
    name="combine_layers",
    api=combine_layers,
    torch_impl=combine_layers_torch,
    triton_launcher=f"{_TRITON}:combine_layers_triton",
    reference=combine_layers_reference,
    example=_example_combine,
))
