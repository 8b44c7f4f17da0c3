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
    ],
    ids=["q-rank", "k-rank", "batch", "head-dim", "gqa", "q-dtype", "dtype-mismatch", "device",
         "offset-negative", "offset-past-end", "tq-gt-tk", "reduce", "group-reduce", "scale",
         "valid-len-range", "valid-len-batch", "valid-len-dtype", "lse-shape", "lse-dtype", "impl"],
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
