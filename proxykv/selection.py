"""``Selection``: which KV positions are kept, per (layer, batch, KV head) — the contract between
policies (which produce it) and the gather kernels / ragged cache (which consume it).

Two storage forms (DESIGN.md, "Contracts between stages"):

* **uniform** — every head keeps the same count ``k``: ``indices`` int32 ``[B, L, H_kv, k]``.
* **ragged** — per-head counts: packed ``indices`` int32 ``[N]`` and ``cu_seqlens`` int32
  ``[L * B * H_kv + 1]``; segment ``s = (l * B + b) * H_kv + h`` holds the kept positions of KV head
  ``h`` of batch ``b`` in layer ``l`` at ``indices[cu_seqlens[s]:cu_seqlens[s + 1]]``. So the
  segments of one layer are contiguous and ordered ``b * H_kv + h`` — exactly the layout
  ``gather_kv_ragged`` takes (see ``Selection.layer``).

In both forms the positions of a head are ascending and unique, in ``[0, seq_len)``, and keep their
original position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from proxykv._validation import (
    INDEX_DTYPES,
    INT32_MAX,
    bounds_statistics,
    check_float,
    check_int,
    check_same_device,
    check_tensor,
    raise_for_bounds,
    segment_values_statistics,
)


@dataclass(frozen=True)
class LayerSelection:
    """The kept positions of one layer: uniform ``indices [B, H_kv, k]`` (``cu_seqlens`` None) or
    ragged packed ``indices [N]`` with ``cu_seqlens [B * H_kv + 1]`` starting at 0."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor | None

    @property
    def is_ragged(self) -> bool:
        return self.cu_seqlens is not None


@dataclass(frozen=True)
class Selection:
    """Kept KV positions per (layer, batch, KV head); see the module docstring for the layout.

    Build one with ``uniform``, ``ragged`` or ``from_mask``, which check their input. The dataclass
    constructor stores its fields as given, unchecked (``validate`` checks them).

    Attributes:
        indices: int32, ``[B, L, H_kv, k]`` (uniform) or ``[N]`` (ragged).
        cu_seqlens: int32 ``[L * B * H_kv + 1]`` for ragged selections, else None.
        batch_size, num_layers, num_kv_heads, seq_len: the ``[B, L, H_kv, T]`` score shape it was
            made from.
        budget: the number of positions per head the caller asked for on average (for uniform
            selections, ``k``); adaptive policies record the mean count they ended up keeping.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor | None
    batch_size: int
    num_layers: int
    num_kv_heads: int
    seq_len: int
    budget: float

    # ----------------------------------------------------------------- constructors
    @classmethod
    def uniform(cls, indices: torch.Tensor, seq_len: int, budget: float | None = None) -> Selection:
        """From ``indices [B, L, H_kv, k]``, int32 or int64, sorted here along the last axis;
        ``B, L, H_kv >= 1`` (``k = 0``, nothing kept, is allowed). ``budget`` is recorded as given
        (default ``k``).

        Raises ``TypeError`` / ``ValueError`` (one device sync to check the values) unless every
        index lies in ``[0, seq_len)`` and no head repeats a position.
        """
        check_tensor("indices", indices, ndim=4, layout="[B, L, H_kv, k]", dtypes=INDEX_DTYPES)
        check_same_device(indices=indices)
        b, l, h, k = indices.shape
        if min(b, l, h) < 1:
            raise ValueError(f"indices must have B, L, H_kv >= 1, got shape {tuple(indices.shape)}")
        seq_len = check_int("seq_len", seq_len, minimum=1, maximum=INT32_MAX)
        ordered = indices.sort(dim=-1).values
        _check_positions(ordered, None, seq_len, names=("indices", None))
        recorded = float(k) if budget is None else _check_budget(budget)
        return cls(ordered.to(torch.int32), None, b, l, h, seq_len, recorded)

    @classmethod
    def ragged(cls, indices: torch.Tensor, cu_seqlens: torch.Tensor, *,
               shape: tuple[int, int, int, int], budget: float | None = None) -> Selection:
        """From packed ``indices [N]`` and ``cu_seqlens [L * B * H_kv + 1]`` (int32 or int64, laid
        out as the module docstring says) of scores of ``shape = (B, L, H_kv, T)``. ``budget``
        is recorded as given (default: the mean count kept, ``N / (B * L * H_kv)``).

        Raises ``TypeError`` / ``ValueError`` (one device sync to check the values) unless
        ``cu_seqlens`` rises from 0 to ``N`` and every segment's indices lie in ``[0, T)`` and
        increase strictly.
        """
        check_tensor("indices", indices, ndim=1, layout="[N]", dtypes=INDEX_DTYPES)
        check_tensor("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES)
        check_same_device(indices=indices, cu_seqlens=cu_seqlens)
        if not isinstance(shape, (tuple, list)) or len(shape) != 4:
            raise TypeError(f"shape must be a tuple (B, L, H_kv, T), got {shape!r}")
        b, l, h, t = (check_int(f"shape[{i}]", size, minimum=1, maximum=INT32_MAX)
                      for i, size in enumerate(shape))
        segments = l * b * h
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() != segments + 1:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [L * B * H_kv + 1] of "
                             f"{segments + 1} entries, got shape {tuple(cu_seqlens.shape)}")
        if indices.numel() > INT32_MAX:
            raise ValueError(f"indices must hold at most {INT32_MAX} positions, got "
                             f"{indices.numel()}")
        _check_positions(indices, cu_seqlens, t, names=("indices", "cu_seqlens"))
        recorded = indices.numel() / segments if budget is None else _check_budget(budget)
        return cls(indices.to(torch.int32), cu_seqlens.to(torch.int32), b, l, h, t, recorded)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, budget: float | None = None, *,
                  allow_uniform: bool = True) -> Selection:
        """From a bool keep-mask ``[B, L, H_kv, T]``, every dimension >= 1.

        Uniform when ``allow_uniform`` and every head keeps the same count, ragged otherwise.
        ``budget`` is recorded as given (None: the mean count kept). Linear in the mask size:
        ``nonzero`` walks the mask in order, so each head's positions come out ascending.
        """
        check_tensor("mask", mask, ndim=4, layout="[B, L, H_kv, T]", dtypes=(torch.bool,))
        check_same_device(mask=mask)
        if min(mask.shape) < 1:
            raise ValueError(f"mask must have B, L, H_kv, T >= 1, got shape {tuple(mask.shape)}")
        b, l, h, t = mask.shape
        counts = mask.sum(-1)  # [B, L, H]
        if budget is not None:
            recorded = _check_budget(budget)
        else:  # reading the mean syncs a GPU, so only when the caller gave no budget
            recorded = float(counts.double().mean())
        if allow_uniform:
            low, high = torch.stack([counts.min(), counts.max()]).tolist()
            if low == high:
                positions = (mask.reshape(-1).nonzero().squeeze(1) % t).to(torch.int32)
                return cls(positions.view(b, l, h, high), None, b, l, h, t, recorded)
        layer_major = mask.permute(1, 0, 2, 3).reshape(-1)  # segments ordered (l, b, h)
        positions = (layer_major.nonzero().squeeze(1) % t).to(torch.int32)
        cu_seqlens = torch.zeros(l * b * h + 1, dtype=torch.int32, device=mask.device)
        cu_seqlens[1:] = counts.permute(1, 0, 2).reshape(-1).cumsum(0)
        return cls(positions, cu_seqlens, b, l, h, t, recorded)

    # ----------------------------------------------------------------- views
    @property
    def is_ragged(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, L, H_kv, T)`` of the scores this selection was made from."""
        return (self.batch_size, self.num_layers, self.num_kv_heads, self.seq_len)

    def counts(self) -> torch.Tensor:
        """int64 ``[B, L, H_kv]``: how many positions each head keeps."""
        b, l, h, _ = self.shape
        if not self.is_ragged:
            return torch.full((b, l, h), self.indices.shape[-1], dtype=torch.int64,
                              device=self.indices.device)
        seg = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(torch.int64)
        return seg.reshape(l, b, h).permute(1, 0, 2).contiguous()

    @property
    def total_kept(self) -> int:
        return int(self.counts().sum())

    def to_mask(self) -> torch.Tensor:
        """bool ``[B, L, H_kv, T]``, True where a position is kept."""
        b, l, h, t = self.shape
        mask = torch.zeros(b, l, h, t, dtype=torch.bool, device=self.indices.device)
        if not self.is_ragged:
            return mask.scatter_(-1, self.indices.long(), True)
        seg_counts = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        segment_of_entry = torch.repeat_interleave(
            torch.arange(l * b * h, device=mask.device), seg_counts)
        layer_major = mask.new_zeros(l * b * h, t)
        layer_major[segment_of_entry, self.indices.long()] = True
        return layer_major.reshape(l, b, h, t).permute(1, 0, 2, 3).contiguous()

    def layer(self, layer_index: int) -> LayerSelection:
        """The kept positions of one layer, in the layout the gather kernels take."""
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer_index must be in [0, {self.num_layers}), got {layer_index}")
        if not self.is_ragged:
            return LayerSelection(self.indices[:, layer_index], None)
        per_layer = self.batch_size * self.num_kv_heads
        bounds = self.cu_seqlens[layer_index * per_layer: (layer_index + 1) * per_layer + 1]
        start, end = bounds[[0, -1]].tolist()  # one device sync
        return LayerSelection(self.indices[start:end], (bounds - bounds[0]).to(torch.int32))

    def to_ragged(self) -> Selection:
        """The same selection in ragged form (a uniform one becomes equal-length segments)."""
        if self.is_ragged:
            return self
        return Selection.from_mask(self.to_mask(), self.budget, allow_uniform=False)

    def validate(self) -> None:
        """Raise ``ValueError`` unless the layout invariants hold (shapes, dtypes, sorted, unique,
        in range, ``cu_seqlens`` monotone from 0 to N). Reads the tensors (syncs a GPU)."""
        b, l, h, t = self.shape
        if self.indices.dtype != torch.int32:
            raise ValueError(f"Selection.indices must be int32, got {self.indices.dtype}")
        if not self.is_ragged:
            if self.indices.dim() != 4 or tuple(self.indices.shape[:3]) != (b, l, h):
                raise ValueError(f"uniform Selection.indices must have shape [{b}, {l}, {h}, k], "
                                 f"got {tuple(self.indices.shape)}")
        else:
            cu = self.cu_seqlens
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() != l * b * h + 1:
                raise ValueError(f"Selection.cu_seqlens must be int32 [{l * b * h + 1}], got "
                                 f"{cu.dtype} {tuple(cu.shape)}")
            if self.indices.dim() != 1:
                raise ValueError(f"ragged Selection.indices must be 1-D [N], got shape "
                                 f"{tuple(self.indices.shape)}")
        _check_positions(self.indices, self.cu_seqlens, t,
                         names=("Selection.indices", "Selection.cu_seqlens"))


def _check_budget(budget) -> float:
    return check_float("budget", budget, minimum=0.0, meaning="positions kept per head")


def _check_positions(indices: torch.Tensor, cu_seqlens: torch.Tensor | None, seq_len: int, *,
                     names: tuple[str, str | None]) -> None:
    """Raise ``ValueError`` unless every index lies in ``[0, seq_len)`` and the indices increase
    strictly within each head: along the last dimension (uniform, ``cu_seqlens`` None) or within
    each segment of ``cu_seqlens``, which must rise from 0 to N (ragged). One device sync."""
    indices_name, cu_name = names
    statistics = []
    if cu_seqlens is not None:
        statistics += bounds_statistics(cu_seqlens)
        if indices.numel():
            statistics += segment_values_statistics(indices, cu_seqlens)
    elif indices.numel():
        rows = indices.reshape(-1, indices.shape[-1])
        unsorted = (rows[:, 1:] <= rows[:, :-1]).any().long()
        statistics += [indices.min().long(), indices.max().long(), unsorted - 1]
    if not statistics:
        return
    values = torch.stack(statistics).tolist()  # the one device sync
    if cu_seqlens is not None:
        total = indices.numel()
        try:
            raise_for_bounds(cu_name, values[:3], total=total, total_what="N")
        except ValueError as error:
            raise ValueError(f"{cu_name} must rise monotonically from 0 to N={total}: "
                             f"{error}") from None
        values = values[3:]
    if not values:
        return
    low, high, unsorted_at = values
    if low < 0 or high >= seq_len:
        raise ValueError(f"{indices_name} must lie in [0, {seq_len}), got values in "
                         f"[{low}, {high}]")
    if unsorted_at >= 0:
        raise ValueError(f"{indices_name} must be strictly increasing within each head "
                         "(ascending, no repeats)")
