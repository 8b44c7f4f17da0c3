"""``axial`` — the HybridAxialMapper: features along the token axis, then mixing along the channel
(layer x head) axis, added to a ``depth_interp`` residual.

For sample ``b`` with proxy log-scores ``x [Cp, T]`` (``Cp = Lp*Hp``):

1. **standardise** over all valid entries of the sample: ``z = (x - mean_b) / std_b``;
2. **temporal stage**, per proxy channel, along ``T`` (invalid positions read as missing):
   ``F`` features — ``z`` itself, ``conv_filters`` learned depthwise convolutions of width
   ``conv_kernel``, and the mean and the maximum over centred windows of each width in
   ``pool_sizes`` (``pool_scores``), so "this token sits inside a salient span" is visible at
   several scales — combined into ``profiles`` learned temporal profiles per channel;
3. **cross-head alignment**, per token: a linear map plus a one-hidden-layer GELU MLP from the
   ``Cp * profiles`` profile values to the ``Ct = Lt*Ht`` target channels;
4. **residual**: ``out = depth_interp(x) + std_b * aligned``.

The output layers start at zero, so an untrained mapper *is* ``depth_interp``. Every stage is a
fixed-width window or a per-token map: time and memory are linear in ``T`` (the largest
intermediate is the features, ``4 * Cp * F * T`` bytes per sample). Keeping the two axes apart —
profiles per channel first, channel mixing second — is what keeps it small: per token it costs
``Cp*F*profiles + (Cp*profiles) * (Ct + hidden) + hidden*Ct`` multiply-adds. A position invalid in
any proxy channel is invalid in every output channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from proxykv._validation import check_int
from proxykv.align.adapters import depth_interp_matrix
from proxykv.align.base import NEG_INF, Aligner, kernel_impl, sample_statistics
from proxykv.align.registry import register_aligner
from proxykv.kernels import pool_scores


@register_aligner
class HybridAxialMapper(Aligner):
    """Args (keyword-only, recorded by ``save``):
        conv_kernel: odd width of the learned depthwise convolutions (default 7).
        conv_filters: learned convolutions per proxy channel (default 2; 0 disables them).
        pool_sizes: odd window widths of the mean/max pooling features (default ``(9, 33)``).
        profiles: learned temporal profiles per proxy channel (default 3).
        hidden: width of the channel-mixing MLP (default 32; 0 keeps only the linear map).
    """

    name = "axial"

    def __init__(self, proxy_shape, target_shape, *, conv_kernel: int = 7, conv_filters: int = 2,
                 pool_sizes=(9, 33), profiles: int = 3, hidden: int = 32):
        super().__init__(proxy_shape, target_shape)
        self.conv_kernel = check_int("conv_kernel", conv_kernel, minimum=1, odd=True)
        self.conv_filters = check_int("conv_filters", conv_filters, minimum=0)
        if isinstance(pool_sizes, (str, bytes)) or not hasattr(pool_sizes, "__iter__"):
            raise TypeError(f"pool_sizes must be a sequence of odd ints, got {pool_sizes!r}")
        self.pool_sizes = tuple(check_int("each pool_sizes entry", size, minimum=1, odd=True)
                                for size in pool_sizes)
        self.profiles = check_int("profiles", profiles, minimum=1)
        self.hidden = check_int("hidden", hidden, minimum=0)

        channels, target_channels = self.proxy_channels, self.target_channels
        self.features_per_channel = 1 + self.conv_filters + 2 * len(self.pool_sizes)
        width = channels * self.profiles
        self.register_buffer("residual", depth_interp_matrix(self.proxy_shape, self.target_shape),
                             persistent=False)
        # Depthwise filters [Cp, filters, kernel] (see _depthwise_conv), initialised like
        # nn.Conv1d's weights.
        bound = 1 / self.conv_kernel ** 0.5
        self.conv_weight = nn.Parameter(
            torch.empty(channels, self.conv_filters, self.conv_kernel).uniform_(-bound, bound))
        # One small [profiles, F] map per proxy channel (a grouped 1x1 convolution's weights).
        self.profile_weight = nn.Parameter(
            torch.randn(channels, self.profiles, self.features_per_channel)
            / self.features_per_channel ** 0.5)
        self.mix_linear = nn.Linear(width, target_channels)
        self.mix_in = nn.Linear(width, self.hidden) if self.hidden else None
        self.mix_out = nn.Linear(self.hidden, target_channels) if self.hidden else None
        for layer in (self.mix_linear, self.mix_out):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def params(self) -> dict:
        return {"conv_kernel": self.conv_kernel, "conv_filters": self.conv_filters,
                "pool_sizes": list(self.pool_sizes), "profiles": self.profiles,
                "hidden": self.hidden}

    def temporal_features(self, standardised: torch.Tensor,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, Cp, T]`` standardised log-scores (``-inf`` = invalid) -> finite features
        ``[B, Cp, F, T]``; 0 at invalid positions. ``valid`` (``standardised != -inf``) may be
        passed when the caller has it."""
        if valid is None:
            valid = standardised != NEG_INF
        filled = torch.where(valid, standardised, 0.0)
        parts = [filled.unsqueeze(2)]
        if self.conv_filters:
            parts.append(_depthwise_conv(filled, self.conv_weight))
        # pool_scores pools over valid entries only; the CPU path must not pick the interpreter.
        impl = kernel_impl(standardised)
        for size in self.pool_sizes:
            for mode in ("avg", "max"):
                pooled = pool_scores(standardised, size, mode=mode, impl=impl)
                parts.append(torch.where(valid, pooled, 0.0).unsqueeze(2))
        return torch.cat(parts, dim=2)

    def _align(self, scores: torch.Tensor) -> torch.Tensor:
        batch, length = scores.shape[0], scores.shape[-1]
        channels = scores.reshape(batch, self.proxy_channels, length)
        valid = channels != NEG_INF
        keep = valid.all(1, keepdim=True)
        mean, std = sample_statistics(channels, valid)
        features = self.temporal_features((channels - mean) / std, valid)
        profiles = torch.matmul(self.profile_weight, features)  # [B, Cp, profiles, T]
        profiles = profiles.view(batch, self.proxy_channels * self.profiles, length)
        aligned = _per_token_linear(self.mix_linear, profiles)
        if self.mix_in is not None:
            hidden = F.gelu(_per_token_linear(self.mix_in, profiles))
            aligned = aligned + _per_token_linear(self.mix_out, hidden)
        # Positions invalid in some channel are masked below, so the residual can read the
        # invalid entries as 0 (no -inf bookkeeping needed).
        residual = torch.matmul(self.residual, torch.where(valid, channels, 0.0))
        out = (residual + std * aligned).masked_fill(~keep, NEG_INF)
        return out.view(batch, *self.target_shape, length)


def _per_token_linear(layer: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """``nn.Linear`` applied to every token of ``[B, C_in, T]`` -> ``[B, C_out, T]`` without
    transposing the (long) token axis."""
    return torch.matmul(layer.weight, features) + layer.bias[:, None]


def _depthwise_conv(signal: torch.Tensor, weight: torch.Tensor,
                    shifted: bool | None = None) -> torch.Tensor:
    """``[B, C, T]`` signal, ``[C, K, W]`` filters (W odd) -> ``[B, C, K, T]`` centred, zero-padded
    correlations ``out[b, c, k, t] = sum_j weight[c, k, j] * signal[b, c, t + j - W//2]``.

    On CUDA as W shifted multiply-adds rather than ``F.conv1d``: cuDNN may run convolutions in
    TF32 (``torch.backends.cudnn.allow_tf32`` defaults to True), and memory-bound shifted adds are
    as fast there. On the CPU ``F.conv1d`` is exact float32 and several times faster.
    ``shifted`` forces one path (None: by device).
    """
    channels, filters, width = weight.shape
    if not (signal.is_cuda if shifted is None else shifted):
        out = F.conv1d(signal, weight.reshape(channels * filters, 1, width), padding=width // 2,
                       groups=channels)
        return out.view(signal.shape[0], channels, filters, signal.shape[-1])
    length = signal.shape[-1]
    padded = F.pad(signal, (width // 2, width // 2)).unsqueeze(2)          # [B, C, 1, T + W - 1]
    out = weight[:, :, :1] * padded[..., :length]
    for shift in range(1, width):
        out = out + weight[:, :, shift:shift + 1] * padded[..., shift:shift + length]
    return out
