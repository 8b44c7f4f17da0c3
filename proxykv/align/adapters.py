"""The simple adapters: ``identity``, ``depth_interp`` and ``mean_broadcast`` (training-free) and
``linear`` (a learned per-token channel mixing with a closed-form ridge fit).

Channels: a model's scores ``[B, L, H, T]`` are seen as ``L*H`` channels ``[B, L*H, T]``,
channel ``l*H + h``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from proxykv._validation import check_float, check_same_device
from proxykv.align.base import NEG_INF, Aligner, check_scores, kernel_impl, sample_statistics
from proxykv.align.registry import register_aligner
from proxykv.kernels import combine_layers


def layer_interp_matrix(proxy_layers: int, target_layers: int) -> torch.Tensor:
    """``[Lt, Lp]`` float64 weights: target layer ``l`` sits at the relative depth
    ``l / (Lt - 1)`` of the proxy, i.e. proxy position ``p = l * (Lp - 1) / (Lt - 1)``, and takes
    ``(1 - frac(p))`` of layer ``floor(p)`` plus ``frac(p)`` of the next. A single target layer sits
    at the middle (``p = (Lp - 1) / 2``). Rows sum to 1.
    """
    matrix = torch.zeros(target_layers, proxy_layers, dtype=torch.float64)
    for layer in range(target_layers):
        # Exact rational position numerator / denominator, so equal depths give exact 0/1 weights.
        numerator = layer * (proxy_layers - 1) if target_layers > 1 else proxy_layers - 1
        denominator = target_layers - 1 if target_layers > 1 else 2
        low, remainder = divmod(numerator, denominator)
        weight_high = remainder / denominator
        matrix[layer, low] += 1.0 - weight_high
        if remainder:
            matrix[layer, low + 1] += weight_high
    return matrix


def head_resample_matrix(proxy_heads: int, target_heads: int) -> torch.Tensor:
    """``[Ht, Hp]`` float64 weights: heads are equal slices of ``[0, 1)``; target head ``h``
    averages the proxy heads its slice overlaps, weighted by the overlap. So ``Ht = k*Hp``
    broadcasts each proxy head to ``k`` target heads, ``Hp = k*Ht`` averages groups of ``k`` proxy
    heads, and other ratios split the proxy heads at the boundaries. Rows sum to 1.
    """
    matrix = torch.zeros(target_heads, proxy_heads, dtype=torch.float64)
    # On a grid of Hp*Ht units a target head spans Hp units and a proxy head Ht units.
    for target in range(target_heads):
        start, end = target * proxy_heads, (target + 1) * proxy_heads
        for proxy in range(start // target_heads, math.ceil(end / target_heads)):
            overlap = min(end, (proxy + 1) * target_heads) - max(start, proxy * target_heads)
            matrix[target, proxy] = overlap / proxy_heads
    return matrix


def depth_interp_matrix(proxy_shape: tuple[int, int],
                        target_shape: tuple[int, int]) -> torch.Tensor:
    """``[Lt*Ht, Lp*Hp]`` float32 channel map of ``depth_interp`` (layer weights x head weights)."""
    layers = layer_interp_matrix(proxy_shape[0], target_shape[0])
    heads = head_resample_matrix(proxy_shape[1], target_shape[1])
    return torch.kron(layers, heads).float()


@register_aligner
class IdentityAligner(Aligner):
    """Returns the proxy scores unchanged (a copy). Needs equal proxy and target shapes."""

    name = "identity"

    def __init__(self, proxy_shape, target_shape):
        super().__init__(proxy_shape, target_shape)
        if self.proxy_shape != self.target_shape:
            raise ValueError(f"the 'identity' aligner needs proxy_shape == target_shape, got "
                             f"{self.proxy_shape} and {self.target_shape}; use 'depth_interp' or a "
                             f"learned aligner for models of different shapes")

    def _align(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.clone(memory_format=torch.contiguous_format)


@register_aligner
class DepthInterpAligner(Aligner):
    """Training-free: target layer ``l`` interpolates the two proxy layers at the same relative
    depth (see ``layer_interp_matrix``); heads are broadcast or averaged to the target's count (see
    ``head_resample_matrix``). Equal shapes give the identity.

    An output entry is ``-inf`` where a proxy entry it reads with non-zero weight is ``-inf``.
    """

    name = "depth_interp"

    def __init__(self, proxy_shape, target_shape):
        super().__init__(proxy_shape, target_shape)
        self.register_buffer("matrix", depth_interp_matrix(self.proxy_shape, self.target_shape),
                             persistent=False)

    def _align(self, scores: torch.Tensor) -> torch.Tensor:
        batch, length = scores.shape[0], scores.shape[-1]
        channels = scores.reshape(batch, self.proxy_channels, 1, length)
        out = combine_layers(channels, self.matrix, impl=kernel_impl(scores))
        return out.view(batch, *self.target_shape, length)


@register_aligner
class MeanBroadcastAligner(Aligner):
    """SpecPrefill-style baseline: one score per token, the mean of the proxy's log-scores over
    all its layers and heads, given to every target layer and head.

    A position invalid in any proxy channel is invalid in every output channel.
    """

    name = "mean_broadcast"

    def _align(self, scores: torch.Tensor) -> torch.Tensor:
        batch, length = scores.shape[0], scores.shape[-1]
        channels = scores.reshape(batch, self.proxy_channels, length)
        valid = (channels != NEG_INF).all(1, keepdim=True)
        mean = torch.where(valid, channels, 0.0).mean(dim=1, keepdim=True)
        mean = mean.masked_fill_(~valid, NEG_INF)
        return mean.view(batch, 1, 1, length).expand(batch, *self.target_shape, length).contiguous()


@register_aligner
class LinearAligner(Aligner):
    """A learned ``(Lp*Hp) -> (Lt*Ht)`` mixing of each token's proxy scores.

    ``out = mean_b + std_b * (W @ z + bias)`` where ``z = (x - mean_b) / std_b`` standardises sample
    ``b`` over all its valid proxy entries (so the output is in the proxy's units and rankings are
    invariant to a positive affine change of a sample's input). ``W`` starts as the
    ``depth_interp`` map and ``bias`` at 0, so the untrained adapter reproduces ``depth_interp``
    (up to float rounding). Fit by gradient descent or in closed form (ridge regression on the
    teacher's per-sample standardised log-scores): ``fit_aligner`` picks closed form by default.

    A position invalid in any proxy channel is invalid in every output channel.
    """

    name = "linear"
    supports_closed_form = True

    def __init__(self, proxy_shape, target_shape):
        super().__init__(proxy_shape, target_shape)
        self.weight = nn.Parameter(depth_interp_matrix(self.proxy_shape, self.target_shape))
        self.bias = nn.Parameter(torch.zeros(self.target_channels))

    def _align(self, scores: torch.Tensor) -> torch.Tensor:
        batch, length = scores.shape[0], scores.shape[-1]
        channels = scores.reshape(batch, self.proxy_channels, length)
        valid = channels != NEG_INF
        keep = valid.all(1, keepdim=True)
        mean, std = sample_statistics(channels, valid)
        standardised = torch.where(valid, (channels - mean) / std, 0.0)
        mixed = torch.matmul(self.weight, standardised) + self.bias[:, None]
        out = (mean + std * mixed).masked_fill(~keep, NEG_INF)
        return out.view(batch, *self.target_shape, length)

    def closed_form_statistics(self, proxy_scores: torch.Tensor,
                               target_scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sufficient statistics of the ridge fit for one batch (summable over batches): the Gram
        matrix of ``[z, 1]`` features, their cross products with the standardised teacher, and the
        number of tokens used (positions valid in every proxy and every target channel), float64.

        ``proxy_scores [B, Lp, Hp, T]`` and ``target_scores [B, Lt, Ht, T]`` are log-scores of this
        aligner's proxy and target shapes (float32/float64, ``-inf`` = invalid), on one device;
        their values are not checked.
        """
        proxy_scores = check_scores("proxy_scores", proxy_scores, self.proxy_shape, "proxy",
                                    check_values=False)
        target_scores = check_scores("target_scores", target_scores, self.target_shape,
                                     "target", check_values=False)
        if (proxy_scores.shape[0], proxy_scores.shape[-1]) != \
                (target_scores.shape[0], target_scores.shape[-1]):
            raise ValueError(f"proxy_scores and target_scores must share B and T, got shapes "
                             f"{tuple(proxy_scores.shape)} and {tuple(target_scores.shape)}")
        check_same_device(proxy_scores=proxy_scores, target_scores=target_scores)
        batch, length = proxy_scores.shape[0], proxy_scores.shape[-1]
        proxy = proxy_scores.reshape(batch, self.proxy_channels, length)
        target = target_scores.reshape(batch, self.target_channels, length)
        proxy_valid, target_valid = proxy != NEG_INF, target != NEG_INF
        mean, std = sample_statistics(proxy, proxy_valid)
        target_mean, target_std = sample_statistics(target, target_valid)
        used = (proxy_valid.all(1, keepdim=True) & target_valid.all(1, keepdim=True)).reshape(-1)
        features = torch.cat([(proxy - mean) / std, torch.ones_like(proxy[:, :1])], dim=1)
        features = features.transpose(1, 2).reshape(-1, self.proxy_channels + 1)[used].double()
        teacher = ((target - target_mean) / target_std).transpose(1, 2)
        teacher = teacher.reshape(-1, self.target_channels)[used].double()
        return {"gram": features.T @ features, "cross": features.T @ teacher,
                "count": torch.tensor(float(features.shape[0]), dtype=torch.float64)}

    @torch.no_grad()
    def solve_closed_form(self, statistics: dict[str, torch.Tensor], ridge: float) -> None:
        """Set ``weight`` and ``bias`` to the ridge solution ``(G + ridge*n*I') \\ C`` (the bias is
        not penalised). ``ridge`` is per token, on standardised features."""
        ridge = check_float("ridge", ridge, minimum=0.0)
        count = float(statistics["count"])
        if count == 0:
            raise ValueError("the closed-form fit found no position valid in every proxy and "
                             "target channel; check the -inf masks of the training data")
        penalty = torch.full((self.proxy_channels + 1,), ridge * count, dtype=torch.float64)
        penalty[-1] = 0.0
        # A tiny system: solve it on the CPU, where lstsq also copes with a singular one (ridge=0).
        system = statistics["gram"].cpu() + torch.diag(penalty)
        solution = torch.linalg.lstsq(system, statistics["cross"].cpu(), driver="gelsd").solution
        self.weight.copy_(solution[:-1].T.to(self.weight))
        self.bias.copy_(solution[-1].to(self.bias))
