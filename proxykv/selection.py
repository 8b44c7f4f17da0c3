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
    bounds_statistics,
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
        """From ``indices [B, L, H_kv, k]`` (any int dtype; sorted here along the last axis)."""
        if indices.dim() != 4:
            raise ValueError(f"indices must be a 4-D tensor [B, L, H_kv, k], got shape "
                             f"{tuple(indices.shape)}")
        b, l, h, k = indices.shape
        ordered = indices.sort(dim=-1).values.to(torch.int32)
        return cls(ordered, None, b, l, h, seq_len, float(k if budget is None else budget))

    @classmethod
    def from_mask(cls, mask: torch.Tensor, budget: float | None = None, *,
                  allow_uniform: bool = True) -> Selection:
        """From a bool keep-mask ``[B, L, H_kv, T]``.

        Uniform when ``allow_uniform`` and every head keeps the same count, ragged otherwise.
        ``budget`` is recorded as given (None: the mean count kept). Linear in the mask size:
        ``nonzero`` walks the mask in order, so each head's positions come out ascending.
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool 4-D tensor [B, L, H_kv, T], got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} of shape "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        b, l, h, t = mask.shape
        counts = mask.sum(-1)  # [B, L, H]
        if budget is not None:
            recorded = float(budget)
        else:  # reading the mean syncs a GPU, so only when the caller gave no budget
            recorded = float(counts.double().mean()) if counts.numel() else 0.0
        if allow_uniform and counts.numel():
            low, high = torch.stack([counts.min(), counts.max()]).tolist()
            if low == high:
                positions = (mask.reshape(-1).nonzero().squeeze(1) % max(t, 1)).to(torch.int32)
                return cls(positions.view(b, l, h, high), None, b, l, h, t, recorded)
        layer_major = mask.permute(1, 0, 2, 3).reshape(-1)  # segments ordered (l, b, h)
        positions = (layer_major.nonzero().squeeze(1) % max(t, 1)).to(torch.int32)
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
        stats = []
        if not self.is_ragged:
            if self.indices.dim() != 4 or tuple(self.indices.shape[:3]) != (b, l, h):
                raise ValueError(f"uniform Selection.indices must have shape [{b}, {l}, {h}, k], "
                                 f"got {tuple(self.indices.shape)}")
            if self.indices.numel() == 0:
                return
            rows = self.indices.reshape(b * l * h, self.indices.shape[-1])
            unsorted = (rows[:, 1:] <= rows[:, :-1]).any().long()
            stats += [self.indices.min().long(), self.indices.max().long(), unsorted - 1]
        else:
            cu, total = self.cu_seqlens, self.indices.numel()
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() != l * b * h + 1:
                raise ValueError(f"Selection.cu_seqlens must be int32 [{l * b * h + 1}], got "
                                 f"{cu.dtype} {tuple(cu.shape)}")
            if self.indices.dim() != 1:
                raise ValueError(f"ragged Selection.indices must be 1-D [N], got shape "
                                 f"{tuple(self.indices.shape)}")
            stats += bounds_statistics(cu)
            if total:
                stats += segment_values_statistics(self.indices, cu)
        values = torch.stack(stats).tolist()  # the one device sync
        if self.is_ragged:
            try:
                raise_for_bounds("Selection.cu_seqlens", values[:3], total=self.indices.numel(),
                                 total_what="N")
            except ValueError as error:
                raise ValueError("Selection.cu_seqlens must rise monotonically from 0 to "
                                 f"N={self.indices.numel()}: {error}") from None
            values = values[3:]
        if not values:
            return
        low, high, unsorted_at = values
        if low < 0 or high >= t:
            raise ValueError(f"Selection.indices must lie in [0, {t}), got values in "
                             f"[{low}, {high}]")
        if unsorted_at >= 0:
            raise ValueError("Selection.indices must be strictly increasing within each head")
