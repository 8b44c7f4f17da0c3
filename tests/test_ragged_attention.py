"""ragged_attention: a chunk of new tokens over a per-head compacted cache. Triton (interpreted or
compiled, single- and multi-split, several query blocks), torch and the dispatcher against the
per-query reference; causal SDPA when nothing was pruned; the T_new = 1 case against decode; LSE
merging; bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import proxykv.kernels.attend.triton_impl as ragged_triton
from proxykv.kernels import gather_kv_ragged, ragged_attention, ragged_decode_attention
from proxykv.kernels.attend.reference import ragged_attention_reference
from proxykv.selection import Selection
from proxykv.testing import assert_close
from proxykv.testing import strategies as pst
from proxykv.testing.assertions import TOLERANCES

IMPLS = ["torch", "triton", None]


@st.composite
def attention_cases(draw):
    """Segments whose valid lengths are all >= T_new, some with spare room holding NaN."""
    b = draw(st.integers(1, 2))
    h_kv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 8]))
    d = draw(st.sampled_from([16, 64, 128, 256]))
    num_new = draw(st.sampled_from([1, 2, 5, 16, 33]) | st.integers(1, 200))
    # Keep interpreted runs small: the longest context shrinks as the query chunk grows.
    context_cap = max(1, 4000 // (num_new * group))
    contexts = draw(st.lists(st.sampled_from([0, 1, 31, 32, 33]) | st.integers(0, min(
        context_cap, 150)), min_size=b * h_kv, max_size=b * h_kv))
    lengths = [c + num_new for c in contexts]
    spare = draw(st.lists(st.integers(0, 3), min_size=b * h_kv, max_size=b * h_kv)) \
        if draw(st.booleans()) else None
    return dict(b=b, h_q=h_kv * group, d=d, num_new=num_new, lengths=lengths, spare=spare,
                scale=draw(st.sampled_from([None, 0.3])), dtype=draw(pst.dtypes()),
                layout=draw(st.sampled_from(["contiguous", "strided"])),
                seed=draw(st.integers(0, 10_000)))


def _build(case, device):
    generator = torch.Generator().manual_seed(case["seed"])
    lengths, spare, dtype, d = case["lengths"], case["spare"], case["dtype"], case["d"]
    rooms = [n + (spare[i] if spare else 0) for i, n in enumerate(lengths)]
    cu_seqlens = torch.tensor([0] + torch.tensor(rooms).cumsum(0).tolist(), dtype=torch.int32)
    rows = int(cu_seqlens[-1])
    shape_q = (case["b"], case["h_q"], case["num_new"], d)

    def storage(*shape):  # cast and move the whole storage, then take views: strides survive
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    if case["layout"] == "contiguous":
        k, v, q = storage(rows, d), storage(rows, d), storage(*shape_q)
    else:  # slices of wider buffers, and q stored [T_new, B, H_q, D]
        k = storage(rows, d + 5)[:, 2:d + 2]
        v = storage(rows, 2 * d)[:, ::2]
        q = storage(shape_q[2], shape_q[0], shape_q[1], d).permute(1, 2, 0, 3)
    if spare:  # garbage in the spare room must never leak into the output
        for s, n in enumerate(lengths):
            k[int(cu_seqlens[s]) + n:int(cu_seqlens[s + 1])] = float("nan")
            v[int(cu_seqlens[s]) + n:int(cu_seqlens[s + 1])] = float("nan")
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device) if spare else None
    return q, k, v, cu_seqlens.to(device), seq_lens


def _reference(q, k, v, cu_seqlens, seq_lens, scale=None):
    return ragged_attention_reference(q.cpu(), k.cpu(), v.cpu(), cu_seqlens.cpu(),
                                      seq_lens=None if seq_lens is None else seq_lens.cpu(),
                                      scale=scale, return_lse=True)


def _assert_lse_close(actual, expected, atol=None):
    assert actual.dtype == torch.float32
    assert torch.equal(actual.isneginf().cpu(), expected.isneginf())
    finite = ~expected.isneginf()
    torch.testing.assert_close(actual.cpu()[finite], expected[finite], rtol=1e-5,
                               atol=max(1e-5, atol or 0.0))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl={i}")
@given(case=attention_cases())
def test_ragged_attention_matches_reference(impl, case, device):
    q, k, v, cu_seqlens, seq_lens = _build(case, device)
    out, lse = ragged_attention(q, k, v, cu_seqlens, seq_lens=seq_lens, scale=case["scale"],
                                return_lse=True, impl=impl)
    expected, expected_lse = _reference(q, k, v, cu_seqlens, seq_lens, case["scale"])
    assert out.shape == q.shape and out.dtype == case["dtype"] and out.is_contiguous()
    out_atol = lse_atol = None
    if case["dtype"] == torch.float32 and k.numel():
        # A float32 dot of length D is off by about sqrt(D) * 2**-23 * |q| |k| (rounding errors
        # add up like a random walk); the logit by `scale` times that, the LSE by as much, and the
        # output (a softmax-weighted mean of the values) by the logit's error times the largest
        # |v|, twice over (the weight's own error and the normaliser's). Past the table's 1e-5
        # only for long heads with large scales (D = 256 at scale 0.3: ~1e-4).
        d = q.shape[-1]
        scale = d ** -0.5 if case["scale"] is None else case["scale"]
        logit_error = d ** 0.5 * 2.0 ** -23 * scale * float(q.float().norm(dim=-1).max()) * \
            float(k.float().norm(dim=-1).max())
        lse_atol = max(TOLERANCES[torch.float32][0], logit_error)
        out_atol = max(TOLERANCES[torch.float32][0],
                       2 * logit_error * float(v.float().abs().max()))
    assert_close(out, expected, dtype=case["dtype"], atol=out_atol,
                 name=f"ragged_attention[{case['dtype']}]")
    _assert_lse_close(lse, expected_lse, lse_atol)


@pytest.mark.parametrize("keys_per_split", [32, 64, 96, 512], ids=lambda n: f"split={n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).replace("torch.", ""))
def test_every_split_plan_gives_the_same_result(keys_per_split, dtype, device):
    """Many splits (merge kernel), one split (direct epilogue), idle splits past every segment's
    end, and several query blocks (T_new × G = 40 rows > 16 per block) all agree."""
    case = dict(b=2, h_q=8, d=32, num_new=10, lengths=[10, 140, 11, 64], spare=[3, 0, 0, 2],
                scale=None, dtype=dtype, layout="strided", seed=4)
    q, k, v, cu_seqlens, seq_lens = _build(case, device)
    max_seq_len = 200
    on_gpu = q.is_cuda
    block_n = ragged_triton.gpu_tile(dtype)[0] if on_gpu else 32
    keys_per_split = -(-keys_per_split // block_n) * block_n
    plan = ragged_triton.plan_ragged_attention(max_seq_len, 4, 40, 32, dtype, on_gpu,
                                               keys_per_split=keys_per_split)
    plan = ragged_triton.RaggedAttentionPlan(16, plan.block_n, plan.keys_per_split,
                                             plan.num_splits, num_stages=plan.num_stages)
    out, lse = ragged_triton.ragged_attention_triton(q, k, v, cu_seqlens, seq_lens,
                                                     scale=32 ** -0.5, max_seq_len=max_seq_len,
                                                     return_lse=True, plan=plan)
    expected, expected_lse = _reference(q, k, v, cu_seqlens, seq_lens)
    assert_close(out, expected, dtype=dtype, name=f"{plan}")
    _assert_lse_close(lse, expected_lse)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16],
                         ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (8, 2)], ids=["MHA", "GQA4"])
def test_nothing_pruned_equals_causal_sdpa(impl, dtype, h_q, h_kv, device):
    """A cache that keeps every position, the last T_new of them the new tokens: the result is
    causal attention of the last T_new queries of a prefill."""
    b, t, num_new, d = 2, 90, 20, 32
    generator = torch.Generator().manual_seed(5)
    q_all = torch.randn(b, h_q, t, d, generator=generator).to(dtype=dtype, device=device)
    k = torch.randn(b, h_kv, t, d, generator=generator).to(dtype=dtype, device=device)
    v = torch.randn(b, h_kv, t, d, generator=generator).to(dtype=dtype, device=device)
    group = h_q // h_kv
    expected = F.scaled_dot_product_attention(
        q_all.double(), k.double().repeat_interleave(group, 1),
        v.double().repeat_interleave(group, 1), is_causal=True)[:, :, -num_new:]
    cu_seqlens = torch.arange(0, b * h_kv * t + 1, t, dtype=torch.int32, device=device)
    out = ragged_attention(q_all[:, :, -num_new:], k.reshape(-1, d), v.reshape(-1, d), cu_seqlens,
                           impl=impl)
    assert_close(out, expected, dtype=dtype, name="ragged_attention vs causal SDPA")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_new_token_equals_decode(impl, device):
    case = dict(b=2, h_q=6, d=24, num_new=1, lengths=[1, 70, 33, 5, 2, 128], spare=[0, 3] * 3,
                scale=0.5, dtype=torch.float32, layout="strided", seed=9)
    q, k, v, cu_seqlens, seq_lens = _build(case, device)
    out = ragged_attention(q, k, v, cu_seqlens, seq_lens=seq_lens, scale=0.5, impl=impl)
    decoded = ragged_decode_attention(q[:, :, 0], k, v, cu_seqlens, seq_lens=seq_lens, scale=0.5,
                                      impl=impl)
    torch.testing.assert_close(out[:, :, 0], decoded, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_lse_merges_attention_over_two_parts_exactly(impl, device):
    """The LSE is what merging needs: attention over the first half of the context (which every
    new token sees whole) merged with attention over the rest and the new tokens equals attention
    over all of it."""
    b, h_q, h_kv, context, num_new, d = 1, 4, 2, 64, 6, 16
    generator = torch.Generator().manual_seed(3)
    k = torch.randn(h_kv, context + num_new, d, generator=generator).to(device)
    v = torch.randn(h_kv, context + num_new, d, generator=generator).to(device)
    q = torch.randn(b, h_q, num_new, d, generator=generator).to(device)

    def attend(queries, keys, values):
        bounds = torch.arange(0, h_kv + 1, dtype=torch.int32, device=device) * keys.shape[1]
        return ragged_attention(queries, keys.reshape(-1, d), values.reshape(-1, d), bounds,
                                return_lse=True, impl=impl)

    full, _ = attend(q, k, v)
    half = context // 2
    # One query at a time over the first half: with T_new = 1 a query sees every row.
    firsts = [attend(q[:, :, t:t + 1], k[:, :half], v[:, :half]) for t in range(num_new)]
    out_1, lse_1 = (torch.cat(parts, 2) for parts in zip(*firsts))
    out_2, lse_2 = attend(q, k[:, half:], v[:, half:])
    top = torch.maximum(lse_1, lse_2)
    w_1, w_2 = torch.exp(lse_1 - top), torch.exp(lse_2 - top)
    merged = (w_1[..., None] * out_1 + w_2[..., None] * out_2) / (w_1 + w_2)[..., None]
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gather_then_attend_equals_dense_attention_over_kept_positions(impl, device):
    """Context pruned per head (budgets 0 … all), then T_new new tokens appended: equals dense
    attention whose mask is the kept context plus the causal part of the new tokens."""
    b, h_q, h_kv, t, num_new, d = 1, 6, 3, 120, 7, 16
    generator = torch.Generator().manual_seed(12)
    k = torch.randn(b, h_kv, t + num_new, d, generator=generator).to(device)
    v = torch.randn(b, h_kv, t + num_new, d, generator=generator).to(device)
    q = torch.randn(b, h_q, num_new, d, generator=generator).to(device)
    budgets = torch.tensor([0.0, 0.1, 1.0])[None, None, :, None]
    kept = torch.rand(b, 1, h_kv, t, generator=generator) < budgets
    mask = torch.cat([kept, torch.ones(b, 1, h_kv, num_new, dtype=torch.bool)], -1)
    view = Selection.from_mask(mask).layer(0)
    k_packed, v_packed = gather_kv_ragged(k, v, view.indices.to(device),
                                          view.cu_seqlens.to(device), impl=impl)
    out = ragged_attention(q, k_packed, v_packed, view.cu_seqlens.to(device), impl=impl)
    group = h_q // h_kv
    visible = mask[:, 0].repeat_interleave(group, 1)[:, :, None, :].expand(-1, -1, num_new, -1)
    causal = torch.ones(num_new, t + num_new, dtype=torch.bool).tril(t)
    expected = F.scaled_dot_product_attention(
        q.double().cpu(), k.double().cpu().repeat_interleave(group, 1),
        v.double().cpu().repeat_interleave(group, 1), attn_mask=visible & causal)
    assert_close(out, expected, dtype=torch.float32, name="ragged attention vs dense masked")


def _small_inputs(device, lengths=(5, 3), num_new=3):
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                              device=device)
    rows = int(cu_seqlens[-1])
    q = torch.randn(1, 4, num_new, 8, device=device)
    return q, torch.randn(rows, 8, device=device), torch.randn(rows, 8, device=device), cu_seqlens


@pytest.mark.parametrize("change,error,message", [
    (dict(q=torch.randn(1, 4, 0, 8)), ValueError, "q must have T_new >= 1"),
    (dict(q=torch.randn(3, 4, 3, 8)), ValueError, "cu_seqlens must have B \\* H_kv \\+ 1"),
    (dict(q=torch.randn(1, 3, 3, 8)), ValueError, "multiple of the number of KV heads"),
    (dict(q=torch.randn(1, 4, 8)), ValueError, "q must be a 4-D tensor"),
    (dict(q=torch.randn(1, 4, 3, 8).double()), TypeError, "q must be float16"),
    (dict(num_kv_heads=1), ValueError, "q and cu_seqlens disagree"),
    (dict(q=torch.randn(1, 4, 4, 8)), ValueError, "cu_seqlens\\[1\\] \\(segment b=0, h=1\\) holds 3 "
                                                  "valid rows, fewer than T_new = 4"),
    (dict(seq_lens=torch.tensor([5, 2])), ValueError, "seq_lens\\[1\\] .* fewer than T_new = 3"),
    (dict(scale=0), ValueError, "scale must be a finite float > 0"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
    (dict(max_seq_len=2), ValueError, "max_seq_len must be >= 3"),
], ids=["T_new-0", "batch", "gqa", "rank", "dtype", "num_kv_heads", "short-segment",
        "short-seq_lens", "scale", "return_lse", "max_seq_len"])
def test_bad_input_names_the_argument(change, error, message, device):
    q, k, v, cu_seqlens = _small_inputs(device)
    arguments = dict(q=q, k_packed=k, v_packed=v, cu_seqlens=cu_seqlens)
    arguments.update({name: value.to(device) if isinstance(value, torch.Tensor) else value
                      for name, value in change.items()})
    with pytest.raises(error, match=message):
        ragged_attention(**arguments)


def test_int64_metadata_attends_like_int32(device):
    q, k, v, cu_seqlens = _small_inputs(device)
    seq_lens = torch.tensor([4, 3], device=device)
    torch.testing.assert_close(
        ragged_attention(q, k, v, cu_seqlens.long(), seq_lens=seq_lens),
        ragged_attention(q, k, v, cu_seqlens, seq_lens=seq_lens.int()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 8, 64])
def test_plans_keep_the_grid_and_the_accumulator_within_limits(dtype, head_dim, group):
    """A 1M-token segment, 128 new tokens, 1024 segments: the grid's axis 1 (splits) stays within
    65,535 and a program's accumulator within ACCUMULATOR_ELEMENTS, whatever the group size."""
    plan = ragged_triton.plan_ragged_attention(1 << 20, 1024, 128 * group, head_dim, dtype, True)
    assert plan.num_splits <= 65_535
    assert ragged_triton.block_d(head_dim) * plan.block_m <= ragged_triton.ACCUMULATOR_ELEMENTS
    assert plan.block_m >= 16
