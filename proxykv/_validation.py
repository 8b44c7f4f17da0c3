"""Input checks shared by every public op. Each raises before any kernel runs, with a message that
names the argument, what it got and what it needs.

Type errors (not a tensor, wrong dtype) raise ``TypeError``; wrong shapes, values, devices raise
``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# Score tensors are float32; float64 is accepted at the public entry points and read as float32
# (``as_score_tensor``). Half precision is refused: ranking would lose ties and order.
SCORE_DTYPES = (torch.float32, torch.float64)
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")

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
    """All given (non-None) values are tensors on one device of a supported type (CPU or CUDA:
    a ``meta`` tensor has no values to read); returns that device."""
    present = [(n, t) for n, t in tensors.items() if t is not None]
    for name, tensor in present:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    first_name, first = present[0]
    if first.device.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"{first_name} must be on a CPU or CUDA device, got {first.device}")
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


def check_float(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    meaning: str = "",
) -> float:
    """A finite real number (not a bool) within the bounds; returns it as a float.

    ``meaning`` (e.g. ``"the fraction of positions kept"``) is quoted in the range message.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
    high_ok = maximum is None or value <= maximum
    if not (math.isfinite(value) and low_ok and high_ok):
        if minimum is not None and maximum is not None:
            bounds = f" in {'(' if exclusive_minimum else '['}{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            bounds = f" {'>' if exclusive_minimum else '>='} {minimum:g}"
        else:
            bounds = "" if maximum is None else f" <= {maximum:g}"
        why = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be a finite float{bounds}{why}, got {value!r}")
    return value


def check_has_positions(name: str, tensor: torch.Tensor) -> None:
    """The last (sequence) dimension is not empty."""
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one position (T >= 1), got shape "
                         f"{tuple(tensor.shape)}")


def as_score_tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None,
                    layout: str | None = None) -> torch.Tensor:
    """The checks of a score tensor at a public entry point (docs/bad-input.md), without reading
    its values: a float32 or float64 tensor (float64 is read as float32, one copy) of the given
    rank, on a CPU or CUDA device, with no empty dimension. Returns the float32 scores.

    ``layout`` (e.g. ``"[..., T]"``) names the dimensions in the messages.
    """
    scores = check_tensor(name, value, ndim=ndim, min_ndim=min_ndim, layout=layout,
                          dtypes=SCORE_DTYPES)
    check_same_device(**{name: scores})
    check_has_positions(name, scores)
    if layout and "..." not in layout:  # every dimension named: say which one is empty
        check_nonempty(name, scores, layout)
    if scores.numel() == 0:
        raise ValueError(f"{name} must have every dimension >= 1 {layout or ''}, got shape "
                         f"{tuple(scores.shape)}")
    return scores.float() if scores.dtype == torch.float64 else scores


def check_nonempty(name: str, tensor: torch.Tensor, layout: str) -> None:
    """Every dimension of ``tensor`` is >= 1; ``layout`` (e.g. ``"[B, H_q, D]"``) names them."""
    dims = [dim.strip() for dim in layout.strip("[]").split(",")]
    for dim, size in zip(dims, tensor.shape):
        if size < 1:
            raise ValueError(f"{name} must have {dim} >= 1, got shape {tuple(tensor.shape)} "
                             f"{layout}")


def check_int32_size(name: str, symbol: str, size: int, unit: str) -> None:
    """A count the kernels index with int32 (rows, positions) fits it: e.g. ``k_packed`` with
    ``N`` rows."""
    if size > INT32_MAX:
        raise ValueError(f"{name} has {symbol} = {size} {unit}, past the int32 limit {INT32_MAX} "
                         f"(the kernels index with int32)")


def check_scale(scale, head_dim: int) -> float:
    """The logit scale of an attention op: None (``head_dim ** -0.5``) or a finite real > 0."""
    if scale is None:
        return head_dim ** -0.5
    return check_float("scale", scale, minimum=0.0, exclusive_minimum=True,
                       meaning="the factor applied to q·k, default D ** -0.5")


SINK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_softcap(softcap) -> float | None:
    """Logit soft-capping of an attention op (Gemma 2): None (off) or a finite real > 0."""
    if softcap is None:
        return None
    return check_float("softcap", softcap, minimum=0.0, exclusive_minimum=True,
                       meaning="logits become softcap * tanh(scale * q·k / softcap)")


def check_window(window) -> int | None:
    """A sliding-window length of an attention op: None (off) or an int in [1, 2**31 - 1] (a query
    at position p sees keys at positions in (p - window, p])."""
    if window is None:
        return None
    return check_int("window", window, minimum=1, maximum=INT32_MAX)


def check_sinks(sinks, num_heads: int) -> torch.Tensor | None:
    """Learned attention sinks (gpt-oss): None or a float ``[H_q]`` tensor (any float dtype; its
    device is checked by the caller with the other tensors). Returns it as float32, contiguous.
    Values are not read (a device sync): ``-inf`` is a head without a sink."""
    if sinks is None:
        return None
    check_tensor("sinks", sinks, ndim=1, layout="[H_q]", dtypes=SINK_DTYPES)
    if sinks.shape[0] != num_heads:
        raise ValueError(f"sinks must have shape [H_q] = ({num_heads},) (one logit per query "
                         f"head), got {tuple(sinks.shape)}")
    return sinks.to(torch.float32).contiguous()


def first_position(mask: torch.Tensor) -> tuple[int, ...] | None:
    """The multi-index of the first True of ``mask`` in row-major order, or None (one sync)."""
    flat = mask.reshape(-1)
    if flat.numel() == 0:
        return None
    first = int(first_true_index(flat))
    if first < 0:
        return None
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(first), mask.shape))


def check_no_nan(name: str, tensor: torch.Tensor, *, allow_pos_inf: bool = True,
                 why: str = "") -> None:
    """No NaN (and, unless ``allow_pos_inf``, no ``+inf``) in ``tensor``; the message names the
    first bad position. One device sync."""
    bad = torch.isnan(tensor)
    if not allow_pos_inf:
        bad |= torch.isposinf(tensor)
    position = first_position(bad)
    if position is not None:
        value = tensor[position].item()
        allowed = "finite values or -inf" if not allow_pos_inf else "no NaN"
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must hold {allowed}{reason}; found {value} at position "
                         f"{list(position)} of shape {tuple(tensor.shape)}")


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


# ------------------------------------------------------------------ ragged segment metadata
# Helpers for packed per-segment layouts (``indices [N]`` with ``cu_seqlens [S + 1]``), shared by
# the ragged gather, ragged decode attention and ``Selection.validate``. The ``*_statistic(s)``
# helpers return 0-D int64 tensors without syncing; callers stack them and read them in one go.

def check_segment_bounds(name: str, cu_seqlens, *, num_segments: int, segments_what: str) -> None:
    """Shape and dtype of a segment-bounds tensor, int32/int64 ``[num_segments + 1]`` (its values
    are checked with ``bounds_statistics`` and ``raise_for_bounds``)."""
    check_tensor(name, cu_seqlens, ndim=1, layout=f"[{segments_what} + 1]", dtypes=INDEX_DTYPES)
    if cu_seqlens.numel() != num_segments + 1:
        raise ValueError(f"{name} must have {segments_what} + 1 = {num_segments + 1} entries, got "
                         f"{cu_seqlens.numel()}")


def to_int32_metadata(*, values_checked: bool,
                      **tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The int32 tensors the kernels read for int32/int64 index-like arguments (indices, segment
    bounds, lengths), in the order given; None stays None. int64 is converted: a copy of that
    tensor only.

    int64 values outside int32 raise ``ValueError``, naming the argument; they are never wrapped.
    With ``values_checked`` the caller's value checks, already done, bound every value by a count
    that ``check_int32_size`` accepted, so nothing more is read. Without (the caller turned its
    value checks off to avoid a device sync), int64 values are range-checked here anyway, all in
    one device sync; int32 metadata costs none.
    """
    wide = [(name, tensor) for name, tensor in tensors.items()
            if tensor is not None and tensor.dtype == torch.int64 and tensor.numel()]
    if wide and not values_checked:
        extremes = torch.stack([e for _, tensor in wide for e in (tensor.min(), tensor.max())])
        values = extremes.tolist()
        for (name, _), low, high in zip(wide, values[::2], values[1::2]):
            if low < INT32_MIN or high > INT32_MAX:
                raise ValueError(f"{name} holds values in [{low}, {high}], past the int32 range "
                                 f"the kernels read; int64 values are range-checked even with the "
                                 f"value checks off, never wrapped")
    return [tensor if tensor is None or tensor.dtype == torch.int32 else tensor.to(torch.int32)
            for tensor in tensors.values()]


def first_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True of a 1-D bool tensor, or -1, as a 0-D int64 tensor (no sync)."""
    if mask.numel() == 0:
        return torch.full((), -1, dtype=torch.int64, device=mask.device)
    positions = torch.arange(mask.numel(), device=mask.device)
    first = torch.where(mask, positions, mask.numel()).min()
    return torch.where(first == mask.numel(), -1, first)


def bounds_statistics(cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """0-D tensors ``[first, last, first decreasing step or -1]`` of a bounds tensor (no sync)."""
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    return [cu_seqlens[0].long(), cu_seqlens[-1].long(), first_true_index(steps < 0)]


def raise_for_bounds(name: str, values: Sequence[int], *, total: int, total_what: str) -> None:
    """Raise if ``bounds_statistics`` (read to the host) show bounds that are not monotone from 0
    to ``total``."""
    first, last, decreasing_at = values
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {first}")
    if decreasing_at >= 0:
        raise ValueError(f"{name} must be non-decreasing (segment lengths >= 0), but "
                         f"{name}[{decreasing_at + 1}] < {name}[{decreasing_at}]")
    if last != total:
        raise ValueError(f"{name} must end at {total_what} = {total}, got {name}[-1] = {last}")


def segment_values_statistics(indices: torch.Tensor,
                              cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """0-D tensors ``[min, max, p]`` of non-empty packed ``indices`` (no sync): ``p + 1`` is the
    first packed position whose value does not exceed its predecessor in the same segment (not
    strictly increasing), or ``p = -1``. Segments are ``cu_seqlens``; bad bounds are clamped."""
    total = indices.numel()
    # Entry j > 0 must exceed entry j - 1 unless it opens a segment.
    # (Room for one past the end: empty trailing segments start at N and must not mark N - 1.)
    opens_segment = torch.zeros(total + 1, dtype=torch.bool, device=indices.device)
    opens_segment[cu_seqlens[:-1].long().clamp(0, total)] = True
    not_increasing = (indices[1:] <= indices[:-1]) & ~opens_segment[1:total]
    return [indices.min().long(), indices.max().long(), first_true_index(not_increasing)]
