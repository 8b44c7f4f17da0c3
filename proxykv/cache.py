"""``RaggedKVCache``: a KV cache compacted per head (each KV head keeps its own number of
positions), that decode steps can append to and attend over.

Layout of one layer (``S = B * H_kv`` segments, segment ``s = b * H_kv + h``)::

    keys, values   [C, D]   segment s occupies rows cu_seqlens[s] ... cu_seqlens[s + 1] - 1;
                            its first seq_lens[s] rows are valid, the rest is spare room
    positions      [C]      int32 original position id of every valid row (prefill positions,
                            then the positions of appended tokens)
    cu_seqlens     [S + 1]  int32 segment bounds (room included), from 0 to C
    seq_lens       [S]      int32 valid rows per segment

This is exactly what ``ragged_attention(q, keys, values, cu_seqlens, seq_lens=seq_lens)`` reads,
so a decode step or a question needs no repacking: ``append`` writes each head's new rows at
``cu_seqlens[s] + seq_lens[s]`` and bumps ``seq_lens`` — O(B · H_kv · t · D) work, no sync, no copy
of the cache. ``crop(n)`` takes the last ``n`` appended rows back (a metadata update, no copy), so a
context compressed once can answer several questions: append a question and its answer, then crop
back to the compressed context.

Growth. Every decode step adds one row to *every* segment, so all segments get the same spare
room, ``spare`` rows. When a step does not fit, the layer is repacked into new storage with
``spare = max(rows needed, 2 × previous spare, ceil(growth × mean segment length))``. The number of
repacks is therefore logarithmic in the number of steps, and once the spare is ``growth`` of the
cache each repack buys ``growth × size`` appended rows for a copy of ``size`` rows: amortised
``1 / growth`` row copies per appended row. Pass ``reserve_steps = max_new_tokens`` to never
repack.

Limits. The kernels index rows with int32, so a layer holds at most ``2**31 - 1`` rows (and
position ids stay below ``2**31``). ``reserve_steps`` and ``growth`` are checked against that
when the cache is built; later, a repack's spare is limited to what keeps the layer within it, and
an ``append`` that cannot fit raises ``ValueError`` before writing anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from proxykv._validation import INT32_MAX, check_float, check_int, check_nonempty, check_tensor
from proxykv.kernels.attend.api import ragged_attention, ragged_decode_attention
from proxykv.kernels.gather.api import gather_kv_ragged
from proxykv.selection import Selection

COPY_CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class RaggedLayer:
    """One layer of a ``RaggedKVCache`` in the layout ``ragged_decode_attention`` takes (see the
    module docstring): views of the cache's storage and a snapshot of ``max_seq_len``. Take a
    fresh one after every ``append`` (which bumps ``seq_lens`` in place and may repack)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int


class _LayerStorage:
    """Mutable state of one layer: its device tensors and host-side bookkeeping.

    Every append adds the same number of rows to every segment, so the host keeps the lengths as
    of the last (re)pack plus one count of rows appended since: O(1) per append for any B·H_kv.
    """

    def __init__(self, keys, values, positions, cu_seqlens, seq_lens, packed_lengths: list[int],
                 spare: int, next_position: int):
        self.keys, self.values, self.positions = keys, values, positions
        self.cu_seqlens, self.seq_lens = cu_seqlens, seq_lens
        self.packed_lengths = packed_lengths  # valid rows per segment at the last (re)pack
        self.longest_packed = max(packed_lengths, default=0)
        self.appended = 0                     # rows appended to every segment since then
        self.reserved = spare                 # spare given at the last (re)pack
        self.next_position = next_position
        self.shortest_packed = min(packed_lengths, default=0)
        self.croppable = 0                    # rows appended to every segment since construction

    @property
    def spare(self) -> int:
        """Free rows left in every segment."""
        return self.reserved - self.appended

    @property
    def lengths(self) -> list[int]:
        return [length + self.appended for length in self.packed_lengths]

    @property
    def max_length(self) -> int:
        return self.longest_packed + self.appended if self.packed_lengths else 0

    @property
    def min_length(self) -> int:
        return self.shortest_packed + self.appended if self.packed_lengths else 0

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values, self.positions, self.cu_seqlens, self.seq_lens]


def _room_bounds(lengths: list[int], spare: int,
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """int32 bounds ``[S + 1]`` of segments holding ``lengths`` rows plus ``spare`` each, and the
    total row count (computed on the host: no sync)."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length + spare)
    return torch.tensor(bounds, dtype=torch.int32, device=device), bounds[-1]


def _grown_spare(lengths: list[int], steps: int, reserved: int, growth: float) -> int:
    """Spare rows per segment for a repack that must make room for ``steps`` more: the growth
    policy of the module docstring, limited so the layer stays within int32 rows (the caller has
    checked that ``steps`` fit)."""
    segments, kept = len(lengths), sum(lengths)
    wanted = max(steps, 2 * reserved, math.ceil(growth * kept / segments))
    return min(wanted, (INT32_MAX - kept) // segments)


def _packed_to_room_rows(lengths: list[int], room_bounds: torch.Tensor) -> torch.Tensor:
    """int64 ``[sum(lengths)]``: the row in the room layout of each packed (valid) entry."""
    device = room_bounds.device
    counts = torch.tensor(lengths, dtype=torch.int64, device=device)
    total = sum(lengths)
    segments = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts,
                                       output_size=total)
    packed_starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total, device=device) - packed_starts[segments] + room_bounds[segments]


def _copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor,
               src_rows: torch.Tensor) -> None:
    """``dst[dst_rows] = src[src_rows]`` through bounded temporaries."""
    for start in range(0, dst_rows.numel(), COPY_CHUNK_ROWS):
        stop = start + COPY_CHUNK_ROWS
        dst[dst_rows[start:stop]] = src[src_rows[start:stop]]


class RaggedKVCache:
    """Per-head compacted KV cache of a whole model; see the module docstring for the layout.

    Build it with ``from_selection``; then per decode step and layer, ``append`` the new token's
    K/V and ``attend`` with its query.

    Attributes:
        num_layers, batch_size, num_kv_heads, head_dim, dtype, device: the cache's geometry.
        num_repacks: how many times a layer's storage was reallocated to grow (all layers).
    """

    def __init__(self, layers: list[_LayerStorage], batch_size: int, num_kv_heads: int,
                 growth: float):
        self._layers = layers
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.growth = growth
        self.num_repacks = 0
        first = layers[0].keys
        self.head_dim, self.dtype, self.device = first.shape[1], first.dtype, first.device

    # --------------------------------------------------------------------------- construction
    @classmethod
    def from_selection(
        cls,
        past_key_values: Sequence[tuple[torch.Tensor, torch.Tensor]],
        selection: Selection,
        *,
        reserve_steps: int = 256,
        growth: float = 0.125,
        check_indices: bool = True,
        impl: str | None = None,
    ) -> RaggedKVCache:
        """Compact a full cache: keep, per layer and KV head, the positions ``selection`` lists.

        Args:
            past_key_values: one ``(keys, values)`` pair per layer, each ``[B, H_kv, T, D]``
                (any strides; e.g. ``[(layer.keys, layer.values) for layer in
                dynamic_cache.layers]`` for a transformers ``DynamicCache``), all of one dtype and
                device. Not modified; free it afterwards to reclaim the memory.
            selection: uniform or ragged ``Selection`` of shape ``(B, L, H_kv, T)`` matching the
                cache. Its indices are moved to the cache's device if needed.
            reserve_steps: spare rows per segment allocated up front (decode steps before the
                first repack): an int >= 0 small enough that every layer's rows (kept rows plus
                ``B * H_kv * reserve_steps``) fit int32.
            growth: on a repack the spare becomes at least ``growth`` × the mean segment length:
                a finite float > 0, small enough that the first repack would fit int32 rows.
            check_indices: validate the selection's values (one device sync per layer); see
                ``gather_kv_ragged``.
            impl: backend of the gather (see ``proxykv.backend_info``).

        Raises:
            TypeError: ``selection`` not a ``Selection``, a pair that is not a pair, a non-tensor,
                ``reserve_steps`` not an int or ``growth`` not a real number.
            ValueError: shapes that do not match the selection or each other, an empty head dim,
                a mix of dtypes or devices, ``reserve_steps`` or ``growth`` out of range (including
                past the int32 row limit), bad selection values (when checked).
        """
        if not isinstance(selection, Selection):
            raise TypeError(f"selection must be a proxykv.Selection, got "
                            f"{type(selection).__name__}")
        b, _, h_kv, seq_len = selection.shape
        check_int("reserve_steps", reserve_steps, minimum=0)
        growth = check_float("growth", growth, minimum=0.0, exclusive_minimum=True,
                             meaning="the spare a repack adds per segment, as a fraction of the "
                                     "mean segment length")
        pairs = cls._check_past_key_values(past_key_values, selection)
        device = pairs[0][0].device
        counts = selection.counts().cpu()  # [B, L, H_kv]: the one host read of the lengths
        cls._check_sizes(counts.sum((0, 2)).tolist(), b * h_kv, reserve_steps, growth)
        layers = []
        for layer_index, (k, v) in enumerate(pairs):
            lengths = counts[:, layer_index].reshape(-1).tolist()
            view = selection.layer(layer_index)
            indices = view.indices.reshape(-1).to(device)
            cu_seqlens = _room_bounds(lengths, 0, device)[0]  # packed bounds, either form
            room, rows = _room_bounds(lengths, reserve_steps, device)
            keys = torch.empty(rows, k.shape[-1], dtype=k.dtype, device=device)
            values = torch.empty(rows, v.shape[-1], dtype=v.dtype, device=device)
            gather_kv_ragged(k, v, indices, cu_seqlens, out=(keys, values), out_cu_seqlens=room,
                             check_indices=check_indices, impl=impl)
            positions = torch.empty(rows, dtype=torch.int32, device=device)
            positions[_packed_to_room_rows(lengths, room)] = indices
            layers.append(_LayerStorage(
                keys, values, positions, room,
                torch.tensor(lengths, dtype=torch.int32, device=device), lengths,
                spare=reserve_steps, next_position=seq_len))
        return cls(layers, b, h_kv, growth)

    @staticmethod
    def _check_sizes(kept_per_layer: list[int], segments: int, reserve_steps: int,
                     growth: float) -> None:
        """The storage ``reserve_steps`` and ``growth`` ask for fits int32 rows in every layer."""
        layer = max(range(len(kept_per_layer)), key=kept_per_layer.__getitem__)
        kept = kept_per_layer[layer]
        if kept > INT32_MAX:
            raise ValueError(f"selection keeps {kept} rows in layer {layer}, past the int32 limit "
                             f"{INT32_MAX} on a layer's rows")
        most_spare = (INT32_MAX - kept) // segments
        if reserve_steps > most_spare:
            raise ValueError(f"reserve_steps must be <= {most_spare} so that every layer's rows "
                             f"fit int32 (<= {INT32_MAX}; layer {layer} holds {kept} kept rows in "
                             f"{segments} segments), got {reserve_steps}")
        # Every repack hands out at least this spare; one past the limit is a mistaken growth, not
        # a request for 2**31 rows.
        if growth * kept / segments > most_spare:
            raise ValueError(f"growth = {growth!r} is too large: layer {layer}'s first repack "
                             f"would give each of its {segments} segments ceil(growth × mean "
                             f"segment length {kept / segments:g}) spare rows on top of {kept} "
                             f"kept rows, past the int32 row limit {INT32_MAX}")

    @staticmethod
    def _check_past_key_values(past_key_values, selection: Selection):
        b, num_layers, h_kv, seq_len = selection.shape
        if not isinstance(past_key_values, Sequence) or len(past_key_values) != num_layers:
            got = len(past_key_values) if isinstance(past_key_values, Sequence) else \
                type(past_key_values).__name__
            raise ValueError(f"past_key_values must be a sequence of {num_layers} (keys, values) "
                             f"pairs (one per layer of the selection), got {got}")
        pairs, first = [], None
        for layer_index, pair in enumerate(past_key_values):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"past_key_values[{layer_index}] must be a (keys, values) pair, "
                                f"got {type(pair).__name__}")
            for name, tensor in zip(("keys", "values"), pair):
                label = f"past_key_values[{layer_index}] {name}"
                check_tensor(label, tensor, ndim=4, layout="[B, H_kv, T, D]")
                if tuple(tensor.shape[:3]) != (b, h_kv, seq_len):
                    raise ValueError(f"{label} must have shape [B, H_kv, T, D] = [{b}, {h_kv}, "
                                     f"{seq_len}, D] (from the selection), got "
                                     f"{tuple(tensor.shape)}")
                check_nonempty(label, tensor, "[B, H_kv, T, D]")
                first = tensor if first is None else first  # layer 0's keys, checked above
                if tensor.dtype != first.dtype or tensor.device != first.device:
                    raise ValueError(f"{label} is {tensor.dtype} on {tensor.device}; every layer "
                                     f"must match layer 0 ({first.dtype} on {first.device})")
            pairs.append(tuple(pair))
        return pairs

    # --------------------------------------------------------------------------- views
    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        kept = sum(sum(state.lengths) for state in self._layers)
        return (f"RaggedKVCache(layers={self.num_layers}, B={self.batch_size}, "
                f"H_kv={self.num_kv_heads}, D={self.head_dim}, {self.dtype}, {self.device}, "
                f"rows kept={kept}, nbytes={self.nbytes})")

    def layer(self, layer_index: int) -> RaggedLayer:
        """The decode view of one layer (see ``RaggedLayer``)."""
        state = self._layer(layer_index)
        return RaggedLayer(state.keys, state.values, state.positions, state.cu_seqlens,
                           state.seq_lens, state.max_length)

    def lengths(self, layer_index: int) -> torch.Tensor:
        """int64 ``[B, H_kv]`` (CPU): valid rows per head, read from the host copy (no sync)."""
        return torch.tensor(self._layer(layer_index).lengths).reshape(self.batch_size,
                                                                      self.num_kv_heads)

    def next_position(self, layer_index: int) -> int:
        """The position id the next appended token of this layer gets (``T`` + appended steps)."""
        return self._layer(layer_index).next_position

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the cache holds: K, V, positions and metadata of every layer,
        spare room included (each distinct storage counted once, at its allocated size)."""
        seen, total = set(), 0
        for state in self._layers:
            for tensor in state.tensors():
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def to_packed(self, layer_index: int):
        """``(keys [N, D], values [N, D], cu_seqlens [S + 1], positions [N])`` of one layer with
        the spare room squeezed out (new tensors; the ``gather_kv_ragged`` output layout)."""
        state = self._layer(layer_index)
        lengths = state.lengths
        rows = _packed_to_room_rows(lengths, state.cu_seqlens.long())
        cu_seqlens = _room_bounds(lengths, 0, self.device)[0]
        return state.keys[rows], state.values[rows], cu_seqlens, state.positions[rows]

    # --------------------------------------------------------------------------- decode
    def append(self, layer_index: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add new tokens' keys/values to every head of one layer.

        ``k_new``, ``v_new``: ``[B, H_kv, D]`` (one token) or ``[B, H_kv, t, D]`` (``t >= 1``
        tokens), the cache's B, H_kv, D, dtype and device, any strides. Their positions are
        recorded as ``next_position(layer_index)`` onwards. Grows the layer (a repack) only when
        the spare room is used up.

        Raises ``TypeError`` for a non-tensor or another dtype, ``ValueError`` for another shape,
        device, ``t = 0``, or an append that would take the layer's rows or position ids past
        int32 (nothing is written then).
        """
        state = self._layer(layer_index)
        k_new = self._check_new("k_new", k_new)
        v_new = self._check_new("v_new", v_new)
        if v_new.shape != k_new.shape:
            raise ValueError(f"v_new must have the shape of k_new {tuple(k_new.shape)}, got "
                             f"{tuple(v_new.shape)}")
        steps = k_new.shape[2]
        last_position = state.next_position + steps - 1
        if last_position > INT32_MAX:
            raise ValueError(f"k_new: appending {steps} tokens would give position ids up to "
                             f"{last_position}, past the int32 limit {INT32_MAX} (positions are "
                             f"stored as int32)")
        if state.spare < steps:
            needed = sum(state.lengths) + steps * len(state.packed_lengths)
            if needed > INT32_MAX:
                raise ValueError(f"k_new: appending {steps} tokens would make layer {layer_index} "
                                 f"hold {needed} rows, past the int32 limit {INT32_MAX}")
            self._repack(state, steps)
        num_segments = self.batch_size * self.num_kv_heads
        offsets = torch.arange(steps, device=self.device)
        rows = ((state.cu_seqlens[:-1] + state.seq_lens).long()[:, None] + offsets).reshape(-1)
        state.keys[rows] = k_new.reshape(num_segments * steps, self.head_dim)
        state.values[rows] = v_new.reshape(num_segments * steps, self.head_dim)
        state.positions[rows] = (state.next_position + offsets).to(torch.int32).repeat(
            num_segments)
        state.seq_lens += steps
        state.appended += steps
        state.croppable += steps
        state.next_position += steps

    def crop(self, n: int, layer_index: int | None = None) -> None:
        """Remove the last ``n`` appended rows of every segment (of one layer, or of every layer
        when ``layer_index`` is None): a metadata update, no copy and no device sync. Positions
        are handed out again from ``next_position - n``, and the rows' storage becomes spare room
        again, so ``append(n rows) → attend → crop(n)`` leaves the cache as it was (what it holds
        and where; a repack in between moves the rows but keeps them).

        Only appended rows can be cropped: ``n`` is at most what ``append`` added since the cache
        was built (``ValueError`` otherwise, nothing changed)."""
        check_int("n", n, minimum=0)
        layers = range(self.num_layers) if layer_index is None else [layer_index]
        states = [self._layer(index) for index in layers]
        for index, state in zip(layers, states):
            if n > state.croppable:
                raise ValueError(f"n = {n} exceeds the {state.croppable} rows appended to every "
                                 f"segment of layer {index} since the cache was built (only "
                                 "appended rows can be cropped)")
        for state in states:
            if n == 0:
                continue
            from_current = min(n, state.appended)
            before_repack = n - from_current  # rows appended before the last repack
            state.appended -= from_current
            if before_repack:
                state.packed_lengths = [length - before_repack for length in state.packed_lengths]
                state.longest_packed -= before_repack
                state.shortest_packed -= before_repack
                state.reserved += before_repack
            state.seq_lens -= n
            state.croppable -= n
            state.next_position -= n

    def attend(self, layer_index: int, q: torch.Tensor, *, scale: float | None = None,
               return_lse: bool = False, softcap: float | None = None,
               sinks: torch.Tensor | None = None, window: int | None = None,
               impl: str | None = None):
        """Attention of new tokens over one layer, whose own K/V the caller has appended.

        ``q [B, H_q, D]`` (one token: ``ragged_decode_attention``, every valid row visible) →
        ``[B, H_q, D]``; ``q [B, H_q, T_new, D]`` (a chunk, e.g. a question:
        ``ragged_attention``, the last ``T_new`` rows of every segment being the chunk's own,
        seen causally) → ``[B, H_q, T_new, D]``; with ``return_lse`` also the natural-log LSE
        (``[B, H_q]`` or ``[B, H_q, T_new]`` float32).

        ``q`` must have the cache's B and D, and ``H_q`` a positive multiple of its H_kv
        (``ValueError`` naming ``q`` otherwise), and its dtype and device (checked by the op);
        a chunk needs at least ``T_new`` rows in every segment. ``scale`` is None
        (``D ** -0.5``) or a finite real > 0. The metadata is the cache's own, so it is not
        re-validated (no device sync).

        ``softcap`` (Gemma 2 logit soft-capping: None or a finite real > 0), ``sinks`` (gpt-oss
        attention sinks: None or a float ``[H_q]`` tensor on the cache's device) and ``window``
        (a sliding window: None or an int >= 1; a query at position ``p`` sees the kept rows at
        positions ``p - window < j <= p``, by the cache's own ``positions``, its position being
        that of its own appended row) are those of ``ragged_attention``; the LSE is over the
        keys only (sinks not in it)."""
        state = self._layer(layer_index)
        view = self.layer(layer_index)
        self._check_query(q)
        arguments = dict(seq_lens=view.seq_lens, scale=scale, max_seq_len=view.max_seq_len,
                         total_rows=sum(state.lengths), num_kv_heads=self.num_kv_heads,
                         check_segments=False, softcap=softcap, sinks=sinks, window=window,
                         key_positions=view.positions if window is not None else None,
                         impl=impl)
        decode = q.dim() == 3
        num_new = 1 if decode else q.shape[2]
        if num_new > state.min_length:
            raise ValueError(f"q has T_new = {num_new} new tokens, but a segment of layer "
                             f"{layer_index} holds only {state.min_length} rows; append the new "
                             "tokens' K/V first")
        if decode and not return_lse:
            return ragged_decode_attention(q, view.keys, view.values, view.cu_seqlens,
                                           **arguments)
        result = ragged_attention(q[:, :, None] if decode else q, view.keys, view.values,
                                  view.cu_seqlens, return_lse=return_lse, **arguments)
        if decode:
            out, lse = result
            return out[:, :, 0], lse[:, :, 0]
        return result

    # --------------------------------------------------------------------------- internals
    def _layer(self, layer_index: int) -> _LayerStorage:
        check_int("layer_index", layer_index, minimum=0, maximum=self.num_layers - 1)
        return self._layers[layer_index]

    def _check_query(self, q) -> None:
        # The op infers H_kv from the segment count, which a q of another batch size can fool.
        check_tensor("q", q, layout="[B, H_q, D] or [B, H_q, T_new, D]")
        if q.dim() not in (3, 4):
            raise ValueError(f"q must be [B, H_q, D] or [B, H_q, T_new, D], got shape "
                             f"{tuple(q.shape)}")
        b, h_q, d = q.shape[0], q.shape[1], q.shape[-1]
        if b != self.batch_size:
            raise ValueError(f"q has batch size {b}, but the cache holds B = {self.batch_size}")
        if h_q < 1 or h_q % self.num_kv_heads:
            raise ValueError(f"q has H_q = {h_q} query heads, but the cache's H_kv = "
                             f"{self.num_kv_heads} KV heads need a positive multiple of "
                             f"{self.num_kv_heads}")
        if d != self.head_dim:
            raise ValueError(f"q has head dim {d}, but the cache holds D = {self.head_dim}")

    def _check_new(self, name: str, tensor) -> torch.Tensor:
        check_tensor(name, tensor, layout="[B, H_kv, D] or [B, H_kv, t, D]",
                     dtypes=(self.dtype,))
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(2)
        expected = (self.batch_size, self.num_kv_heads)
        if tensor.dim() != 4 or tuple(tensor.shape[:2]) != expected or \
                tensor.shape[-1] != self.head_dim:
            raise ValueError(f"{name} must be [B, H_kv, D] or [B, H_kv, t, D] with B = "
                             f"{self.batch_size}, H_kv = {self.num_kv_heads}, D = "
                             f"{self.head_dim}, got shape {tuple(tensor.shape)}")
        if tensor.shape[2] < 1:
            raise ValueError(f"{name} must have t >= 1 (new tokens), got shape "
                             f"{tuple(tensor.shape)} [B, H_kv, t, D]")
        if tensor.device != self.device:
            raise ValueError(f"{name} must be on {self.device} (the cache's device), got "
                             f"{tensor.device}")
        return tensor

    def _repack(self, state: _LayerStorage, steps: int) -> None:
        lengths = state.lengths
        spare = _grown_spare(lengths, steps, state.reserved, self.growth)
        room, rows = _room_bounds(lengths, spare, self.device)
        src = _packed_to_room_rows(lengths, state.cu_seqlens.long())
        dst = _packed_to_room_rows(lengths, room.long())
        keys = torch.empty(rows, self.head_dim, dtype=self.dtype, device=self.device)
        values = torch.empty(rows, self.head_dim, dtype=self.dtype, device=self.device)
        positions = torch.empty(rows, dtype=torch.int32, device=self.device)
        for new, old in ((keys, state.keys), (values, state.values),
                         (positions, state.positions)):
            _copy_rows(new, dst, old, src)
        state.keys, state.values, state.positions, state.cu_seqlens = keys, values, positions, room
        state.packed_lengths, state.longest_packed = lengths, max(lengths, default=0)
        state.shortest_packed = min(lengths, default=0)
        state.appended = 0
        state.reserved = spare
        self.num_repacks += 1
