"""CPU implementation of ``pool_scores``.

Max uses torch's max pooling (it pads with -inf, so the window is truncated at both ends). The
average over *valid* entries has no torch op; it is one vectorised pass per window offset —
O(numel) memory, O(k · numel) time, faster on CPU than two ``avg_pool1d`` calls for SnapKV's
small windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_scores_torch(scores: torch.Tensor, kernel_size: int, mode: str) -> torch.Tensor:
    length = scores.shape[-1]
    half = kernel_size // 2
    valid = scores != float("-inf")
    if mode == "max":
        pooled = F.max_pool1d(scores.reshape(-1, 1, length), kernel_size, stride=1,
                              padding=half).reshape(scores.shape)
    else:
        padded = F.pad(torch.where(valid, scores, 0.0), (half, half), value=0.0)
        padded_valid = F.pad(valid.float(), (half, half), value=0.0)
        pooled = padded[..., :length].clone()
        count = padded_valid[..., :length].clone()
        for offset in range(1, kernel_size):
            pooled += padded[..., offset:offset + length]
            count += padded_valid[..., offset:offset + length]
        pooled /= count.clamp_min_(1.0)
    return pooled.masked_fill_(~valid, float("-inf")).contiguous()
