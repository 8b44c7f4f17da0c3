"""The contract every aligner follows, and the score-domain helpers they share.

An aligner is a ``torch.nn.Module`` that maps proxy scores ``[B, Lp, Hp, T]`` to target scores
``[B, Lt, Ht, T]``. Both are float32 **log-scores** (float64 input is read as float32): larger =
keep, ``-inf`` = invalid position; NaN and ``+inf`` are refused.
Log-scores rather than probabilities because attention mass spans many orders of magnitude: in the
log domain, averaging layers, blurring along tokens and mixing heads behave like operations on
comparable numbers instead of being dominated by the few largest entries. Convert attention-mass
scores with :func:`to_log_scores`.

Only the ordering of the output matters downstream (a policy keeps the largest scores), so the
learned aligners standardise each sample (one mean and standard deviation over all its valid proxy
entries) before their learned part and map back to the proxy's units afterwards: a positive affine
change of a sample's input scores changes its output by the same affine map and leaves every
ranking, within a head or across heads, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from proxykv._validation import (
    as_score_tensor,
    check_float,
    check_no_nan,
    check_same_device,
)
from proxykv.align._ranking import row_mean_std

NEG_INF = float("-inf")


def check_model_shape(name: str, value) -> tuple[int, int]:
    """``(layers, heads)`` of one model: a pair of ints >= 1; returns it as a tuple."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise TypeError(f"{name} must be a pair of ints (layers, heads), got {value!r}")
    layers, heads = value
    if layers < 1 or heads < 1:
        raise ValueError(f"{name} must have layers >= 1 and heads >= 1, got {tuple(value)}")
    return int(layers), int(heads)


def check_score_tensor(name: str, scores) -> torch.Tensor:
    """A score tensor ``[B, L, H, T]`` of the losses and metrics: float32 or float64 (read as
    float32, which is returned), every dimension >= 1, on a CPU or CUDA device."""
    return as_score_tensor(name, scores, ndim=4, layout="[B, L, H, T]")


def check_scores(name: str, scores, shape: tuple[int, int], side: str, *, samples: str = "B",
                 check_values: bool = True) -> torch.Tensor:
    """An aligner's score tensor ``[B, L, H, T]`` for the ``side`` model (``(L, H) == shape``):
    float32 or float64 (read as float32, which is returned), ``B >= 1`` and ``T >= 1``, on a CPU or
    CUDA device, and (with ``check_values``; one device sync) finite or ``-inf`` everywhere.
    ``samples`` names the first dimension in messages (``"N"`` for a whole data set).
    """
    layers, heads = shape
    layout = f"[{samples}, L{side[0]}={layers}, H{side[0]}={heads}, T]"
    scores = as_score_tensor(name, scores, ndim=4, layout=f"[{samples}, L{side[0]}, H{side[0]}, T]")
    if tuple(scores.shape[1:3]) != shape:
        raise ValueError(f"{name} must have shape {layout} for the {side} model "
                         f"({layers} layers x {heads} heads), got shape {tuple(scores.shape)}")
    if check_values:
        check_no_nan(name, scores, allow_pos_inf=False, why=f"log-scores {layout}, -inf = invalid")
    return scores


def check_score_pair(pred, reference, reference_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred`` and ``reference`` (the inputs of every loss term and metric) are score tensors
    ``[B, L, H, T]`` of one shape and device (see ``check_score_tensor``); returns both as
    float32. Their values are not read."""
    pred = check_score_tensor("pred", pred)
    reference = check_score_tensor(reference_name, reference)
    if pred.shape != reference.shape:
        raise ValueError(f"pred and {reference_name} must have the same shape [B, L, H, T], got "
                         f"{tuple(pred.shape)} and {tuple(reference.shape)}")
    check_same_device(pred=pred, **{reference_name: reference})
    return pred, reference


def to_log_scores(scores: torch.Tensor, *, floor: float = 1e-30) -> torch.Tensor:
    """Attention-mass scores (``>= 0``, ``-inf`` = invalid; any shape; float32, or float64 read as
    float32) -> log-scores for the aligners.

    ``log(max(score, floor))`` at valid positions, so a valid score of 0 stays valid (it becomes
    ``log(floor)``) and only ``-inf`` marks an invalid position. Returns a new float32 tensor.

    Raises ``TypeError`` for other dtypes and ``ValueError`` for NaN or ``+inf`` entries (naming
    the first; one device sync) or a ``meta`` tensor. Not checked: negative scores (they become
    ``log(floor)`` too).
    """
    scores = as_score_tensor("scores", scores)
    check_float("floor", floor, minimum=0.0, exclusive_minimum=True)
    check_same_device(scores=scores)
    check_no_nan("scores", scores, allow_pos_inf=False,
                 why="attention mass is finite; -inf marks an invalid position")
    return torch.where(scores == NEG_INF, scores, scores.clamp_min(floor).log())


def sample_statistics(values: torch.Tensor, valid: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each sample's valid entries (``row_mean_std`` over all of a
    sample's entries).

    ``values`` ``[B, ...]`` (may hold ``-inf`` where ``valid`` is False); returns two tensors shaped
    ``[B, 1, ..., 1]``. The standard deviation is at least ``eps`` so a constant sample divides
    safely. A sample without valid entries gets mean 0.
    """
    batch = values.shape[0]
    mean, std = row_mean_std(values.reshape(batch, -1), valid.reshape(batch, -1))
    shape = (batch,) + (1,) * (values.dim() - 1)
    return mean.view(shape), std.clamp_min(eps).view(shape)


def all_channels_valid(channels: torch.Tensor) -> torch.Tensor:
    """``[B, C, T]`` -> ``[B, 1, T]``: True where the position is valid in every channel.

    Aligners that mix every proxy channel into every target channel mark an output position invalid
    when any proxy channel is invalid there, so an invalid position never becomes valid.
    """
    return (channels != NEG_INF).all(dim=1, keepdim=True)


def kernel_impl(tensor: torch.Tensor) -> str | None:
    """The ``impl`` the aligners pass to ``proxykv.kernels`` ops: the default backend on CUDA, the
    torch one on the CPU (never the Triton interpreter, which is far slower)."""
    return None if tensor.is_cuda else "torch"


class Aligner(nn.Module):
    """Base class of every adapter: validation, shapes, configuration and persistence.

    Subclasses set the class attribute ``name`` (the registry key), implement ``_align`` on
    validated input and ``params()`` returning their constructor keyword arguments (JSON-friendly),
    which ``save`` records so ``load`` can rebuild the same module.
    """

    name: ClassVar[str] = ""
    #: True when ``proxykv.align.fit_aligner`` can fit it in closed form (see ``LinearAligner``).
    supports_closed_form: ClassVar[bool] = False

    def __init__(self, proxy_shape, target_shape):
        super().__init__()
        self.proxy_shape = check_model_shape("proxy_shape", proxy_shape)
        self.target_shape = check_model_shape("target_shape", target_shape)
        #: The ``metadata`` dict ``proxykv.align.load`` read with the aligner (e.g. the models it
        #: was fitted for); ``{}`` for an aligner that was not loaded.
        self.metadata: dict[str, Any] = {}

    @property
    def proxy_channels(self) -> int:
        return self.proxy_shape[0] * self.proxy_shape[1]

    @property
    def target_channels(self) -> int:
        return self.target_shape[0] * self.target_shape[1]

    def params(self) -> dict[str, Any]:
        """Constructor keyword arguments beyond the two shapes (recorded by ``save``)."""
        return {}

    def config(self) -> dict[str, Any]:
        return {"aligner": self.name, "proxy_shape": list(self.proxy_shape),
                "target_shape": list(self.target_shape), "params": self.params()}

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Proxy log-scores ``[B, Lp, Hp, T]`` (float32, or float64 read as float32; any strides)
        -> target scores float32 ``[B, Lt, Ht, T]``, contiguous, on the same device. Larger =
        keep; ``-inf`` marks invalid positions, and a position invalid in the input channels an
        output channel reads stays invalid. The input is data: no gradient flows back into
        ``scores``.

        Raises ``TypeError`` for a non-tensor or another dtype, and ``ValueError`` for a wrong
        shape, ``B = 0`` or ``T = 0``, a ``meta`` tensor or one on another device than the
        aligner, and NaN or ``+inf`` entries (naming the first; one device sync).
        """
        scores = check_scores("scores", scores, self.proxy_shape, "proxy")
        device = self.device
        if device is not None and device != scores.device:
            raise ValueError(f"scores is on {scores.device} but the {self.name!r} aligner is on "
                             f"{device}; move one of them with .to()")
        return self._align(scores.detach())

    def _align(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device | None:
        """The device of the first parameter or buffer; None for an aligner that holds none."""
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return None

    def save(self, path, *, metadata: dict | None = None) -> None:
        """Write ``weights.safetensors`` and ``config.json`` into the directory ``path``."""
        from proxykv.align.io import save

        save(self, path, metadata=metadata)

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.params().items())
        return f"proxy_shape={self.proxy_shape}, target_shape={self.target_shape}{params}"
