"""Public entry point of blockwise attention scoring."""

from __future__ import annotations

import torch

from proxykv._backend import OpSpec, dispatch, register_op
from proxykv._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SINK_DTYPES,
    check_choice,
    check_dim,
    check_gqa,
    check_int,
    check_nonempty,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_sinks,
    check_softcap,
    check_tensor,
    check_window,
)
from proxykv.kernels.aggregate.api import GROUP_MODES
from proxykv.kernels.attention.reference import attention_scores_reference
from proxykv.kernels.attention.torch_impl import attention_scores_torch

QUERY_REDUCTIONS = ("mean", "sum", "max")


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    reduce: str = "mean",
    group_reduce: str = "mean",
    key_valid_len: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Per-key attention mass of one layer, without materialising the ``[T_q, T_k]`` attention.

    Probabilities are the exact softmax of the logits ``scale * q @ k^T`` over the keys each query
    sees (optionally soft-capped, windowed, and with a sink in the denominator: ``softcap``,
    ``window``, ``sinks`` — what transformers' Gemma 2, sliding-window and gpt-oss attention
    compute). Each key's probabilities are reduced over queries (``reduce``), then over the query
    heads of its GQA group (``group_reduce``). SnapKV = ``mean``/``mean`` over an observation
    window; KVzip = ``max``/``max`` over the context-reconstruction queries; H2O = ``sum``.

    Args:
        q: ``[B, H_q, T_q, D]`` float16/bfloat16/float32, any strides, every dimension >= 1.
        k: ``[B, H_kv, T_k, D]``, same dtype and device as ``q``, any strides (never copied on the
            Triton path), every dimension >= 1. ``H_q % H_kv == 0``; query head ``h`` uses KV head
            ``h // (H_q // H_kv)``.
        scale: logit scale: None (``D ** -0.5``) or a finite real number > 0.
        causal: query ``i`` sits at absolute position ``q_offset + i`` and sees keys at positions
            ``<= q_offset + i``. Without ``causal`` every query sees every (valid) key.
        q_offset: absolute position of the first query, ``0 <= q_offset <= T_k - T_q``; default
            ``T_k - T_q`` (the queries are the last positions: an observation window). For KVzip
            reconstruction pass ``k`` = context keys followed by the reconstruction tokens' keys and
            ``q_offset`` = the context length. Only used when ``causal``.
        reduce: over queries — ``"mean"`` (sum over all ``T_q`` queries divided by ``T_q``),
            ``"sum"`` or ``"max"``.
        group_reduce: over the ``H_q // H_kv`` query heads of a group — ``"mean"`` or ``"max"``.
        key_valid_len: optional int32/int64 ``[B]``, values in ``[0, T_k]`` (checked: one device
            sync), for right-padded batches: keys at or past it take no probability mass and
            score ``-inf``. A query that sees no valid key contributes nothing.
        lse: optional float32 ``[B, H_q, T_q]`` (any strides): each query row's natural-log
            log-sum-exp of the scaled (and soft-capped, with ``softcap``) logits over the keys it
            sees — **the keys only**: with ``sinks`` the op folds the sink in itself
            (``logaddexp(lse, sinks[h])``). As returned by FlashAttention / FlashInfer (and by
            ``ragged_attention(return_lse=True)``). When given, the Triton path skips its first
            pass. It may cover more keys than ``k`` holds — e.g. the softmax of a forward over
            context and reconstruction tokens, with ``k`` the context only: the scores are then
            the probabilities under that softmax, of the keys in ``k`` (KVzip needs no others).
            Not checked against the data: a wrong ``lse`` gives wrong (unnormalised) scores.
        softcap: logit soft-capping (Gemma 2's ``attn_logit_softcapping``): None (off) or a finite
            real > 0; the logit of query ``i`` and key ``j`` becomes
            ``softcap * tanh(scale * q_i·k_j / softcap)`` (after the scale, before masking and
            softmax).
        sinks: learned attention sinks (gpt-oss): optional float ``[H_q]`` (any float dtype, read
            as float32; device of ``q``), one logit per query head. Each softmax denominator gets
            the extra term ``exp(sinks[h])`` (not scaled, not soft-capped): the sink takes
            probability mass but is no key, so a row's probabilities sum to less than 1 and the
            scores are the masses of the keys. ``-inf`` is a head without a sink; values are not
            checked (``+inf`` gives every key of that head 0, NaN propagates).
        window: sliding-window length (transformers' ``sliding_window``): None (off) or an int
            >= 1; the query at position ``p = q_offset + i`` sees the keys at positions
            ``p - window < j <= p`` (at most ``window`` keys, itself included). Needs
            ``causal=True``. Keys are positions along ``T_k``. A window of at least
            ``q_offset + T_q`` keys masks nothing and runs as ``window=None``.
        impl: ``"triton"``, ``"torch"`` or None (see ``proxykv.backend_info``).

    Returns:
        float32 ``[B, H_kv, T_k]``, contiguous: larger = more attention received. A key no query
        sees scores 0; a key at or past ``key_valid_len`` scores ``-inf``.

    Raises:
        TypeError: a non-tensor, a tensor of a dtype the argument does not take, or a ``scale``,
            ``softcap``, ``window``, ``q_offset`` or ``causal`` of the wrong type (a bool is not a
            number).
        ValueError: a wrong rank or shape (``sinks`` not ``[H_q]``), an empty dimension, tensors
            on different devices (or ``meta``), an unknown reduction, ``q_offset`` or
            ``key_valid_len`` out of range, ``scale`` or ``softcap`` not finite and > 0,
            ``window`` < 1 or past ``2**31 - 1``, ``window`` without ``causal``.

    Not checked (would cost a device sync): NaN/inf in ``q``/``k``/``lse``/``sinks``.
    """
    check_tensor("q", q, ndim=4, layout="[B, H_q, T_q, D]", dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, layout="[B, H_kv, T_k, D]", dtypes=FLOAT_DTYPES)
    if key_valid_len is not None:
        check_tensor("key_valid_len", key_valid_len, ndim=1, layout="[B]", dtypes=INDEX_DTYPES)
    if lse is not None:
        check_tensor("lse", lse, ndim=3, layout="[B, H_q, T_q]", dtypes=(torch.float32,))
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1, layout="[H_q]", dtypes=SINK_DTYPES)
    device = check_same_device(q=q, k=k, key_valid_len=key_valid_len, lse=lse, sinks=sinks)
    check_same_dtype(q=q, k=k)
    check_nonempty("q", q, "[B, H_q, T_q, D]")
    check_nonempty("k", k, "[B, H_kv, T_k, D]")
    b, h_q, t_q, d = q.shape
    _, h_kv, t_k, _ = k.shape
    check_dim("k", k, 0, b, "batch size B")
    check_dim("k", k, 3, d, "head dim D")
    check_gqa(h_q, h_kv)
    check_choice("reduce", reduce, QUERY_REDUCTIONS)
    check_choice("group_reduce", group_reduce, GROUP_MODES)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if q_offset is None:
        q_offset = t_k - t_q
        if causal and q_offset < 0:
            raise ValueError(f"causal scoring with the default q_offset needs T_q <= T_k, got "
                             f"T_q={t_q} and T_k={t_k}")
    else:
        check_int("q_offset", q_offset, minimum=0)
        if q_offset + t_q > t_k:
            raise ValueError(f"q_offset + T_q must be <= T_k (every query position must be a key "
                             f"position), got q_offset={q_offset}, T_q={t_q}, T_k={t_k}")
    scale = check_scale(scale, d)
    softcap = check_softcap(softcap)
    window = check_window(window)
    if window is not None and not causal:
        raise ValueError(f"window={window} needs causal=True (a sliding window is one-sided: "
                         f"a query sees the keys at positions p - window < j <= p), got "
                         f"causal=False")
    sinks = check_sinks(sinks, h_q)
    if lse is not None and tuple(lse.shape) != (b, h_q, t_q):
        raise ValueError(f"lse must have shape [B, H_q, T_q] = {(b, h_q, t_q)}, got "
                         f"{tuple(lse.shape)}")
    if key_valid_len is not None:
        check_dim("key_valid_len", key_valid_len, 0, b, "batch size B")
        low, high = torch.stack([key_valid_len.min(), key_valid_len.max()]).tolist()
        if low < 0 or high > t_k:
            raise ValueError(f"key_valid_len must lie in [0, T_k={t_k}], got values in "
                             f"[{low}, {high}]")
    _, run = dispatch("attention_scores", impl, device)
    return run(q, k, scale=scale, causal=causal, q_offset=max(q_offset, 0), reduce=reduce,
               group_reduce=group_reduce, key_valid_len=key_valid_len, lse=lse, softcap=softcap,
               sinks=sinks, window=window)


def _example(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 32, generator=generator).to(device)
    k = torch.randn(2, 2, 75, 32, generator=generator).to(device)
    return (q, k), {"reduce": "max", "group_reduce": "max",
                    "key_valid_len": torch.tensor([75, 60], device=device)}


register_op(OpSpec(
    name="attention_scores",
    api=attention_scores,
    torch_impl=attention_scores_torch,
    triton_launcher="proxykv.kernels.attention.triton_impl:attention_scores_triton",
    reference=attention_scores_reference,
    example=_example,
))
