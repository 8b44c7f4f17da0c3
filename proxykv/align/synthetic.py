"""Synthetic proxy/teacher score pairs with a known relation, for tests, demos and benchmarks.

The teacher's log-scores are a fixed linear mixing of the proxy's channels followed by a short blur
along the tokens — what a per-token channel mixing (``linear``) cannot express and the
temporal-then-channel ``axial`` mapper can.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from proxykv._validation import check_float, check_int
from proxykv.align.base import NEG_INF, check_model_shape


def synthetic_pair(samples: int, proxy_shape, target_shape, length: int, *, seed: int = 0,
                   mixing_seed: int = 0, blur=(0.25, 0.5, 0.25),
                   padded_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(proxy [N, Lp, Hp, T], teacher [N, Lt, Ht, T])`` float32 log-scores on the CPU.

    Proxy: i.i.d. standard normal. Teacher: ``blur * (M @ proxy)`` per token, with a fixed
    ``M [Lt*Ht, Lp*Hp]`` drawn from ``mixing_seed`` (so data sets drawn with different ``seed`` and
    the same ``mixing_seed`` share the relation) and ``blur`` an odd-length kernel along ``T``
    (zero-padded at the ends). With ``padded_fraction > 0`` each sample keeps a random valid
    prefix of at least ``(1 - padded_fraction) * T`` tokens; the rest is ``-inf`` on both sides.
    """
    check_int("samples", samples, minimum=1)
    check_int("length", length, minimum=1)
    proxy_shape = check_model_shape("proxy_shape", proxy_shape)
    target_shape = check_model_shape("target_shape", target_shape)
    check_int("len(blur)", len(blur), minimum=1, odd=True)
    check_float("padded_fraction", padded_fraction, minimum=0.0, maximum=1.0)
    if padded_fraction == 1:
        raise ValueError("padded_fraction must be < 1 (every sample keeps a valid token), got 1.0")
    proxy_channels = proxy_shape[0] * proxy_shape[1]
    target_channels = target_shape[0] * target_shape[1]
    mixing_generator = torch.Generator().manual_seed(mixing_seed)
    mixing = torch.randn(target_channels, proxy_channels, generator=mixing_generator) \
        / proxy_channels ** 0.5
    generator = torch.Generator().manual_seed(seed)
    proxy = torch.randn(samples, proxy_channels, length, generator=generator)
    kernel = torch.tensor(blur, dtype=torch.float32).view(1, 1, -1).expand(target_channels, 1, -1)
    teacher = F.conv1d(mixing @ proxy, kernel, padding=len(blur) // 2, groups=target_channels)
    if padded_fraction > 0:
        shortest = max(1, int((1 - padded_fraction) * length))
        valid_lengths = torch.randint(shortest, length + 1, (samples, 1, 1), generator=generator)
        padding = torch.arange(length).view(1, 1, -1) >= valid_lengths
        proxy = proxy.masked_fill(padding, NEG_INF)
        teacher = teacher.masked_fill(padding, NEG_INF)
    return (proxy.view(samples, *proxy_shape, length),
            teacher.reshape(samples, *target_shape, length).contiguous())
