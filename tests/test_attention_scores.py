"""attention_scores: interpreted/compiled Triton, torch and the dispatcher against the fp64
reference, over shapes, GQA ratios, layouts, dtypes, masks and every reduction."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from proxykv import attention_scores
from proxykv.kernels.attention import triton_impl
from proxykv.kernels.attention.reference import attention_scores_reference
from proxykv.kernels.attention.torch_impl import attention_scores_torch
from proxykv.testing import assert_close
from proxykv.testing import strategies as pst

# Scores are probabilities in [0, 1] computed with fp32 accumulation; low-precision inputs only
# perturb the logits, so the table's tolerances apply to the scores directly.
REDUCTIONS = [(r, g) for r in ("mean", "sum", "max") for g in ("mean", "max")]


@st.composite
def scoring_cases(draw, max_t_q=96, max_t_k=200):
    h_q, h_kv = draw(pst.gqa_heads(max_kv_heads=2))
    batch = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([16, 32, 24]))
    t_k = draw(pst.lengths(1, max_t_k))
    causal = draw(st.booleans())
    t_q = draw(st.integers(1, min(t_k, max_t_q)) if causal else pst.lengths(1, max_t_q))
    q_offset = draw(st.integers(0, t_k - t_q)) if causal and draw(st.booleans()) else None
    dtype = draw(pst.dtypes())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1.0, 3.0]))  # 3.0: sharper softmax, larger logits
    q = pst.make_bhtd((batch, h_q, t_q, head_dim), dtype, draw(pst.layouts()), generator,
                      scale=scale)
    k = pst.make_bhtd((batch, h_kv, t_k, head_dim), dtype, draw(pst.layouts()), generator)
    reduce, group_reduce = draw(st.sampled_from(REDUCTIONS))
    kwargs = dict(causal=causal, q_offset=q_offset, reduce=reduce, group_reduce=group_reduce)
    if draw(st.booleans()):
        kwargs["key_valid_len"] = torch.tensor(
            [draw(st.integers(0, t_k)) for _ in range(batch)],
            dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    return q, k, kwargs


@pytest.mark.parametrize("impl", ["triton", "torch", None], ids=lambda i: f"impl={i}")
@given(case=scoring_cases())
def test_matches_reference(impl, case, device):
    q, k, kwargs = case
    expected = attention_scores_reference(q, k, **kwargs)
    q, k = q.to(device), k.to(device)
    kwargs = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()}
    actual = attention_scores(q, k, impl=impl, **kwargs)
    assert actual.shape == (q.shape[0], k.shape[1], k.shape[2]) and actual.dtype == torch.float32
    assert_close(actual, expected, dtype=q.dtype, name=f"attention_scores{kwargs}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@given(case=scoring_cases(max_t_q=40, max_t_k=120))
def test_given_lse_gives_the_same_scores(impl, case, device):
    q, k, kwargs = case
    t_q, t_k = q.shape[2], k.shape[2]
    q_offset = kwargs["q_offset"] if kwargs["q_offset"] is not None else t_k - t_q
    # The row log-sum-exp an attention kernel would return, from the fp64 logits.
    group = q.shape[1] // k.shape[1]
    logits = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2))
    logits = logits * q.shape[-1] ** -0.5
    visible = torch.ones(t_q, t_k, dtype=torch.bool)
    if kwargs["causal"]:
        visible = torch.arange(t_k)[None, :] <= (q_offset + torch.arange(t_q))[:, None]
    mask = visible.expand(q.shape[0], 1, t_q, t_k)
    if "key_valid_len" in kwargs:
        mask = mask & (torch.arange(t_k)[None, :] < kwargs["key_valid_len"][:, None])[:, None, None]
    lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1).float()
    expected = attention_scores_reference(q, k, **kwargs)
    kwargs = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()}
    actual = attention_scores(q.to(device), k.to(device), lse=lse.to(device), impl=impl, **kwargs)
    assert_close(actual, expected, dtype=q.dtype, name="attention_scores(lse=...)")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("group_reduce", ["max", "mean"])
def test_an_lse_over_more_keys_scores_the_keys_given(impl, group_reduce, device):
    """KVzip's fast path: the forward's lse covers context and reconstruction keys, ``k`` holds
    the context only, which every query sees: the scores are the full softmax's, sliced."""
    generator = torch.Generator().manual_seed(17)
    b, h_q, h_kv, t_q, t_k, context, d = 2, 6, 2, 23, 70, 41, 16
    q = torch.randn(b, h_q, t_q, d, generator=generator)
    k = torch.randn(b, h_kv, t_k, d, generator=generator) * 2
    full = attention_scores_reference(q, k, reduce="max", group_reduce=group_reduce)
    logits = (q.double() @ k.double().repeat_interleave(h_q // h_kv, 1).transpose(-1, -2)) * \
        d ** -0.5
    visible = torch.arange(t_k)[None, :] <= (t_k - t_q + torch.arange(t_q))[:, None]
    lse = logits.masked_fill(~visible, float("-inf")).logsumexp(-1).float()
    actual = attention_scores(q.to(device), k[:, :, :context].to(device), causal=False,
                              reduce="max", group_reduce=group_reduce, lse=lse.to(device),
                              impl=impl)
    assert_close(actual, full[..., :context], dtype=q.dtype, name="lse over more keys")


@pytest.mark.parametrize("block_m, block_n, n_splits", [(16, 32, 1), (16, 32, 5), (32, 64, 2)],
                         ids=["M16-N32-splits1", "M16-N32-splits5", "M32-N64-splits2"])
def test_launch_plans_agree(block_m, block_n, n_splits, device):
    """Every split count and tile shape the plan may choose gives the reference's scores."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 21, 16, generator=generator).to(device)
    k = torch.randn(2, 2, 131, 16, generator=generator).to(device)
    valid = torch.tensor([131, 90], device=device)  # batch 1: every query sees up to key 89
    plan = triton_impl.LaunchPlan(block_m=block_m, block_n=block_n, n_splits=n_splits)
    for reduce, group_reduce in REDUCTIONS:
        actual = triton_impl.attention_scores_triton(
            q, k, scale=16 ** -0.5, causal=True, q_offset=100, reduce=reduce,
            group_reduce=group_reduce, key_valid_len=valid, plan=plan)
        expected = attention_scores_reference(q, k, q_offset=100, reduce=reduce, group_reduce=group_reduce,
                                 key_valid_len=valid)
        assert_close(actual, expected, name=f"plan {plan} {reduce}/{group_reduce}")


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16), (64, 64)],
                         ids=["M16-N32", "M32-N16", "M64-N64"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_reconstruction_tiles_cross_the_diagonal(block_m, block_n, causal, device):
    """Reconstruction-shaped: 70 queries after 30 context keys. Pass 2's key blocks see masked
    diagonal query tiles, then unmasked interior ones ending in a partial tile; pass 1's splits
    see unmasked key tiles, then masked ones; batch row 1 is padded. Every reduction pair."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 70, 16, generator=generator).to(device)
    k = torch.randn(2, 2, 100, 16, generator=generator).to(device)
    valid = torch.tensor([100, 85], device=device)
    plan = triton_impl.LaunchPlan(block_m=block_m, block_n=block_n, n_splits=2)
    for reduce, group_reduce in REDUCTIONS:
        kwargs = dict(causal=causal, q_offset=30, reduce=reduce, group_reduce=group_reduce)
        actual = triton_impl.attention_scores_triton(q, k, scale=16 ** -0.5, key_valid_len=valid,
                                                     plan=plan, **kwargs)
        expected = attention_scores_reference(q, k, key_valid_len=valid, **kwargs)
        assert_close(actual, expected, name=f"{plan} {reduce}/{group_reduce}")


def test_int64_tile_offsets_give_the_same_scores(monkeypatch, device):
    """The kernels' int64 in-tile offsets (taken when int32 ones could pass 2**31) compute the
    same scores as the int32 ones, in both passes."""
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 50, 16, generator=generator).to(device)
    k = torch.randn(1, 2, 70, 16, generator=generator).to(device)
    narrow = attention_scores(q, k, reduce="max", group_reduce="max", impl="triton")
    monkeypatch.setattr(triton_impl, "_wide_tile_offsets", lambda *args: True)
    wide = attention_scores(q, k, reduce="max", group_reduce="max", impl="triton")
    assert_close(wide, attention_scores_reference(q, k, reduce="max", group_reduce="max"),
                 name="int64 offsets")
    torch.testing.assert_close(wide, narrow, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 1 << 30], ids=["chunk1", "chunk-small", "whole"])
def test_torch_chunking_does_not_change_results(chunk_bytes):
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 50, 16, generator=generator)
    k = torch.randn(1, 2, 80, 16, generator=generator)
    for reduce, group_reduce in REDUCTIONS:
        actual = attention_scores_torch(q, k, scale=0.25, causal=True, q_offset=30, reduce=reduce,
                                        group_reduce=group_reduce, chunk_bytes=chunk_bytes)
        expected = attention_scores_reference(q, k, scale=0.25, q_offset=30, reduce=reduce,
                                 group_reduce=group_reduce)
        assert_close(actual, expected)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@given(case=scoring_cases(max_t_q=64, max_t_k=150))
def test_sum_scores_of_a_head_add_up_to_the_number_of_seeing_queries(impl, case, device):
    """Each row's probabilities sum to 1, so with reduce=sum / group_reduce=mean the scores of a KV
    head add up to the number of queries that see at least one key (T_q without padding)."""
    q, k, kwargs = case
    kwargs.update(reduce="sum", group_reduce="mean")
    t_q, t_k = q.shape[2], k.shape[2]
    scores = attention_scores(q.to(device), k.to(device), impl=impl,
                              **{n: v.to(device) if isinstance(v, torch.Tensor) else v
                                 for n, v in kwargs.items()}).cpu()
    valid = kwargs.get("key_valid_len", torch.full((q.shape[0],), t_k))
    totals = torch.where(torch.isneginf(scores), 0.0, scores).sum(-1)  # [B, H_kv]
    for batch in range(q.shape[0]):
        n_valid = int(valid[batch])
        seeing = t_q if n_valid > 0 else 0
        expected = torch.full_like(totals[batch], float(seeing))
        assert_close(totals[batch], expected, atol=1e-4 * max(1, seeing), rtol=0,
                     name="sum of probabilities")
        assert torch.isneginf(scores[batch, :, n_valid:]).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_results_do_not_depend_on_batch_position(impl, device):
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 20, 16, generator=generator).to(device)
    k = torch.randn(3, 2, 70, 16, generator=generator).to(device)
    valid = torch.tensor([70, 33, 51], device=device)
    together = attention_scores(q, k, key_valid_len=valid, reduce="max", impl=impl)
    for batch in (2, 0, 1):
        alone = attention_scores(q[batch:batch + 1], k[batch:batch + 1],
                                 key_valid_len=valid[batch:batch + 1], reduce="max", impl=impl)
        assert torch.equal(alone, together[batch:batch + 1])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_edge_cases(impl, device):
    generator = torch.Generator().manual_seed(6)
    # T_q = T_k = 1: the single query sees only itself, probability 1.
    q = torch.randn(1, 2, 1, 16, generator=generator).to(device)
    k = torch.randn(1, 1, 1, 16, generator=generator).to(device)
    assert attention_scores(q, k, impl=impl).cpu().tolist() == [[[1.0]]]
    # Causal with q_offset=0 and T_q = 1: the query sees only key 0, so key 0 gets all the mass.
    k = torch.randn(1, 1, 9, 16, generator=generator).to(device)
    scores = attention_scores(q, k, q_offset=0, reduce="sum", impl=impl).cpu()
    assert scores[0, 0, 0] == pytest.approx(1.0, abs=1e-6) and (scores[0, 0, 1:] == 0).all()
    # A key no query sees scores 0; keys past key_valid_len score -inf.
    scores = attention_scores(q, k, q_offset=4, key_valid_len=torch.tensor([7], device=device),
                              impl=impl).cpu()
    assert (scores[0, 0, 5:7] == 0).all() and torch.isneginf(scores[0, 0, 7:]).all()
    # key_valid_len = 0: nothing is valid, nothing is seen.
    scores = attention_scores(q, k, key_valid_len=torch.tensor([0], device=device),
                              impl=impl).cpu()
    assert torch.isneginf(scores).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_large_fp16_logits_do_not_overflow(impl, device):
    """Logits around 1e4 overflow a naive fp16 exp; the kernels subtract the row maximum in fp32."""
    generator = torch.Generator().manual_seed(7)
    q = (torch.randn(1, 2, 8, 32, generator=generator) * 30).half()
    k = (torch.randn(1, 1, 40, 32, generator=generator) * 30).half()
    scores = attention_scores(q.to(device), k.to(device), reduce="max", group_reduce="max",
                              impl=impl).cpu()
    assert torch.isfinite(scores).all()
    assert_close(scores, attention_scores_reference(q, k, reduce="max", group_reduce="max"), dtype=q.dtype)


def test_inputs_are_not_modified(device):
    q = torch.randn(1, 4, 8, 16, device=device)
    k = torch.randn(1, 2, 30, 16, device=device)
    q_before, k_before = q.clone(), k.clone()
    for impl in ("triton", "torch"):
        attention_scores(q, k, impl=impl)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


def _bad(**overrides):
    arguments = dict(q=torch.zeros(2, 4, 3, 8), k=torch.zeros(2, 2, 10, 8)) | overrides
    return arguments.pop("q"), arguments.pop("k"), arguments


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(q=torch.zeros(4, 3, 8)), ValueError,
         r"q must be a 4-D tensor \[B, H_q, T_q, D\], got shape \(4, 3, 8\)"),
        (dict(k=torch.zeros(2, 2, 10)), ValueError,
         r"k must be a 4-D tensor \[B, H_kv, T_k, D\], got shape \(2, 2, 10\)"),
        (dict(k=torch.zeros(3, 2, 10, 8)), ValueError, "k has batch size B 3 in dimension 0, "
                                                       "expected 2"),
        (dict(k=torch.zeros(2, 2, 10, 16)), ValueError, "k has head dim D 16 in dimension 3, "
                                                        "expected 8"),
        (dict(k=torch.zeros(2, 3, 10, 8)), ValueError, "H_q=4 must be a multiple of the number "
                                                       "of KV heads H_kv=3"),
        (dict(q=torch.zeros(2, 4, 3, 8, dtype=torch.int32)), TypeError,
         "q must be float16, bfloat16 or float32, got torch.int32"),
        (dict(k=torch.zeros(2, 2, 10, 8, dtype=torch.float16)), TypeError,
         "q and k must have the same dtype, got torch.float32 and torch.float16"),
        (dict(k=torch.zeros(2, 2, 10, 8, device="meta")), ValueError,
         "q and k must be on the same device, got cpu and meta"),
        (dict(q_offset=-1), ValueError, "q_offset must be >= 0, got -1"),
        (dict(q_offset=8), ValueError, r"q_offset \+ T_q must be <= T_k .* got q_offset=8, "
                                       "T_q=3, T_k=10"),
        (dict(q=torch.zeros(2, 4, 11, 8)), ValueError, "default q_offset needs T_q <= T_k, got "
                                                       "T_q=11 and T_k=10"),
        (dict(reduce="min"), ValueError, "reduce must be one of 'mean', 'sum' or 'max', got 'min'"),
        (dict(group_reduce="sum"), ValueError,
         "group_reduce must be one of 'mean' or 'max', got 'sum'"),
        (dict(scale=0.0), ValueError, r"scale must be a finite float > 0 .*got 0.0"),
        (dict(key_valid_len=torch.tensor([10, 11])), ValueError,
         r"key_valid_len must lie in \[0, T_k=10\], got values in \[10, 11\]"),
        (dict(key_valid_len=torch.tensor([10])), ValueError,
         "key_valid_len has batch size B 1 in dimension 0, expected 2"),
        (dict(key_valid_len=torch.tensor([1.0, 2.0])), TypeError,
         "key_valid_len must be int32 or int64, got torch.float32"),
        (dict(lse=torch.zeros(2, 4, 2)), ValueError,
         r"lse must have shape \[B, H_q, T_q\] = \(2, 4, 3\), got \(2, 4, 2\)"),
        (dict(lse=torch.zeros(2, 4, 3, dtype=torch.float16)), TypeError,
         "lse must be float32, got torch.float16"),
        (dict(impl="cuda"), ValueError, "impl must be one of 'triton', 'torch' or None"),
        ({"softcap": 0.0}, ValueError, r"softcap must be a finite float > 0 .*got 0.0"),
        ({"softcap": -1}, ValueError, r"softcap must be a finite float > 0 .*got -1.0"),
        ({"softcap": math.inf}, ValueError, r"softcap must be a finite float > 0 .*got inf"),
        ({"softcap": True}, TypeError, "softcap must be a float, got bool True"),
        ({"softcap": "50"}, TypeError, "softcap must be a float, got str '50'"),
        ({"sinks": torch.zeros(2)}, ValueError,
         r"sinks must have shape \[H_q\] = \(4,\) \(one logit per query head\), got \(2,\)"),
        ({"sinks": torch.zeros(1, 4)}, ValueError,
         r"sinks must be a 1-D tensor \[H_q\], got shape \(1, 4\)"),
        ({"sinks": torch.zeros(4, dtype=torch.int64)}, TypeError,
         "sinks must be float16, bfloat16, float32 or float64, got torch.int64"),
        ({"sinks": [0.0] * 4}, TypeError, "sinks must be a torch.Tensor, got list"),
        ({"sinks": torch.zeros(4, device="meta")}, ValueError,
         "q and sinks must be on the same device, got cpu and meta"),
        ({"window": 0}, ValueError, "window must be >= 1, got 0"),
        ({"window": 2**31}, ValueError, "window must be <= 2147483647, got 2147483648"),
        ({"window": True}, TypeError, "window must be an int, got bool True"),
        ({"window": 4.0}, TypeError, "window must be an int, got float 4.0"),
        ({"window": 4, "causal": False}, ValueError,
         "window=4 needs causal=True .* got causal=False"),
    ],
    ids=["q-rank", "k-rank", "batch", "head-dim", "gqa", "q-dtype", "dtype-mismatch", "device",
         "offset-negative", "offset-past-end", "tq-gt-tk", "reduce", "group-reduce", "scale",
         "valid-len-range", "valid-len-batch", "valid-len-dtype", "lse-shape", "lse-dtype", "impl",
         "softcap-zero", "softcap-negative", "softcap-inf", "softcap-bool", "softcap-str",
         "sinks-shape", "sinks-rank", "sinks-dtype", "sinks-list", "sinks-device", "window-zero",
         "window-past-int32", "window-bool", "window-float", "window-noncausal"],
)
def test_bad_input_raises_before_running(overrides, error, message):
    q, k, kwargs = _bad(**overrides)
    with pytest.raises(error, match=message):
        attention_scores(q, k, **kwargs)


def test_noncausal_queries_longer_than_keys_are_fine(device):
    q = torch.randn(1, 2, 12, 16, device=device)
    k = torch.randn(1, 2, 5, 16, device=device)
    scores = attention_scores(q, k, causal=False, reduce="sum", impl="triton").cpu()
    assert_close(scores.sum(-1), torch.full((1, 2), 12.0), atol=1e-4, rtol=0)
    assert math.isfinite(float(scores.max()))


# ------------------------------------------------------------- softcap, sinks, sliding window

@st.composite
def feature_cases(draw, max_t_q=48, max_t_k=140):
    """A scoring case (always causal) with soft-capping, sinks and a sliding window, each on or
    off: windows of 1, around a block size, about T and past T; sinks from very negative to very
    large; caps that bite (0.5) and that barely do (30)."""
    q, k, kwargs = draw(scoring_cases(max_t_q=max_t_q, max_t_k=max_t_k))
    t_k, h_q = k.shape[2], q.shape[1]
    if not kwargs["causal"]:
        kwargs["q_offset"] = None
        kwargs["causal"] = True
        if q.shape[2] > t_k:
            q = q[:, :, :t_k]
    kwargs["softcap"] = draw(st.sampled_from([None, 0.5, 2.0, 30.0]))
    kwargs["window"] = draw(st.none() | st.sampled_from([1, 2, 15, 16, 17, 31, 33, t_k, t_k + 5])
                            | st.integers(1, t_k + 2))
    sinks = draw(st.sampled_from([None, "normal", "large", "very_negative", "mixed"]))
    if sinks is not None:
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        values = {"normal": torch.randn(h_q, generator=generator) * 2,
                  "large": torch.full((h_q,), 40.0),
                  "very_negative": torch.full((h_q,), -80.0),
                  "mixed": torch.tensor([-float("inf"), 3.0, -2.0, 60.0]).repeat(h_q)[:h_q]}[sinks]
        kwargs["sinks"] = values.to(draw(st.sampled_from([torch.float32, torch.bfloat16,
                                                          torch.float64])))
    return q, k, kwargs


def _on(device, kwargs):
    return {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()}


@pytest.mark.parametrize("impl", ["triton", "torch"])
@given(case=feature_cases())
def test_features_match_reference(impl, case, device):
    """softcap, sinks and window, alone and together, with every shape, layout, dtype, GQA ratio,
    reduction and padding the plain cases draw (key_valid_len 0: fully masked rows)."""
    q, k, kwargs = case
    expected = attention_scores_reference(q, k, **kwargs)
    actual = attention_scores(q.to(device), k.to(device), impl=impl, **_on(device, kwargs))
    assert_close(actual, expected, dtype=q.dtype, name=f"attention_scores{kwargs}")


@pytest.mark.parametrize("block_m, block_n, n_splits", [(16, 32, 1), (16, 32, 5), (32, 16, 3)],
                         ids=["M16-N32-splits1", "M16-N32-splits5", "M32-N16-splits3"])
def test_window_plans_agree(block_m, block_n, n_splits, device):
    """The window's skipped, masked and unmasked key tiles (pass 1) and query tiles (pass 2) at
    every split count and tile shape: T not a multiple of the tiles, windows of 1 (a query sees
    only itself), below, at and above a tile, a padded batch row, GQA 3, soft-capped or not."""
    generator = torch.Generator().manual_seed(8)
    q = torch.randn(2, 6, 45, 16, generator=generator).to(device)
    k = torch.randn(2, 2, 131, 16, generator=generator).to(device)
    valid = torch.tensor([131, 90], device=device)
    sinks = torch.randn(6, generator=generator).to(device)
    plan = triton_impl.LaunchPlan(block_m=block_m, block_n=block_n, n_splits=n_splits)
    for window, softcap, (reduce, group_reduce) in [(1, None, ("sum", "mean")),
                                                     (7, 1.5, ("max", "max")),
                                                     (33, None, ("mean", "max")),
                                                     (70, 0.7, ("max", "mean"))]:
        kwargs = {"causal": True, "q_offset": 80, "reduce": reduce, "group_reduce": group_reduce,
                      "key_valid_len": valid, "softcap": softcap, "window": window, "sinks": sinks}
        actual = triton_impl.attention_scores_triton(q, k, scale=16 ** -0.5, plan=plan, **kwargs)
        expected = attention_scores_reference(q, k, **kwargs)
        assert_close(actual, expected, name=f"{plan} window={window} softcap={softcap}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_feature_edge_cases(impl, device):
    generator = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 20, 16, generator=generator).to(device)
    k = torch.randn(1, 2, 50, 16, generator=generator).to(device)
    plain = attention_scores(q, k, reduce="sum", impl=impl).cpu()
    # window 1: each query sees only itself, so key 30 + i gets mass 1 from query i, others 0.
    scores = attention_scores(q, k, reduce="sum", window=1, impl=impl).cpu()
    assert_close(scores, (torch.arange(50) >= 30).float().expand(1, 2, 50), atol=1e-6, rtol=0,
                 name="window=1")
    # A window that reaches key 0 from every query masks nothing.
    for window in (50, 51, 10**6):
        assert_close(attention_scores(q, k, reduce="sum", window=window, impl=impl).cpu(), plain,
                     atol=1e-6, rtol=1e-6, name=f"window={window}")
    # Sinks: -inf is no sink (exactly), very negative is none in float32, +inf takes all the mass,
    # very large leaves the keys almost nothing.
    for value, expected in [(-float("inf"), plain), (-200.0, plain), (float("inf"), plain * 0)]:
        sinks = torch.full((4,), value, device=device)
        assert_close(attention_scores(q, k, reduce="sum", sinks=sinks, impl=impl).cpu(), expected,
                     atol=1e-6, rtol=1e-6, name=f"sinks={value}")
    large = attention_scores(q, k, reduce="sum", sinks=torch.full((4,), 60.0, device=device),
                             impl=impl).cpu()
    assert (large >= 0).all() and float(large.max()) < 1e-15
    # softcap: capped logits lie in (-softcap, softcap), so a tiny cap makes each row uniform:
    # query i sees keys 0..i with 1 / (i + 1) each, and key j's largest is 1 / (j + 1).
    scores = attention_scores(q, k, q_offset=0, reduce="max", group_reduce="max", softcap=1e-6,
                              impl=impl).cpu()
    expected = torch.where(torch.arange(50) < 20, 1.0 / (torch.arange(50) + 1.0), 0.0)
    assert_close(scores, expected.expand(1, 2, 50), atol=1e-5, rtol=0, name="softcap=1e-6")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_given_lse_is_over_the_keys_and_the_op_folds_the_sinks(impl, device):
    """A caller's lse (keys only, soft-capped, windowed) with sinks gives the scores the op
    computes itself."""
    generator = torch.Generator().manual_seed(10)
    q = torch.randn(2, 4, 12, 16, generator=generator)
    k = torch.randn(2, 2, 40, 16, generator=generator)
    sinks = torch.randn(4, generator=generator)
    logits = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    logits = 2.0 * torch.tanh(logits / 2.0)
    key_pos, query_pos = torch.arange(40), 28 + torch.arange(12)
    visible = (key_pos <= query_pos[:, None]) & (key_pos > query_pos[:, None] - 9)
    lse = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), dim=-1).float()
    kwargs = {"reduce": "max", "softcap": 2.0, "window": 9, "sinks": sinks}
    expected = attention_scores_reference(q, k, **kwargs)
    actual = attention_scores(q.to(device), k.to(device), lse=lse.to(device), impl=impl,
                              **_on(device, kwargs))
    assert_close(actual, expected, name="lse + sinks")


def test_transformers_eager_softcap_sinks_and_window(device):
    """The probabilities transformers' own eager attention computes — Gemma 2's soft-capping and
    gpt-oss's sinks, each with a sliding-window mask from transformers' mask functions — summed
    over queries and averaged over each GQA group are the scores."""
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from proxykv.testing.eager import eager_attention_case

    case = eager_attention_case(11, length=37, window=9)
    q, k, v, mask, sinks, module = case.q, case.k, case.v, case.mask, case.sinks, case.module
    b, h_q, h_kv, t, d, window = case.b, case.h_q, case.h_kv, case.t, case.d, case.window
    _, gemma_probs = gemma2.eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5,
                                                    softcap=3.0)
    _, oss_probs = gpt_oss.eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    for probs, kwargs in [(gemma_probs, {"softcap": 3.0}), (oss_probs, {"sinks": sinks})]:
        expected = probs.sum(dim=2).view(b, h_kv, h_q // h_kv, t).mean(dim=2)
        kwargs = {name: value.float() if isinstance(value, torch.Tensor) else value
                  for name, value in kwargs.items()}
        for impl in ("triton", "torch"):
            actual = attention_scores(q.float().to(device), k.float().to(device), reduce="sum",
                                      window=window, impl=impl, **_on(device, kwargs))
            assert_close(actual, expected, atol=1e-4, rtol=1e-4,
                         name=f"transformers eager {kwargs.keys()} ({impl})")
