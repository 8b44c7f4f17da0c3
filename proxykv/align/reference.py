"""A naive, readable float64 oracle of the ``axial`` mapper's forward pass, written independently of
``axial.py``'s code paths (no ``pool_scores``, no batched matmul tricks): tests and the benchmark
compare ``HybridAxialMapper`` against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from proxykv.align.adapters import head_resample_matrix, layer_interp_matrix
from proxykv.align.axial import HybridAxialMapper

NEG_INF = float("-inf")


@torch.no_grad()
def axial_reference(mapper: HybridAxialMapper, scores: torch.Tensor,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``mapper(scores)`` recomputed step by step in ``dtype`` on ``scores``' device (the mapper's
    weights are read from wherever they are); returns ``[B, Lt, Ht, T]``."""
    batch, length = scores.shape[0], scores.shape[-1]
    channels = mapper.proxy_channels
    x = scores.to(dtype).reshape(batch, channels, length)
    valid = x != NEG_INF

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(dtype=dtype, device=x.device)

    means, stds = [], []
    for sample in range(batch):
        values = x[sample][valid[sample]]
        means.append(values.mean() if values.numel() else x.new_zeros(()))
        stds.append((values - means[-1]).square().mean().sqrt().clamp_min(1e-6)
                    if values.numel() else x.new_full((), 1e-6))
    mean = torch.stack(means).view(batch, 1, 1)
    std = torch.stack(stds).view(batch, 1, 1)
    z = torch.where(valid, (x - mean) / std, 0.0)

    features = [z]
    if mapper.conv_filters:
        weight = cast(mapper.conv_weight).reshape(channels * mapper.conv_filters, 1, -1)
        convolved = F.conv1d(z, weight, padding=mapper.conv_kernel // 2, groups=channels)
        features += list(convolved.view(batch, channels, mapper.conv_filters, length).unbind(2))
    flat_z, flat_valid = z.reshape(-1, 1, length), valid.reshape(-1, 1, length).to(dtype)
    for size in mapper.pool_sizes:
        window = torch.ones(1, 1, size, dtype=dtype, device=x.device)
        sums = F.conv1d(flat_z, window, padding=size // 2)
        counts = F.conv1d(flat_valid, window, padding=size // 2)
        average = (sums / counts.clamp_min(1)).view(batch, channels, length)
        maximum = F.max_pool1d(torch.where(flat_valid > 0, flat_z, NEG_INF), size, stride=1,
                               padding=size // 2).view(batch, channels, length)
        features += [torch.where(valid, average, 0.0), torch.where(valid, maximum, 0.0)]
    features = torch.stack(features, dim=2)                                  # [B, Cp, F, T]

    profiles = torch.einsum("cpf,bcft->bcpt", cast(mapper.profile_weight), features)
    profiles = profiles.reshape(batch, channels * mapper.profiles, length)   # [B, Cp*P, T]

    def linear(layer, inputs):
        return torch.einsum("oi,bit->bot", cast(layer.weight), inputs) + cast(layer.bias)[:, None]

    aligned = linear(mapper.mix_linear, profiles)
    if mapper.mix_in is not None:
        aligned = aligned + linear(mapper.mix_out, F.gelu(linear(mapper.mix_in, profiles)))

    residual = torch.kron(layer_interp_matrix(mapper.proxy_shape[0], mapper.target_shape[0]),
                          head_resample_matrix(mapper.proxy_shape[1], mapper.target_shape[1]))
    base = torch.einsum("oc,bct->bot", cast(residual), torch.where(valid, x, 0.0))
    out = (base + std * aligned).masked_fill(~valid.all(dim=1, keepdim=True), NEG_INF)
    return out.view(batch, *mapper.target_shape, length)
