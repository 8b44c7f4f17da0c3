"""ragged_decode_attention: Triton (interpreted or compiled, single- and multi-split), torch and the
dispatcher against the per-head reference and against dense attention restricted to each head's
kept positions; both metadata layouts (packed, with spare room); GQA; empty segments; bad input."""


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import proxykv.kernels.attend.triton_impl as decode_triton
from proxykv.kernels import gather_kv_ragged, ragged_decode_attention
from proxykv.kernels.attend.reference import ragged_decode_attention_reference
from proxykv.selection import Selection
from proxykv.testing import assert_close
from proxykv.testing import strategies as pst

IMPLS = ["torch", "triton", None]


def dense_restricted_attention(q, k, v, mask, scale=None):
    """Dense softmax attention of ``q [B, H_q, D]`` over ``k, v [B, H_kv, T, D]`` where only
    ``mask [B, H_kv, T]`` positions are visible, in float64; zeros where nothing is visible."""
    group = q.shape[1] // k.shape[1]
    expand = lambda t: t.double().cpu().repeat_interleave(group, dim=1)
    visible = mask.cpu().repeat_interleave(group, dim=1)[:, :, None, :]
    out = F.scaled_dot_product_attention(q.double().cpu()[:, :, None], expand(k), expand(v),
                                         attn_mask=visible, scale=scale)[:, :, 0]
    return torch.where(visible[:, :, 0].any(-1, keepdim=True), out, 0.0)


def _lengths_strategy(count: int):
    return st.lists(st.sampled_from([0, 1, 2, 31, 32, 33, 64, 65]) | st.integers(0, 200),
                    min_size=count, max_size=count)


@st.composite
def decode_cases(draw):
    b = draw(st.integers(1, 2))
    h_q, h_kv = draw(pst.gqa_heads(max_kv_heads=2))
    d = draw(st.sampled_from([8, 16, 24, 64]))
    lengths = draw(_lengths_strategy(b * h_kv))
    spare = draw(st.lists(st.integers(0, 4), min_size=b * h_kv, max_size=b * h_kv)) \
        if draw(st.booleans()) else None
    scale = draw(st.sampled_from([None, 0.3, 1.0]))
    return (b, h_q, h_kv, d, lengths, spare, scale, draw(pst.dtypes()),
            draw(st.sampled_from(["contiguous", "strided"])), draw(st.integers(0, 10_000)))


def _build(case, device):
    b, h_q, _, d, lengths, spare, scale, dtype, layout, seed = case
    generator = torch.Generator().manual_seed(seed)
    rooms = [n + (spare[i] if spare else 0) for i, n in enumerate(lengths)]
    cu_seqlens = torch.tensor([0] + torch.tensor(rooms).cumsum(0).tolist(), dtype=torch.int32)
    rows = int(cu_seqlens[-1])

    def storage(*shape):  # cast and move the whole storage, then take views: strides survive
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    if layout == "contiguous":
        k, v, q = storage(rows, d), storage(rows, d), storage(b, h_q, d)
    else:  # slices of wider buffers, and q stored [H_q, B, D]
        k = storage(rows, d + 5)[:, 2:d + 2]
        v = storage(rows, 2 * d)[:, ::2]
        q = storage(h_q, b, d).transpose(0, 1)
    if spare:  # garbage in the spare room must never leak into the output
        for s, n in enumerate(lengths):
            k[int(cu_seqlens[s]) + n:int(cu_seqlens[s + 1])] = float("nan")
            v[int(cu_seqlens[s]) + n:int(cu_seqlens[s + 1])] = float("nan")
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device) if spare else None
    return q, k, v, cu_seqlens.to(device), seq_lens, scale, dtype


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl={i}")
@given(case=decode_cases())
def test_ragged_decode_matches_reference(impl, case, device):
    q, k, v, cu_seqlens, seq_lens, scale, dtype = _build(case, device)
    out = ragged_decode_attention(q, k, v, cu_seqlens, seq_lens=seq_lens, scale=scale, impl=impl)
    expected = ragged_decode_attention_reference(q.cpu(), k.cpu(), v.cpu(), cu_seqlens.cpu(),
                                                 seq_lens=None if seq_lens is None else
                                                 seq_lens.cpu(), scale=scale)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, expected, dtype=dtype, name=f"ragged_decode[{dtype}]")


@pytest.mark.parametrize("keys_per_split", [32, 64, 96, 256], ids=lambda n: f"split={n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).replace("torch.", ""))
def test_every_split_plan_gives_the_same_result(keys_per_split, dtype, device):
    """Many splits (merge kernel), one split (direct epilogue) and more splits than any segment
    needs (idle programs) all agree with the reference."""
    case = (2, 8, 2, 32, [0, 130, 1, 64], [3, 0, 0, 2], None, dtype, "strided", 4)
    q, k, v, cu_seqlens, seq_lens, _, _ = _build(case, device)
    max_seq_len = 200  # longer than any segment: splits past every segment's end stay idle
    on_gpu = q.is_cuda
    block_n = decode_triton.gpu_tile(dtype)[0] if on_gpu else 32
    keys_per_split = -(-keys_per_split // block_n) * block_n
    plan = decode_triton.plan_ragged_attention(max_seq_len, 4, 4, 32, dtype, on_gpu,
                                               keys_per_split=keys_per_split)
    out = decode_triton.ragged_decode_attention_triton(q, k, v, cu_seqlens, seq_lens,
                                                       scale=32 ** -0.5, max_seq_len=max_seq_len,
                                                       plan=plan)
    expected = ragged_decode_attention_reference(q.cpu(), k.cpu(), v.cpu(), cu_seqlens.cpu(),
                                                 seq_lens=seq_lens.cpu())
    assert_close(out, expected, dtype=dtype, name=f"{plan}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16],
                         ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("layout", pst.LAYOUTS)
def test_gather_then_decode_equals_dense_attention_over_kept_positions(impl, dtype, layout,
                                                                       device):
    b, h_q, h_kv, t, d = 2, 6, 3, 150, 32
    generator = torch.Generator().manual_seed(11)
    k = pst.make_bhtd((b, h_kv, t, d), dtype, layout, generator, device)
    v = pst.make_bhtd((b, h_kv, t, d), dtype, layout, generator, device)
    q = torch.randn(b, h_q, d, generator=generator).to(dtype=dtype, device=device)
    # Per-head budgets: 0 (empty), a few, about half, everything.
    budgets = torch.tensor([[0.0, 0.05, 0.5], [1.0, 0.3, 0.02]])[:, None, :, None]
    mask = torch.rand(b, 1, h_kv, t, generator=generator) < budgets
    view = Selection.from_mask(mask).layer(0)
    k_packed, v_packed = gather_kv_ragged(k, v, view.indices.to(device),
                                          view.cu_seqlens.to(device), impl=impl)
    out = ragged_decode_attention(q, k_packed, v_packed, view.cu_seqlens.to(device), impl=impl)
    expected = dense_restricted_attention(q, k, v, mask[:, 0])
    assert_close(out, expected, dtype=dtype, name="ragged decode vs dense masked attention")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_all_segments_empty_gives_zeros(impl, device):
    q = torch.randn(2, 4, 16, device=device)
    empty = torch.zeros(0, 16, device=device)
    cu_seqlens = torch.zeros(2 * 2 + 1, dtype=torch.int32, device=device)
    out = ragged_decode_attention(q, empty, empty, cu_seqlens, impl=impl)
    assert torch.equal(out.cpu(), torch.zeros(2, 4, 16))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_kept_row_returns_its_value(impl, device):
    v_row = torch.randn(1, 8)
    q = torch.randn(1, 2, 8)
    out = ragged_decode_attention(q.to(device), torch.randn(1, 8, device=device),
                                  v_row.to(device), torch.tensor([0, 1], dtype=torch.int32,
                                                                 device=device), impl=impl)
    assert_close(out.cpu(), v_row.expand(1, 2, 8).reshape(1, 2, 8))


def test_impl_none_runs_the_triton_kernel_under_the_interpreter(monkeypatch, device):
    calls = []
    original = decode_triton.ragged_decode_attention_triton

    def spy(*args, **kwargs):
        calls.append(kwargs["max_seq_len"])
        return original(*args, **kwargs)

    monkeypatch.setattr(decode_triton, "ragged_decode_attention_triton", spy)
    cu_seqlens = torch.tensor([0, 3, 10], dtype=torch.int32, device=device)
    ragged_decode_attention(torch.randn(1, 2, 8, device=device), torch.randn(10, 8, device=device),
                            torch.randn(10, 8, device=device), cu_seqlens)
    assert calls == [7]


def test_inputs_are_not_modified(device):
    q, k, v = (torch.randn(1, 4, 8, device=device), torch.randn(9, 8, device=device),
               torch.randn(9, 8, device=device))
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([2, 5], dtype=torch.int32, device=device)
    before = [t.clone() for t in (q, k, v, cu_seqlens, seq_lens)]
    for impl in ("torch", "triton"):
        ragged_decode_attention(q, k, v, cu_seqlens, seq_lens=seq_lens, impl=impl)
    for original, now in zip(before, (q, k, v, cu_seqlens, seq_lens)):
        assert torch.equal(original, now)


# ---------------------------------------------- softcap, sinks, sliding window (both entry points)

@st.composite
def feature_cases(draw):
    """Ragged segments (some empty in decode, every one >= T_new rows for a chunk) with spare room
    holding NaN, ascending original positions with gaps (the new tokens' consecutive at the end of
    each segment), and soft-capping, sinks and a window each on or off."""
    b = draw(st.integers(1, 2))
    h_q, h_kv = draw(pst.gqa_heads(max_kv_heads=2))
    d = draw(st.sampled_from([16, 32]))
    num_new = draw(st.sampled_from([1, 1, 2, 5, 17]))
    contexts = draw(st.lists(st.sampled_from([0, 1, 31, 32, 33, 64, 65]) | st.integers(0, 120),
                             min_size=b * h_kv, max_size=b * h_kv))
    spare = draw(st.lists(st.integers(0, 3), min_size=b * h_kv, max_size=b * h_kv)) \
        if draw(st.booleans()) else None
    window = draw(st.none() | st.sampled_from([1, 2, 5, 31, 33, 64, 300]) | st.integers(1, 400))
    softcap = draw(st.sampled_from([None, 0.5, 5.0, 30.0]))
    sinks = draw(st.sampled_from([None, "normal", "large", "very_negative", "mixed"]))
    return {"b": b, "h_q": h_q, "h_kv": h_kv, "d": d, "num_new": num_new, "contexts": contexts,
            "spare": spare, "window": window, "softcap": softcap, "sinks": sinks,
            "dtype": draw(pst.dtypes()), "scale": draw(st.sampled_from([None, 0.5])),
            "seed": draw(st.integers(0, 10_000))}


def _build_features(case, device, decode: bool):
    """``(q, k, v, cu_seqlens, seq_lens, kwargs)``: segment s holds ``contexts[s]`` kept rows (and
    the T_new new tokens' own rows unless decoding without them)."""
    generator = torch.Generator().manual_seed(case["seed"])
    num_new, d, dtype = case["num_new"], case["d"], case["dtype"]
    lengths = [c + (0 if decode and c == 0 else num_new) for c in case["contexts"]]
    spare = case["spare"] or [0] * len(lengths)
    rooms = [n + extra for n, extra in zip(lengths, spare)]
    cu_seqlens = torch.tensor([0] + torch.tensor(rooms).cumsum(0).tolist(), dtype=torch.int32)
    rows = int(cu_seqlens[-1])
    k = torch.randn(rows, d, generator=generator).to(dtype)
    v = torch.randn(rows, d, generator=generator).to(dtype)
    positions = torch.full((rows,), -7, dtype=torch.int64)  # spare rows: garbage positions
    for s, (length, context) in enumerate(zip(lengths, case["contexts"])):
        start = int(cu_seqlens[s])
        k[start + length:start + rooms[s]] = float("nan")
        v[start + length:start + rooms[s]] = float("nan")
        # the kept context: ascending positions with gaps, then the new tokens right after
        kept = torch.randperm(3 * context + 1, generator=generator)[:context].sort().values
        positions[start:start + context] = kept
        first_new = 3 * context + 1
        positions[start + context:start + length] = first_new + torch.arange(length - context)
    shape = (case["b"], case["h_q"], case["d"]) if decode else \
        (case["b"], case["h_q"], num_new, case["d"])
    q = torch.randn(*shape, generator=generator).to(dtype)
    kwargs = {"scale": case["scale"], "softcap": case["softcap"]}
    if case["window"] is not None:
        kwargs.update(window=case["window"], key_positions=positions.to(
            torch.int32 if case["seed"] % 2 else torch.int64))
    if case["sinks"] is not None:
        h_q = case["h_q"]
        kwargs["sinks"] = {"normal": torch.randn(h_q, generator=generator) * 2,
                           "large": torch.full((h_q,), 40.0),
                           "very_negative": torch.full((h_q,), -80.0),
                           "mixed": torch.tensor([-float("inf"), 3.0, -2.0, 60.0]).repeat(
                               h_q)[:h_q]}[case["sinks"]]
    seq_lens = torch.tensor(lengths, dtype=torch.int32) if case["spare"] else None
    on_device = lambda t: None if t is None else t.to(device)
    return (on_device(q), on_device(k), on_device(v), on_device(cu_seqlens), on_device(seq_lens),
            {n: on_device(x) if isinstance(x, torch.Tensor) else x for n, x in kwargs.items()})


def _cpu(kwargs):
    return {n: x.cpu() if isinstance(x, torch.Tensor) else x for n, x in kwargs.items()}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@given(case=feature_cases())
def test_features_match_reference(impl, case, device):
    """Both entry points with softcap, sinks and window, alone and together, against the fp64
    references: windows of 1 (a query sees only its own row), inside and past every segment;
    sinks that take almost all the mass or none; GQA; spare room; empty decode segments."""
    from proxykv.kernels import ragged_attention
    from proxykv.kernels.attend.reference import ragged_attention_reference

    q, k, v, cu_seqlens, seq_lens, kwargs = _build_features(case, device, decode=False)
    out, lse = ragged_attention(q, k, v, cu_seqlens, seq_lens=seq_lens, return_lse=True,
                                impl=impl, **kwargs)
    expected, expected_lse = ragged_attention_reference(
        q.cpu(), k.cpu(), v.cpu(), cu_seqlens.cpu(), return_lse=True,
        seq_lens=None if seq_lens is None else seq_lens.cpu(), **_cpu(kwargs))
    assert_close(out, expected, dtype=case["dtype"], name=f"ragged_attention {case}")
    assert_close(lse, expected_lse, dtype=torch.float32, atol=1e-4, name="lse of the keys")
    q, k, v, cu_seqlens, seq_lens, kwargs = _build_features(case, device, decode=True)
    out = ragged_decode_attention(q, k, v, cu_seqlens, seq_lens=seq_lens, impl=impl, **kwargs)
    expected = ragged_decode_attention_reference(
        q.cpu(), k.cpu(), v.cpu(), cu_seqlens.cpu(),
        seq_lens=None if seq_lens is None else seq_lens.cpu(), **_cpu(kwargs))
    assert_close(out, expected, dtype=case["dtype"], name=f"ragged_decode {case}")


@pytest.mark.parametrize("keys_per_split", [32, 64, 256], ids=lambda n: f"split={n}")
def test_features_on_every_split_plan(keys_per_split, device):
    """The merge kernel folds the sinks into its denominator; splits wholly outside every query's
    window write an empty partial (LSE -inf); T_new x G = 24 rows make two query blocks."""
    from proxykv.kernels.attend.reference import ragged_attention_reference

    case = {"b": 2, "h_q": 4, "h_kv": 2, "d": 16, "num_new": 6, "contexts": [0, 130, 9, 64],
            "spare": [2, 0, 1, 0], "window": 40, "softcap": 3.0, "sinks": "mixed",
            "dtype": torch.float32, "scale": None, "seed": 3}
    q, k, v, cu_seqlens, seq_lens, kwargs = _build_features(case, device, decode=False)
    block_n = decode_triton.gpu_tile(torch.float32)[0] if q.is_cuda else 32
    plan = decode_triton.plan_ragged_attention(
        200, 4, 12, 16, torch.float32, q.is_cuda,
        keys_per_split=-(-keys_per_split // block_n) * block_n)
    plan = decode_triton.RaggedAttentionPlan(16, plan.block_n, plan.keys_per_split,
                                             plan.num_splits, num_stages=plan.num_stages)
    kwargs["scale"] = 16 ** -0.5
    for window in (1, 40, None):
        kwargs.update(window=window)
        out, lse = decode_triton.ragged_attention_triton(q, k, v, cu_seqlens, seq_lens,
                                                         max_seq_len=200, return_lse=True,
                                                         plan=plan, **kwargs)
        expected, expected_lse = ragged_attention_reference(
            q.cpu(), k.cpu(), v.cpu(), cu_seqlens.cpu(), seq_lens=seq_lens.cpu(),
            return_lse=True, **_cpu(kwargs))
        assert_close(out, expected, name=f"{plan} window={window}")
        assert_close(lse, expected_lse, atol=1e-5, name=f"lse {plan} window={window}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_feature_edge_cases(impl, device):
    from proxykv.kernels import ragged_attention

    generator = torch.Generator().manual_seed(12)
    k, v = torch.randn(40, 8, generator=generator), torch.randn(40, 8, generator=generator)
    q = torch.randn(1, 2, 4, 8, generator=generator)
    cu_seqlens = torch.tensor([0, 40], dtype=torch.int32)
    positions = torch.arange(0, 80, 2)  # a pruned cache: every other position kept
    args = [t.to(device) for t in (q, k, v, cu_seqlens)]
    plain, plain_lse = ragged_attention(*args, return_lse=True, impl=impl)
    # window 1: each query sees only its own row, so it outputs that row's value.
    out = ragged_attention(*args, window=1, key_positions=positions.to(device), impl=impl)
    assert_close(out.cpu(), v[36:].expand(1, 2, 4, 8), atol=1e-6, rtol=0, name="window=1")
    # window 3 on positions 2 apart: query t sees its own row 36 + t and the one before.
    out = ragged_attention(*args, window=3, key_positions=positions.to(device), impl=impl)
    two_rows = torch.tensor([0, 2], dtype=torch.int32, device=device)
    expected = torch.stack([ragged_decode_attention(
        q[:, :, t].to(device), k[35 + t:37 + t].to(device), v[35 + t:37 + t].to(device), two_rows,
        impl=impl) for t in range(4)], dim=2)
    assert_close(out, expected, atol=1e-6, rtol=1e-6, name="window=3")
    # A window covering every position masks nothing.
    for window in (80, 81, 2**31 - 1):
        out = ragged_attention(*args, window=window, key_positions=positions.to(device),
                               impl=impl)
        assert_close(out, plain, atol=1e-6, rtol=1e-6, name=f"window={window}")
    # Sinks: -inf (and very negative) change nothing, +inf zeroes the output, a large one
    # scales it by 1 / (1 + exp(sink - lse)); the LSE is the keys' in every case.
    for value in (-float("inf"), -200.0, float("inf"), 5.0):
        sinks = torch.full((2,), value, device=device)
        out, lse = ragged_attention(*args, sinks=sinks, return_lse=True, impl=impl)
        expected = plain / (1 + torch.exp(value - plain_lse))[..., None]
        assert_close(out, expected, atol=1e-6, rtol=1e-5, name=f"sinks={value}")
        torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0)


def test_transformers_eager_gpt_oss_sinks_and_gemma2_softcap(device):
    """Each segment holds every key of a prefill (T_new = T: query t sees rows <= t): the output
    equals transformers' own eager attention — gpt-oss's (sinks) and Gemma 2's (soft-capping),
    each with transformers' sliding-window causal mask."""
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from proxykv.kernels import ragged_attention
    from proxykv.testing.eager import eager_attention_case

    case = eager_attention_case(13, length=41, window=11, sink_scale=2.0)
    q, k, v, mask, sinks, module = case.q, case.k, case.v, case.mask, case.sinks, case.module
    b, h_kv, t, d, window = case.b, case.h_kv, case.t, case.d, case.window
    oss_out, _ = gpt_oss.eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    gemma_out, _ = gemma2.eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5,
                                                  softcap=4.0)
    cu_seqlens = torch.arange(0, b * h_kv * t + 1, t, dtype=torch.int32, device=device)
    packed = [x.float().reshape(-1, d).to(device) for x in (k, v)]
    key_positions = torch.arange(t).repeat(b * h_kv).to(device)
    for expected, features in [(oss_out, {"sinks": sinks.float().to(device)}),
                               (gemma_out, {"softcap": 4.0})]:
        for impl in ("torch", "triton"):
            out = ragged_attention(q.float().to(device), *packed, cu_seqlens, window=window,
                                   key_positions=key_positions, impl=impl, **features)
            assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5,
                         name=f"transformers eager {list(features)} ({impl})")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_the_cache_passes_its_positions_and_the_features(impl, device):
    """``RaggedKVCache.attend(softcap=, sinks=, window=)`` equals the op on the cache's packed
    layout with the cache's own positions, for a decode step and a question chunk."""
    from proxykv.cache import RaggedKVCache
    from proxykv.kernels.attend.reference import ragged_attention_reference

    generator = torch.Generator().manual_seed(14)
    b, h_kv, h_q, t, d = 1, 2, 4, 60, 8
    layers = [(torch.randn(b, h_kv, t, d, generator=generator).to(device),
               torch.randn(b, h_kv, t, d, generator=generator).to(device))]
    mask = torch.rand(b, 1, h_kv, t, generator=generator) < torch.tensor([0.3, 0.7])[:, None]
    cache = RaggedKVCache.from_selection(layers, Selection.from_mask(mask), reserve_steps=8,
                                         impl=impl)
    sinks = torch.randn(h_q, generator=generator).to(device)
    for num_new in (1, 3):
        new = torch.randn(b, h_kv, num_new, d, generator=generator).to(device)
        cache.append(0, new, new.clone())
        q = torch.randn(b, h_q, num_new, d, generator=generator).to(device)
        out, lse = cache.attend(0, q, softcap=2.0, sinks=sinks, window=9, return_lse=True,
                                impl=impl)
        keys, values, cu_seqlens, positions = cache.to_packed(0)
        expected, expected_lse = ragged_attention_reference(
            q.cpu(), keys.cpu(), values.cpu(), cu_seqlens.cpu(), return_lse=True, softcap=2.0,
            sinks=sinks.cpu(), window=9, key_positions=positions.cpu())
        assert_close(out, expected, name=f"cache.attend T_new={num_new}")
        assert_close(lse, expected_lse, atol=1e-5, name=f"cache.attend lse T_new={num_new}")
        if num_new == 1:
            decoded = cache.attend(0, q[:, :, 0], softcap=2.0, sinks=sinks, window=9,
                                   impl=impl)
            assert_close(decoded, expected[:, :, 0], name="cache.attend decode")


# ---------------------------------------------------------------------------------- bad input

def _args(**changes):
    arguments = dict(q=torch.zeros(1, 4, 8), k_packed=torch.zeros(9, 8),
                     v_packed=torch.zeros(9, 8),
                     cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("changes, error, message", [
    (dict(q=torch.zeros(4, 8)), ValueError, r"q must be a 3-D tensor \[B, H_q, D\]"),
    (dict(q=torch.zeros(1, 4, 8, dtype=torch.float16)), TypeError,
     "q and k_packed must have the same dtype, got torch.float16 and torch.float32"),
    (dict(v_packed=torch.zeros(9, 4)), ValueError,
     r"k_packed and v_packed must both be \[N, D\] with D = 8"),
    (dict(k_packed=torch.zeros(9, 4), v_packed=torch.zeros(9, 4)), ValueError,
     r"k_packed and v_packed must both be \[N, D\] with D = 8"),
    (dict(cu_seqlens=torch.tensor([0.0, 4.0, 9.0])), TypeError,
     "cu_seqlens must be int32 or int64, got torch.float32"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9, 9], dtype=torch.int32)), ValueError,
     "the number of query heads H_q=4 must be a multiple of the number of KV heads H_kv=3"),
    (dict(q=torch.zeros(2, 4, 8), cu_seqlens=torch.tensor([0, 4, 6, 9], dtype=torch.int32)),
     ValueError, r"cu_seqlens must have B \* H_kv \+ 1 entries with B = 2 \(from q\), got 4"),
    (dict(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError,
     r"cu_seqlens must end at N = k_packed.shape\[0\] = 9, got cu_seqlens\[-1\] = 8"),
    (dict(cu_seqlens=torch.tensor([0, 10, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([2, 4, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens must start at 0"),
    (dict(seq_lens=torch.tensor([4, 6], dtype=torch.int32)), ValueError,
     (r"seq_lens\[1\] \(segment b=0, h=1\) = 6 exceeds the segment's room "
      r"cu_seqlens\[2\] - cu_seqlens\[1\] = 5")),
    (dict(seq_lens=torch.tensor([-1, 2], dtype=torch.int32)), ValueError,
     "seq_lens must be >= 0, got a minimum of -1"),
    (dict(seq_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError,
     r"seq_lens must have B \* H_kv = 2 entries"),
    (dict(seq_lens=torch.tensor([1.0, 2.0])), TypeError,
     "seq_lens must be int32 or int64, got torch.float32"),
    (dict(max_seq_len=4), ValueError,
     r"max_seq_len = 4 is shorter than the longest segment \(5 rows\)"),
    (dict(max_seq_len=-1), ValueError, "max_seq_len must be >= 0, got -1"),
    (dict(scale="big"), TypeError, "scale must be a float, got str 'big'"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite float > 0 .*got nan"),
    (dict(scale=0), ValueError, r"scale must be a finite float > 0 .*got 0.0"),
    (dict(k_packed=torch.zeros(9, 8, device="meta")), ValueError,
     "q and k_packed must be on the same device, got cpu and meta"),
    (dict(seq_lens=torch.tensor([1, 2], dtype=torch.int32, device="meta")), ValueError,
     "q and seq_lens must be on the same device, got cpu and meta"),
    (dict(impl="gpu"), ValueError, "impl must be one of 'triton', 'torch' or None"),
    ({"softcap": 0}, ValueError, r"softcap must be a finite float > 0 .*got 0.0"),
    ({"softcap": float("nan")}, ValueError, r"softcap must be a finite float > 0 .*got nan"),
    ({"softcap": False}, TypeError, "softcap must be a float, got bool False"),
    ({"sinks": torch.zeros(2)}, ValueError,
     r"sinks must have shape \[H_q\] = \(4,\) \(one logit per query head\), got \(2,\)"),
    ({"sinks": torch.zeros(4, dtype=torch.int32)}, TypeError,
     "sinks must be float16, bfloat16, float32 or float64, got torch.int32"),
    ({"sinks": torch.zeros(4, device="meta")}, ValueError,
     "q and sinks must be on the same device, got cpu and meta"),
    ({"sinks": 3.0}, TypeError, "sinks must be a torch.Tensor, got float"),
    ({"window": 4}, ValueError, "window=4 needs key_positions .* got None"),
    ({"window": 0, "key_positions": torch.zeros(9, dtype=torch.int32)}, ValueError,
     "window must be >= 1, got 0"),
    ({"window": 2.5, "key_positions": torch.zeros(9, dtype=torch.int32)}, TypeError,
     "window must be an int, got float 2.5"),
    ({"window": 4, "key_positions": torch.zeros(8, dtype=torch.int32)}, ValueError,
     (r"key_positions must have shape \[N\] = \(9,\) \(one position per row of k_packed\), "
     r"got \(8,\)")),
    ({"window": 4, "key_positions": torch.zeros(9)}, TypeError,
     "key_positions must be int32 or int64, got torch.float32"),
    ({"window": 4, "key_positions": torch.zeros(9, 1, dtype=torch.int32)}, ValueError,
     r"key_positions must be a 1-D tensor \[N\], got shape \(9, 1\)"),
    ({"window": 4, "key_positions": torch.zeros(9, dtype=torch.int32, device="meta")}, ValueError,
     "q and key_positions must be on the same device, got cpu and meta"),
], ids=["q-rank", "q-dtype", "v-dim", "kv-dim", "cu-float", "gqa", "cu-vs-batch", "cu-end",
        "cu-decreasing", "cu-start", "seq-lens-too-long", "seq-lens-negative",
        "seq-lens-count", "seq-lens-float", "max-seq-len-short", "max-seq-len-negative",
        "scale-type", "scale-nan", "scale-zero", "k-device", "seq-lens-device", "impl",
        "softcap-zero", "softcap-nan", "softcap-bool", "sinks-shape", "sinks-dtype",
        "sinks-device", "sinks-float", "window-without-positions", "window-zero", "window-float",
        "positions-shape", "positions-dtype", "positions-rank", "positions-device"])
def test_bad_input_raises(changes, error, message):
    with pytest.raises(error, match=message):
        ragged_decode_attention(**_args(**changes))


def test_bad_metadata_is_caught_before_any_kernel_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(decode_triton, "ragged_decode_attention_triton", forbidden)
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        ragged_decode_attention(**_args(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)),
                                impl="triton")
