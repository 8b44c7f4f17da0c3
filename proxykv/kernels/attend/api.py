"""Public entry points of attention over a ragged (per-head compacted) KV cache: a chunk of new
tokens (``ragged_attention``) and its one-token case (``ragged_decode_attention``). One kernel
family serves both."""

from __future__ import annotations

import torch

from proxykv._backend import OpSpec, dispatch, register_op
from proxykv._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SINK_DTYPES,
    bounds_statistics,
    check_gqa,
    check_int,
    check_int32_size,
    check_nonempty,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_sinks,
    check_softcap,
    check_tensor,
    check_window,
    first_true_index,
    raise_for_bounds,
    to_int32_metadata,
)
from proxykv.kernels.attend.reference import (
    ragged_attention_reference,
    ragged_decode_attention_reference,
)
from proxykv.kernels.attend.torch_impl import (
    ragged_attention_torch,
    ragged_decode_attention_torch,
)


def _check_segment_values(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None, rows: int,
                          h_kv: int, min_length: int) -> int:
    """Check the segment metadata's values in one device sync; returns the longest segment.

    ``min_length``: every segment must hold at least this many valid rows (``T_new``: the new
    tokens' own rows), 0 for none."""
    stats = bounds_statistics(cu_seqlens)
    capacity = cu_seqlens[1:] - cu_seqlens[:-1]
    lengths = capacity if seq_lens is None else seq_lens
    stats += [lengths.max().long(), first_true_index(lengths < min_length)]
    if seq_lens is not None:
        stats += [seq_lens.min().long(), first_true_index(seq_lens > capacity)]
    values = torch.stack(stats).tolist()
    raise_for_bounds("cu_seqlens", values[:3], total=rows,
                     total_what="N = k_packed.shape[0]")
    longest, first_short = values[3:5]

    def segment(s: int) -> str:
        return f"segment b={s // h_kv}, h={s % h_kv}"

    if seq_lens is not None:
        lowest, first_too_long = values[5:]
        if lowest < 0:
            raise ValueError(f"seq_lens must be >= 0, got a minimum of {lowest}")
        if first_too_long >= 0:
            s = first_too_long
            raise ValueError(
                f"seq_lens[{s}] ({segment(s)}) = {int(seq_lens[s])} exceeds the segment's room "
                f"cu_seqlens[{s + 1}] - cu_seqlens[{s}] = {int(capacity[s])}")
    if first_short >= 0:
        s = first_short
        what = "seq_lens" if seq_lens is not None else "cu_seqlens"
        raise ValueError(
            f"{what}[{s}] ({segment(s)}) holds {int(lengths[s])} valid rows, fewer than T_new = "
            f"{min_length}; the new tokens' own K/V must be in every segment (append them first)")
    return longest


def _attend(q, k_packed, v_packed, cu_seqlens, *, seq_lens, scale, max_seq_len, total_rows,
            num_kv_heads, check_segments, impl, return_lse, softcap, sinks, window, key_positions,
            op: str, new_rows_required: bool):
    """Validation and dispatch shared by both entry points; ``q`` is ``[B, H_q, T_new, D]`` (the
    decode entry point passes a view with ``T_new = 1``)."""
    check_tensor("k_packed", k_packed, ndim=2, layout="[N, D]", dtypes=FLOAT_DTYPES)
    check_tensor("v_packed", v_packed, ndim=2, layout="[N, D]", dtypes=FLOAT_DTYPES)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, layout="[B * H_kv + 1]", dtypes=INDEX_DTYPES)
    if seq_lens is not None:
        check_tensor("seq_lens", seq_lens, ndim=1, layout="[B * H_kv]", dtypes=INDEX_DTYPES)
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1, layout="[H_q]", dtypes=SINK_DTYPES)
    if key_positions is not None:
        check_tensor("key_positions", key_positions, ndim=1, layout="[N]", dtypes=INDEX_DTYPES)
    check_same_dtype(q=q, k_packed=k_packed, v_packed=v_packed)
    device = check_same_device(q=q, k_packed=k_packed, v_packed=v_packed, cu_seqlens=cu_seqlens,
                               seq_lens=seq_lens, sinks=sinks, key_positions=key_positions)
    b, h_q, num_new, d = q.shape
    if k_packed.shape[1] != d or v_packed.shape != k_packed.shape:
        raise ValueError(f"k_packed and v_packed must both be [N, D] with D = {d} (the head dim of "
                         f"q), got {tuple(k_packed.shape)} and {tuple(v_packed.shape)}")
    rows = k_packed.shape[0]
    check_int32_size("k_packed", "N", rows, "rows")
    num_segments = cu_seqlens.numel() - 1
    if num_kv_heads is not None:
        check_int("num_kv_heads", num_kv_heads, minimum=1)
        if num_segments != b * num_kv_heads:
            raise ValueError(f"q and cu_seqlens disagree: cu_seqlens has {num_segments} segments, "
                             f"but q's batch size B = {b} times num_kv_heads = {num_kv_heads} "
                             f"needs {b * num_kv_heads}")
    elif num_segments < 1 or num_segments % b:
        raise ValueError(f"cu_seqlens must have B * H_kv + 1 entries with B = {b} (from q), got "
                         f"{cu_seqlens.numel()}")
    h_kv = num_segments // b
    check_gqa(h_q, h_kv)
    if seq_lens is not None and seq_lens.numel() != num_segments:
        raise ValueError(f"seq_lens must have B * H_kv = {num_segments} entries (one per "
                         f"segment of cu_seqlens), got {seq_lens.numel()}")
    scale = check_scale(scale, d)
    softcap = check_softcap(softcap)
    window = check_window(window)
    sinks = check_sinks(sinks, h_q)
    if key_positions is not None and key_positions.shape[0] != rows:
        raise ValueError(f"key_positions must have shape [N] = ({rows},) (one position per row "
                         f"of k_packed), got {tuple(key_positions.shape)}")
    if window is not None and key_positions is None:
        raise ValueError(f"window={window} needs key_positions (the original position of every "
                         "packed row: a compacted cache's rows have no implicit positions), got "
                         "None")
    if max_seq_len is not None:
        check_int("max_seq_len", max_seq_len, minimum=num_new if new_rows_required else 0,
                  maximum=rows)
    if total_rows is not None:
        check_int("total_rows", total_rows, minimum=0, maximum=rows)
    if check_segments:
        longest = _check_segment_values(cu_seqlens, seq_lens, rows, h_kv,
                                        num_new if new_rows_required else 0)
        if max_seq_len is not None and max_seq_len < longest:
            raise ValueError(f"max_seq_len = {max_seq_len} is shorter than the longest segment "
                             f"({longest} rows)")
        max_seq_len = longest if max_seq_len is None else max_seq_len
    cu_seqlens, seq_lens = to_int32_metadata(values_checked=check_segments,
                                             cu_seqlens=cu_seqlens, seq_lens=seq_lens)
    chosen, run = dispatch(op, impl, device)
    launch = {}
    if chosen == "triton":
        if max_seq_len is None:
            lengths = seq_lens if seq_lens is not None else cu_seqlens[1:] - cu_seqlens[:-1]
            max_seq_len = int(lengths.max())
        if total_rows is None:  # packed rows are all valid; with spare room, an upper bound
            total_rows = rows if seq_lens is None else min(rows, max_seq_len * num_segments)
        launch["total_rows"] = total_rows
    if softcap is not None:
        launch["softcap"] = softcap
    if sinks is not None:
        launch["sinks"] = sinks
    if window is not None:
        launch.update(window=window, key_positions=key_positions)
    if op == "ragged_decode_attention":
        return run(q[:, :, 0], k_packed, v_packed, cu_seqlens, seq_lens, scale=scale,
                   max_seq_len=max_seq_len, **launch)
    return run(q, k_packed, v_packed, cu_seqlens, seq_lens, scale=scale, max_seq_len=max_seq_len,
               return_lse=return_lse, **launch)


_METADATA_DOC = """
    Segment ``s = b * H_kv + h`` holds the kept K/V rows of KV head ``h`` of batch ``b`` (the
    layout ``gather_kv_ragged`` produces); query head ``hq`` reads segment
    ``b * H_kv + hq // (H_q // H_kv)``. Rows keep the RoPE applied when they were computed. Two
    layouts are accepted:

    * **packed** (``seq_lens=None``): segment ``s`` is rows ``cu_seqlens[s] … cu_seqlens[s + 1]-1``;
    * **with spare room** (``seq_lens`` given): segment ``s`` *starts* at row ``cu_seqlens[s]`` and
      its first ``seq_lens[s]`` rows are valid; rows up to ``cu_seqlens[s + 1]`` are spare room for
      new tokens to be appended into without repacking (``RaggedKVCache``'s layout).

    The metadata does not say how its ``S = len(cu_seqlens) - 1`` segments split into batches and
    heads: without ``num_kv_heads`` the op takes ``H_kv = S / B`` with ``B`` from ``q``, so a ``q``
    of the wrong batch size whose ``B`` still divides ``S`` (a batch-2 ``q`` on the four segments
    of a batch-1, ``H_kv = 4`` cache) is attended with the wrong head grouping, silently. Pass
    ``num_kv_heads`` to have ``S == B * num_kv_heads`` checked (``RaggedKVCache.attend`` does).
"""

_ARGS_DOC = """
        k_packed, v_packed: ``[N, D]``, dtype and device of ``q``, any strides,
            ``N <= 2**31 - 1``.
        cu_seqlens: int32/int64 ``[B * H_kv + 1]`` (``torch.cumsum`` gives int64), starting at 0,
            non-decreasing, ending at ``N``.
        seq_lens: optional int32/int64 ``[B * H_kv]``, ``0 <= seq_lens[s] <= cu_seqlens[s+1] -
            cu_seqlens[s]``.
        scale: logit scale: None (``D ** -0.5``) or a finite real number > 0.
        max_seq_len: the longest segment's valid length, at most ``N``, if the caller knows it
            without reading the device (``RaggedKVCache`` does). The Triton path sizes its grid
            from it; when None it is read from ``cu_seqlens``/``seq_lens`` (a device sync).
        total_rows: the valid rows of all segments together (``sum(seq_lens)``), at most ``N``,
            if the caller knows it without reading the device (``RaggedKVCache`` does): the
            Triton path sizes its key splits from the total work so ragged and batched caches
            fill the GPU. A launch hint: it changes only how the work is split (results agree
            within rounding).
            Default: ``N`` when packed, else ``max_seq_len × segments``.
        num_kv_heads: optional ``H_kv``, an int >= 1, checked against the segment count (see
            above). When None, ``H_kv = S / B``.
        check_segments: verify the metadata values (monotone bounds from 0 to N, ``seq_lens``
            within each segment's room, ``max_seq_len`` not short{min_rows}). One device sync.
            Pass False on a hot path whose metadata is known good (``RaggedKVCache`` does).
        softcap: logit soft-capping (Gemma 2's ``attn_logit_softcapping``): None (off) or a finite
            real > 0; every logit becomes ``softcap * tanh(scale * q·k / softcap)`` (after the
            scale, before masking and softmax).
        sinks: learned attention sinks (gpt-oss): optional float ``[H_q]`` (any float dtype, read
            as float32; device of ``q``), one logit per query head. Each softmax denominator gets
            the extra term ``exp(sinks[h])`` (not scaled, not soft-capped): the probabilities are
            ``exp(s_j) / (sum_j' exp(s_j') + exp(sinks[h]))``, so they sum to less than 1 and the
            output is ``sum_j p_j v_j`` (the sink carries no value). ``-inf`` is a head without a
            sink. Values are not checked (``+inf`` gives zeros, NaN propagates).
        window: sliding-window length (transformers' ``sliding_window``): None (off) or an int
            >= 1; a query at position ``p`` sees, of the rows it sees causally, those at positions
            ``p - window < j``. Needs ``key_positions``. The query's position ``p`` is that of its
            own row: query ``t`` of segment ``s`` is at ``key_positions`` of the segment's valid
            row ``seq_len - T_new + t`` (the new tokens' own rows end every segment){own_row}.
        key_positions: int32/int64 ``[N]``, device of ``q``: the original position of every
            packed row (``RaggedKVCache``'s ``positions``), read only with ``window``. Not
            checked: the positions of a segment's valid rows should ascend (the kept positions,
            then the new tokens'), which makes the window the last rows of what each query sees.
        impl: ``"triton"``, ``"torch"`` or None (see ``proxykv.backend_info``).

    The kernels read ``cu_seqlens`` and ``seq_lens`` as int32: int64 ones are converted (a copy of
    the metadata only) and never wrapped — with ``check_segments=False`` their values are still
    checked to fit int32 (one device sync, none for int32 metadata).
"""

_RAISES_DOC = """
    Raises:
        TypeError: a non-tensor, a tensor of a dtype the argument does not take, or a ``scale``,
            ``softcap``, ``window``, ``max_seq_len`` or ``num_kv_heads`` of the wrong type (a bool
            is not a number).
        ValueError: a wrong rank or shape (``sinks`` not ``[H_q]``, ``key_positions`` not
            ``[N]``), an empty dimension of ``q``, ``N`` past int32, a segment count that does not
            fit ``q`` (or ``num_kv_heads``), tensors on different devices (or ``meta``), metadata
            values out of range{short}, ``scale`` or ``softcap`` not finite and > 0, ``window``
            < 1 or past ``2**31 - 1``, ``window`` without ``key_positions``.

    Not checked: NaN/inf in the inputs (``sinks`` included), the values of ``key_positions``; with
    ``check_segments=False``, the metadata values (beyond fitting int32) — out-of-range bounds read
    arbitrary memory and a ``max_seq_len`` shorter than a segment makes the Triton path ignore that
    segment's rows past it.
"""


def ragged_attention(
    q: torch.Tensor,
    k_packed: torch.Tensor,
    v_packed: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    max_seq_len: int | None = None,
    total_rows: int | None = None,
    num_kv_heads: int | None = None,
    check_segments: bool = True,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    key_positions: torch.Tensor | None = None,
    impl: str | None = None,
):
    """Attention of ``T_new`` new tokens per sequence over a per-head compacted KV cache whose
    segments already end with the new tokens' own K/V rows.

    Query ``t`` (``0 <= t < T_new``) of segment ``s`` sees the segment's first
    ``seq_lens[s] - T_new + t + 1`` valid rows: all the kept context, then the new tokens causally
    up to itself (and, with ``window``, of those only the rows at positions within the window).
    ``softmax(scale · q·k)`` over those rows (soft-capped with ``softcap``, a sink in the
    denominator with ``sinks``), in float32. With ``T_new = 1`` this is
    ``ragged_decode_attention`` (the newest token sees every row).
    {metadata}
    Args:
        q: ``[B, H_q, T_new, D]`` float16/bfloat16/float32, any strides, every dimension >= 1;
            ``H_q`` a multiple of ``H_kv``.
    {args}
        return_lse: also return the natural-log log-sum-exp of every query's logits (for merging
            with attention computed elsewhere, e.g. over a second cache) — **over the keys only**:
            with ``sinks`` the sink is not in it (but it is in the output's normalisation:
            ``out = sum_j exp(s_j - L) v_j / (1 + exp(sinks[h] - L))`` with ``L`` the returned
            LSE). The same convention as ``attention_scores``' ``lse`` argument.

    Returns:
        ``out [B, H_q, T_new, D]`` in the dtype of ``q``, contiguous; with ``return_lse``,
        ``(out, lse)`` with ``lse [B, H_q, T_new]`` float32.
    {raises}"""
    check_tensor("q", q, ndim=4, layout="[B, H_q, T_new, D]", dtypes=FLOAT_DTYPES)
    check_nonempty("q", q, "[B, H_q, T_new, D]")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return _attend(q, k_packed, v_packed, cu_seqlens, seq_lens=seq_lens, scale=scale,
                   max_seq_len=max_seq_len, total_rows=total_rows, num_kv_heads=num_kv_heads,
                   check_segments=check_segments, impl=impl, return_lse=return_lse,
                   softcap=softcap, sinks=sinks, window=window, key_positions=key_positions,
                   op="ragged_attention", new_rows_required=True)


def ragged_decode_attention(
    q: torch.Tensor,
    k_packed: torch.Tensor,
    v_packed: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
    max_seq_len: int | None = None,
    total_rows: int | None = None,
    num_kv_heads: int | None = None,
    check_segments: bool = True,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    key_positions: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over a per-head compacted KV cache: every query
    head sees every valid row of its segment (whether or not the token's own K/V was appended;
    an empty segment is allowed). The ``T_new = 1`` case of ``ragged_attention``, same kernels.
    {metadata}
    Args:
        q: ``[B, H_q, D]`` float16/bfloat16/float32, any strides, every dimension >= 1; ``H_q`` a
            multiple of ``H_kv``.
    {args}
    Returns:
        ``[B, H_q, D]`` in the dtype of ``q``, contiguous. A query head whose segment has no
        valid row outputs zeros.
    {raises}"""
    check_tensor("q", q, ndim=3, layout="[B, H_q, D]", dtypes=FLOAT_DTYPES)
    check_nonempty("q", q, "[B, H_q, D]")
    return _attend(q[:, :, None], k_packed, v_packed, cu_seqlens, seq_lens=seq_lens, scale=scale,
                   max_seq_len=max_seq_len, total_rows=total_rows, num_kv_heads=num_kv_heads,
                   check_segments=check_segments, impl=impl, return_lse=False,
                   softcap=softcap, sinks=sinks, window=window, key_positions=key_positions,
                   op="ragged_decode_attention", new_rows_required=False)


ragged_attention.__doc__ = ragged_attention.__doc__.format(
    metadata=_METADATA_DOC, args=_ARGS_DOC.format(min_rows=", every segment >= T_new rows",
                                                  own_row=""),
    raises=_RAISES_DOC.format(short=" (a segment shorter than T_new)"))
ragged_decode_attention.__doc__ = ragged_decode_attention.__doc__.format(
    metadata=_METADATA_DOC,
    args=_ARGS_DOC.format(min_rows="", own_row=(
        "; here the last valid row, so the token's own K/V must have been appended (an empty "
        "segment outputs zeros)")),
    raises=_RAISES_DOC.format(short=""))


def _example_metadata(generator, lengths: list[int]):
    """K/V of six segments (B = 2, H_kv = 3, D = 24) with the given valid lengths and some spare
    room behind each."""
    lengths = torch.tensor(lengths)
    room = lengths + torch.tensor([0, 3, 1, 0, 7, 2])
    cu_seqlens = torch.cat([torch.zeros(1), room.cumsum(0)]).to(torch.int32)
    n = int(room.sum())
    k = torch.randn(n, 24, generator=generator)
    v = torch.randn(n, 24, generator=generator)
    return k, v, cu_seqlens, lengths.to(torch.int32)


def _example(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    k, v, cu_seqlens, seq_lens = _example_metadata(generator, [5, 3, 70, 33, 4, 128])
    q = torch.randn(2, 6, 3, 24, generator=generator)
    return tuple(t.to(device) for t in (q, k, v, cu_seqlens)), \
        {"seq_lens": seq_lens.to(device), "return_lse": True}


def _decode_example(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    k, v, cu_seqlens, seq_lens = _example_metadata(generator, [5, 0, 70, 33, 1, 128])
    q = torch.randn(2, 6, 24, generator=generator)
    return tuple(t.to(device) for t in (q, k, v, cu_seqlens)), {"seq_lens": seq_lens.to(device)}


register_op(OpSpec(
    name="ragged_attention",
    api=ragged_attention,
    torch_impl=ragged_attention_torch,
    triton_launcher="proxykv.kernels.attend.triton_impl:ragged_attention_triton",
    reference=ragged_attention_reference,
    example=_example,
))

register_op(OpSpec(
    name="ragged_decode_attention",
    api=ragged_decode_attention,
    torch_impl=ragged_decode_attention_torch,
    triton_launcher="proxykv.kernels.attend.triton_impl:ragged_decode_attention_triton",
    reference=ragged_decode_attention_reference,
    example=_decode_example,
))
