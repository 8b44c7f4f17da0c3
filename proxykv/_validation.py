"""Input checks shared by every public op. Each raises before any kernel runs, with a message that
names the argument, what it got and what it needs.

Type errors (not a tensor, wrong dtype) raise ``TypeError``; wrong shapes, values, devices raise
``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _names(options: Sequence) -> str:
    quoted = [repr(o) if isinstance(o, str) else str(o) for o in options]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    layout: str | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of the given rank and dtype; returns it.

    ``layout`` (e.g. ``"[B, H_kv, T, D]"``) is quoted in the rank message.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    layout_text = f" {layout}" if layout else ""
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D tensor{layout_text}, got shape {tuple(value.shape)}"
        )
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s){layout_text}, "
            f"got shape {tuple(value.shape)}"
        )
    if dtypes is not None and value.dtype not in dtypes:
        wanted = _names([dtype_name(d) for d in dtypes]).replace("'", "")
        raise TypeError(f"{name} must be {wanted}, got {value.dtype}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given (non-None) tensors share one device; returns it."""
    present = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = present[0]
    for other_name, other in present[1:]:
        if other.device != first.device:
            raise ValueError(
                f"{first_name} and {other_name} must be on the same device, "
                f"got {first.device} and {other.device}"
            )
    return first.device


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    items = list(tensors.items())
    first_name, first = items[0]
    for other_name, other in items[1:]:
        if other.dtype != first.dtype:
            raise TypeError(
                f"{first_name} and {other_name} must have the same dtype, "
                f"got {first.dtype} and {other.dtype}"
            )
    return first.dtype


def check_dim(name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """``tensor.shape[dim] == expected``; ``what`` names the quantity (e.g. ``"batch size B"``)."""
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name} has {what} {tensor.shape[dim]} in dimension {dim}, expected {expected} "
            f"(shape {tuple(tensor.shape)})"
        )


def check_gqa(h_q: int, h_kv: int) -> int:
    """Query heads split evenly over KV heads; returns the group size ``H_q // H_kv``."""
    if h_kv < 1 or h_q % h_kv != 0:
        raise ValueError(
            f"the number of query heads H_q={h_q} must be a multiple of the number of KV heads "
            f"H_kv={h_kv}"
        )
    return h_q // h_kv


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {_names(list(choices))}, got {value!r}")


def check_int(
    name: str,
    value,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    odd: bool = False,
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd (the window is centred), got {value}")
    return value


def check_indices(
    name: str,
    indices: torch.Tensor,
    *,
    upper: int,
    sorted_last_dim: bool = False,
) -> None:
    """Index tensor of int32/int64 with every value in ``[0, upper)``.

    With ``sorted_last_dim`` the values must also be strictly increasing along the last dimension
    (ascending and unique, the Selection contract). This reads the tensor, so it synchronises a CUDA
    device once.
    """
    check_tensor(name, indices, dtypes=INDEX_DTYPES)
    if indices.numel() == 0:
        return
    statistics = [indices.min(), indices.max()]
    if sorted_last_dim and indices.shape[-1] > 1:
        statistics.append((indices[..., 1:] <= indices[..., :-1]).any().to(indices.dtype))
    low, high, *unsorted = torch.stack(statistics).tolist()  # one device sync
    if low < 0 or high >= upper:
        raise ValueError(
            f"{name} must lie in [0, {upper}), got values in [{low}, {high}]"
        )
    if unsorted and unsorted[0]:
        raise ValueError(f"{name} must be strictly increasing along its last dimension "
                         "(sorted, no repeats)")
