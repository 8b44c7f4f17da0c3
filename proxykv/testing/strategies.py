"""Hypothesis strategies shared by every op's tests: shapes, GQA ratios, dtypes and cache layouts.

Layouts matter because a KV cache is rarely a fresh contiguous tensor: it is a slice of a larger
pre-allocated cache, or ``[B, T, H, D]`` storage (FlashAttention's layout) seen as
``[B, H, T, D]``. Kernels must read every one of them without a copy.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

LAYOUTS = ("contiguous", "cache_slice", "bthd", "head_slice")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtypes(include_bf16: bool = True) -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(FLOAT_DTYPES if include_bf16 else FLOAT_DTYPES[:2])


def lengths(min_value: int = 1, max_value: int = 300) -> st.SearchStrategy[int]:
    """Sequence lengths biased towards the edge cases: 1, block-size neighbours, odd primes."""
    edges = [v for v in (1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 257)
             if min_value <= v <= max_value]
    return st.one_of(st.sampled_from(edges), st.integers(min_value, max_value)) if edges \
        else st.integers(min_value, max_value)


def gqa_heads(ratios=(1, 2, 4, 7), max_kv_heads: int = 3) -> st.SearchStrategy[tuple[int, int]]:
    """``(H_q, H_kv)`` with ``H_q = ratio * H_kv``."""
    return st.tuples(st.sampled_from(ratios), st.integers(1, max_kv_heads)).map(
        lambda rk: (rk[0] * rk[1], rk[1]))


def layouts() -> st.SearchStrategy[str]:
    return st.sampled_from(LAYOUTS)


def make_bhtd(shape: tuple[int, int, int, int], dtype: torch.dtype, layout: str,
              generator: torch.Generator, device: torch.device | str = "cpu",
              scale: float = 1.0) -> torch.Tensor:
    """A ``[B, H, T, D]`` tensor of standard-normal values (times ``scale``) stored in ``layout``:

    - ``contiguous``: a fresh contiguous tensor;
    - ``cache_slice``: the first ``T`` positions of a cache allocated for ``T + 5`` positions;
    - ``bthd``: ``[B, T, H, D]`` storage permuted to ``[B, H, T, D]``;
    - ``head_slice``: every other head of a tensor with ``2H`` heads, sliced to ``D`` of ``D + 3``.
    """
    b, h, t, d = shape
    if layout == "contiguous":
        storage = torch.randn(b, h, t, d, generator=generator)
        view = storage
    elif layout == "cache_slice":
        storage = torch.randn(b, h, t + 5, d, generator=generator)
        view = storage[:, :, :t]
    elif layout == "bthd":
        storage = torch.randn(b, t, h, d, generator=generator)
        view = storage.permute(0, 2, 1, 3)
    elif layout == "head_slice":
        storage = torch.randn(b, 2 * h, t, d + 3, generator=generator)
        view = storage[:, ::2, :, :d]
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    # Scale and cast the whole storage, then take the same view of it, so strides survive.
    storage = (storage * scale).to(dtype=dtype, device=device)
    return storage.as_strided(view.shape, view.stride(), view.storage_offset())


@st.composite
def score_tensors(draw, shape: tuple[int, ...], neg_inf_fraction: float = 0.2,
                  ties: bool = True) -> torch.Tensor:
    """float32 scores of ``shape`` with some ``-inf`` entries and (optionally) many exact ties."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=generator)
    if ties and draw(st.booleans()):
        scores = (scores * 2).round() / 2
    if neg_inf_fraction > 0 and draw(st.booleans()):
        invalid = torch.rand(shape, generator=generator) < neg_inf_fraction
        scores = scores.masked_fill(invalid, float("-inf"))
    return scores


@st.composite
def strided_views(draw, tensor: torch.Tensor) -> torch.Tensor:
    """The same values as ``tensor`` seen through a non-contiguous layout (or the tensor itself).

    Options: a slice of a larger buffer along the last axis, a transposed storage, or a view with
    a step along the first axis.
    """
    kind = draw(st.sampled_from(("same", "padded_last", "transposed", "stepped")))
    if kind == "same" or tensor.dim() == 0:
        return tensor
    if kind == "padded_last":
        bigger = torch.full((*tensor.shape[:-1], tensor.shape[-1] + 3), 7.0, dtype=tensor.dtype)
        bigger[..., : tensor.shape[-1]] = tensor
        return bigger[..., : tensor.shape[-1]]
    if kind == "transposed" and tensor.dim() >= 2:
        return tensor.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "stepped":
        bigger = torch.full((tensor.shape[0] * 2, *tensor.shape[1:]), 7.0, dtype=tensor.dtype)
        bigger[::2] = tensor
        return bigger[::2]
    return tensor
