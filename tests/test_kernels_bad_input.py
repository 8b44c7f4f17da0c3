"""Bad input to attention_scores, the KV gathers, ragged_decode_attention and RaggedKVCache, by the
rules of docs/bad-input.md: the documented error, naming the argument, before any kernel runs — and
the inputs those rules newly accept (int64 segment metadata) give the same results as before."""

import math

import pytest
import torch

import proxykv.cache as cache_module
import proxykv.kernels.attend.triton_impl as decode_triton
import proxykv.kernels.gather.triton_impl as gather_triton
from proxykv import attention_scores
from proxykv.cache import RaggedKVCache
from proxykv.kernels import gather_kv, gather_kv_ragged, ragged_decode_attention
from proxykv.selection import Selection

INT32_MAX = 2**31 - 1
IMPLS = ["torch", "triton"]


@pytest.fixture
def no_kernel_runs(monkeypatch):
    """Make every gather and decode kernel launcher fail: bad input must be caught before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    for module, name in ((gather_triton, "gather_kv_triton"),
                         (gather_triton, "gather_kv_ragged_triton"),
                         (decode_triton, "ragged_decode_attention_triton")):
        monkeypatch.setattr(module, name, forbidden)


def _small_cache(b=1, h_kv=2, t=6, d=4, **kwargs):
    generator = torch.Generator().manual_seed(0)
    layers = [(torch.randn(b, h_kv, t, d, generator=generator),
               torch.randn(b, h_kv, t, d, generator=generator))]
    selection = Selection.from_mask(torch.ones(b, 1, h_kv, t, dtype=torch.bool))
    return RaggedKVCache.from_selection(layers, selection, **kwargs)


# ------------------------------------------------------------ 1. shapes the raw op cannot tell

@pytest.mark.parametrize("q, message", [
    (torch.zeros(2, 4, 4), r"^q has batch size 2, but the cache holds B = 1$"),
    (torch.zeros(1, 3, 4), r"^q has H_q = 3 query heads, but the cache's H_kv = 2 KV heads need "
                           r"a positive multiple of 2$"),
    (torch.zeros(1, 0, 4), r"^q has H_q = 0 query heads"),
    (torch.zeros(1, 4, 5), r"^q has head dim 5, but the cache holds D = 4$"),
    (torch.zeros(4, 4), r"^q must be \[B, H_q, D\] or \[B, H_q, T_new, D\], got shape \(4, 4\)$"),
], ids=["batch", "heads", "no-heads", "head-dim", "rank"])
def test_attend_checks_q_against_the_cache(q, message):
    ragged = _small_cache()  # B = 1, H_kv = 2, D = 4
    with pytest.raises(ValueError, match=message):
        ragged.attend(0, q)


def test_append_checks_the_batch_and_needs_at_least_one_token():
    ragged = _small_cache()
    with pytest.raises(ValueError, match=r"k_new must be .* with B = 1, H_kv = 2, D = 4, got shape "
                                         r"\(2, 2, 1, 4\)"):
        ragged.append(0, torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"v_new must be .* with B = 1, H_kv = 2, D = 4, got shape "
                                         r"\(2, 2, 1, 4\)"):
        ragged.append(0, torch.zeros(1, 2, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"^k_new must have t >= 1 \(new tokens\), got shape "
                                         r"\(1, 2, 0, 4\)"):
        ragged.append(0, torch.zeros(1, 2, 0, 4), torch.zeros(1, 2, 0, 4))


def _decode_args(**changes):
    # Four segments: B * H_kv = 1 * 4 or 2 * 2 — the op cannot tell which without num_kv_heads.
    arguments = dict(q=torch.randn(2, 4, 8), k_packed=torch.randn(9, 8),
                     v_packed=torch.randn(9, 8),
                     cu_seqlens=torch.tensor([0, 2, 4, 7, 9], dtype=torch.int32))
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("impl", IMPLS)
def test_num_kv_heads_is_checked_against_the_segments(impl, no_kernel_runs):
    with pytest.raises(ValueError, match=r"^q and cu_seqlens disagree: cu_seqlens has 4 segments, "
                                         r"but q's batch size B = 2 times num_kv_heads = 4 needs "
                                         r"8$"):
        ragged_decode_attention(**_decode_args(), num_kv_heads=4, impl=impl)
    with pytest.raises(TypeError, match="num_kv_heads must be an int, got str 'x'"):
        ragged_decode_attention(**_decode_args(), num_kv_heads="x", impl=impl)
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1, got 0"):
        ragged_decode_attention(**_decode_args(), num_kv_heads=0, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_matching_num_kv_heads_changes_nothing(impl):
    arguments = _decode_args()
    assert torch.equal(ragged_decode_attention(**arguments, num_kv_heads=2, impl=impl),
                       ragged_decode_attention(**arguments, impl=impl))


def test_the_cache_passes_num_kv_heads_to_the_op(monkeypatch):
    seen = {}
    original = cache_module.ragged_decode_attention

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "ragged_decode_attention", spy)
    _small_cache().attend(0, torch.zeros(1, 4, 4), impl="torch")
    assert seen["num_kv_heads"] == 2


# ------------------------------------------------------------ 2, 6. empty dimensions, non-tensors

def _scores_args(**changes):
    arguments = dict(q=torch.zeros(2, 4, 3, 8), k=torch.zeros(2, 2, 10, 8)) | changes
    return arguments.pop("q"), arguments.pop("k"), arguments


@pytest.mark.parametrize("changes, error, message", [
    (dict(q=torch.zeros(0, 4, 3, 8), k=torch.zeros(0, 2, 10, 8)), ValueError,
     r"^q must have B >= 1, got shape \(0, 4, 3, 8\) \[B, H_q, T_q, D\]$"),
    (dict(q=torch.zeros(2, 0, 3, 8), k=torch.zeros(2, 0, 10, 8)), ValueError,
     r"^q must have H_q >= 1, got shape \(2, 0, 3, 8\)"),
    (dict(q=torch.zeros(2, 4, 0, 8)), ValueError, r"^q must have T_q >= 1, got shape"),
    (dict(q=torch.zeros(2, 4, 3, 0), k=torch.zeros(2, 2, 10, 0)), ValueError,
     r"^q must have D >= 1, got shape"),
    (dict(k=torch.zeros(2, 0, 10, 8)), ValueError,
     r"^k must have H_kv >= 1, got shape \(2, 0, 10, 8\) \[B, H_kv, T_k, D\]$"),
    (dict(k=torch.zeros(2, 2, 0, 8)), ValueError, r"^k must have T_k >= 1, got shape"),
    (dict(key_valid_len=[50]), TypeError, r"^key_valid_len must be a torch.Tensor, got list$"),
    (dict(key_valid_len=50), TypeError, r"^key_valid_len must be a torch.Tensor, got int$"),
    # The type error comes first, before the other (bad) arguments are looked at.
    (dict(key_valid_len=[50], reduce="min", k=torch.zeros(3, 2, 10, 8)), TypeError,
     r"^key_valid_len must be a torch.Tensor, got list$"),
    (dict(lse=[0.0]), TypeError, r"^lse must be a torch.Tensor, got list$"),
    (dict(key_valid_len=torch.tensor([10, 2**32 + 3])), ValueError,
     r"key_valid_len must lie in \[0, T_k=10\], got values in \[10, 4294967299\]"),
    (dict(key_valid_len=torch.tensor([11, 3], dtype=torch.int32)), ValueError,
     r"key_valid_len must lie in \[0, T_k=10\], got values in \[3, 11\]"),
    ({"sinks": [0.0] * 4}, TypeError, r"^sinks must be a torch.Tensor, got list$"),
    # The type error comes first, before the other (bad) arguments are looked at.
    ({"sinks": torch.zeros(4, dtype=torch.int32), "window": 0, "softcap": -1.0}, TypeError,
     r"^sinks must be float16, bfloat16, float32 or float64, got torch.int32$"),
    ({"sinks": torch.zeros(3)}, ValueError, r"^sinks must have shape \[H_q\] = \(4,\)"),
    ({"softcap": float("nan")}, ValueError, r"^softcap must be a finite float > 0 .*got nan$"),
    ({"window": -3}, ValueError, r"^window must be >= 1, got -3$"),
    ({"window": 5, "causal": False}, ValueError, r"^window=5 needs causal=True"),
], ids=["B0", "H0", "Tq0", "D0", "Hkv0", "Tk0", "valid-len-list", "valid-len-int",
        "valid-len-list-first", "lse-list", "valid-len-past-int32", "valid-len-past-Tk",
        "sinks-list", "sinks-dtype-first", "sinks-shape", "softcap-nan", "window-negative",
        "window-noncausal"])
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_scores_bad_input(changes, error, message, impl, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr("proxykv.kernels.attention.triton_impl.attention_scores_triton",
                        forbidden)
    q, k, kwargs = _scores_args(**changes)
    with pytest.raises(error, match=message):
        attention_scores(q, k, impl=impl, **kwargs)


@pytest.mark.parametrize("k, message", [
    (torch.zeros(0, 2, 10, 4),
     r"^k must have B >= 1, got shape \(0, 2, 10, 4\) \[B, H_kv, T, D\]$"),
    (torch.zeros(1, 0, 10, 4), r"^k must have H_kv >= 1, got shape"),
    (torch.zeros(1, 2, 0, 4), r"^k must have T >= 1, got shape"),
    (torch.zeros(1, 2, 10, 0), r"^k must have D >= 1, got shape"),
], ids=["B0", "H0", "T0", "D0"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gathers_refuse_empty_caches(k, message, impl, no_kernel_runs):
    b, h_kv = k.shape[:2]
    indices = torch.zeros(b, h_kv, 0, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        gather_kv(k, k.clone(), indices, impl=impl)
    with pytest.raises(ValueError, match=message):
        gather_kv_ragged(k, k.clone(), torch.zeros(0, dtype=torch.int32),
                         torch.zeros(b * h_kv + 1, dtype=torch.int32), impl=impl)


@pytest.mark.parametrize("changes, message", [
    (dict(q=torch.zeros(0, 4, 8)), r"^q must have B >= 1, got shape \(0, 4, 8\) \[B, H_q, D\]$"),
    (dict(q=torch.zeros(2, 0, 8)), r"^q must have H_q >= 1, got shape \(2, 0, 8\)"),
    (dict(q=torch.zeros(2, 4, 0), k_packed=torch.zeros(9, 0), v_packed=torch.zeros(9, 0)),
     r"^q must have D >= 1, got shape"),
], ids=["B0", "H0", "D0"])
@pytest.mark.parametrize("impl", IMPLS)
def test_decode_refuses_empty_queries(changes, message, impl, no_kernel_runs):
    with pytest.raises(ValueError, match=message):
        ragged_decode_attention(**_decode_args(**changes), impl=impl)


def test_from_selection_refuses_an_empty_head_dim():
    layers = [(torch.zeros(1, 2, 6, 0), torch.zeros(1, 2, 6, 0))]
    selection = Selection.from_mask(torch.ones(1, 1, 2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^past_key_values\[0\] keys must have D >= 1, got shape "
                                         r"\(1, 2, 6, 0\)"):
        RaggedKVCache.from_selection(layers, selection)


# ------------------------------------------------------------ 3. sizes past int32

def test_reserve_steps_past_int32_rows_names_the_limit():
    # 12 kept rows in 2 segments: at most (2**31 - 1 - 12) // 2 spare rows each.
    with pytest.raises(ValueError, match=(r"^reserve_steps must be <= 1073741817 so that every "
                                          r"layer's rows fit int32 \(<= 2147483647; layer 0 holds "
                                          r"12 kept rows in 2 segments\), got 1000000000000$")):
        _small_cache(reserve_steps=10**12)


def test_growth_is_a_finite_float_that_keeps_rows_in_int32():
    with pytest.raises(ValueError, match=(r"^growth = 1e\+30 is too large: layer 0's first repack "
                                          r"would give each of its 2 segments ceil\(growth × mean "
                                          r"segment length 6\) spare rows on top of 12 kept rows, "
                                          r"past the int32 row limit 2147483647$")):
        _small_cache(growth=1e30)
    assert _small_cache(growth=(INT32_MAX - 12) // 2 / 6).growth > 0  # the largest that fits
    with pytest.raises(TypeError, match=r"^growth must be a float, got str 'x'$"):
        _small_cache(growth="x")
    with pytest.raises(ValueError, match=r"^growth must be a finite float > 0 .*got inf$"):
        _small_cache(growth=math.inf)
    with pytest.raises(ValueError, match=r"^growth must be a finite float > 0 .*got 0.0$"):
        _small_cache(growth=0)


def test_a_selection_past_int32_rows_is_refused_before_allocating(monkeypatch):
    huge = torch.tensor([[[2**31, 0]]])  # [B, L, H_kv] kept counts
    monkeypatch.setattr(Selection, "counts", lambda self: huge)
    with pytest.raises(ValueError, match=(r"^selection keeps 2147483648 rows in layer 0, past the "
                                          r"int32 limit 2147483647")):
        _small_cache()


def test_an_append_past_int32_rows_raises_before_writing():
    ragged = _small_cache(reserve_steps=0)  # 2 segments of 6 rows, no spare
    before = ragged.to_packed(0)
    steps = 2**30  # 12 + 2 * 2**30 rows > 2**31 - 1; expanded, so no memory is used
    huge = torch.zeros(1, 2, 1, 4).expand(1, 2, steps, 4)
    with pytest.raises(ValueError, match=(r"^k_new: appending 1073741824 tokens would make layer 0 "
                                          r"hold 2147483660 rows, past the int32 limit "
                                          r"2147483647$")):
        ragged.append(0, huge, huge)
    after = ragged.to_packed(0)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert ragged.num_repacks == 0 and ragged.next_position(0) == 6


def test_the_spare_a_repack_hands_out_stops_at_the_int32_limit():
    _grown_spare = cache_module._grown_spare
    # The policy: max(steps, 2 x previous spare, ceil(growth x mean length)) ...
    assert _grown_spare([6, 6], steps=1, reserved=4, growth=0.125) == 8
    assert _grown_spare([800, 800], steps=1, reserved=4, growth=0.125) == 100
    assert _grown_spare([6, 6], steps=30, reserved=4, growth=0.125) == 30
    # ... but never so much that the layer's rows pass int32 (a doubling near the limit).
    assert _grown_spare([6, 6], steps=1, reserved=2**30, growth=0.125) == (INT32_MAX - 12) // 2


def test_position_ids_past_int32_raise():
    ragged = _small_cache()
    ragged._layers[0].next_position = INT32_MAX  # as if 2**31 - 1 tokens came before
    with pytest.raises(ValueError, match=(r"^k_new: appending 2 tokens would give position ids up "
                                          r"to 2147483648, past the int32 limit 2147483647")):
        ragged.append(0, torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    ragged.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))  # position 2**31 - 1 fits
    assert ragged.next_position(0) == INT32_MAX + 1


# ------------------------------------------------------------ 4. scale

@pytest.mark.parametrize("scale, error, message", [
    ("x", TypeError, r"^scale must be a float, got str 'x'$"),
    (True, TypeError, r"^scale must be a float, got bool True$"),
    (0, ValueError, r"^scale must be a finite float > 0 .*got 0.0$"),
    (-0.5, ValueError, r"^scale must be a finite float > 0 .*got -0.5$"),
    (math.nan, ValueError, r"^scale must be a finite float > 0 .*got nan$"),
    (math.inf, ValueError, r"^scale must be a finite float > 0 .*got inf$"),
], ids=["str", "bool", "zero", "negative", "nan", "inf"])
def test_every_attention_op_follows_the_scale_rule(scale, error, message, no_kernel_runs):
    with pytest.raises(error, match=message):
        attention_scores(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 4), scale=scale)
    with pytest.raises(error, match=message):
        ragged_decode_attention(**_decode_args(), scale=scale, impl="triton")
    with pytest.raises(error, match=message):
        _small_cache(impl="torch").attend(0, torch.zeros(1, 4, 4), scale=scale, impl="triton")


@pytest.mark.parametrize("changes, error, message", [
    ({"softcap": "x"}, TypeError, r"^softcap must be a float, got str 'x'$"),
    ({"softcap": True}, TypeError, r"^softcap must be a float, got bool True$"),
    ({"softcap": 0.0}, ValueError, r"^softcap must be a finite float > 0 .*got 0.0$"),
    ({"softcap": -2}, ValueError, r"^softcap must be a finite float > 0 .*got -2.0$"),
    ({"softcap": math.inf}, ValueError, r"^softcap must be a finite float > 0 .*got inf$"),
    ({"window": True}, TypeError, r"^window must be an int, got bool True$"),
    ({"window": 3.0}, TypeError, r"^window must be an int, got float 3.0$"),
    ({"window": 0}, ValueError, r"^window must be >= 1, got 0$"),
    ({"window": 2**31}, ValueError, r"^window must be <= 2147483647, got 2147483648$"),
    ({"sinks": torch.zeros(3)}, ValueError,
     r"^sinks must have shape \[H_q\] = \(4,\) \(one logit per query head\), got \(3,\)$"),
    ({"sinks": torch.zeros(4, dtype=torch.int64)}, TypeError,
     r"^sinks must be float16, bfloat16, float32 or float64, got torch.int64$"),
    ({"sinks": torch.zeros(4, 1)}, ValueError,
     r"^sinks must be a 1-D tensor \[H_q\], got shape \(4, 1\)$"),
    ({"sinks": [1.0]}, TypeError, r"^sinks must be a torch.Tensor, got list$"),
], ids=["softcap-str", "softcap-bool", "softcap-zero", "softcap-negative", "softcap-inf",
        "window-bool", "window-float", "window-zero", "window-past-int32", "sinks-shape",
        "sinks-dtype", "sinks-rank", "sinks-list"])
def test_every_attention_op_follows_the_feature_rules(changes, error, message, no_kernel_runs,
                                                      monkeypatch):
    """softcap, window and sinks follow one rule in every attention op (H_q = 4 everywhere)."""
    from proxykv.kernels import ragged_attention

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(decode_triton, "ragged_attention_triton", forbidden)
    monkeypatch.setattr("proxykv.kernels.attention.triton_impl.attention_scores_triton",
                        forbidden)
    positions = {"key_positions": torch.arange(9)} if "window" in changes else {}
    with pytest.raises(error, match=message):
        attention_scores(torch.zeros(1, 4, 3, 4), torch.zeros(1, 2, 5, 4), impl="triton",
                         **changes)
    with pytest.raises(error, match=message):
        ragged_decode_attention(**_decode_args(q=torch.zeros(1, 4, 8)), impl="triton",
                                num_kv_heads=4, **positions, **changes)
    with pytest.raises(error, match=message):
        ragged_attention(torch.zeros(1, 4, 2, 8), torch.zeros(9, 8), torch.zeros(9, 8),
                         torch.tensor([0, 2, 4, 7, 9], dtype=torch.int32), impl="triton",
                         **positions, **changes)
    with pytest.raises(error, match=message):
        _small_cache(impl="torch").attend(0, torch.zeros(1, 4, 4), impl="triton", **changes)


def test_a_window_needs_the_positions_of_the_rows(no_kernel_runs):
    with pytest.raises(ValueError, match=r"^window=8 needs key_positions \(the original position "
                                         r"of every packed row"):
        ragged_decode_attention(**_decode_args(), window=8, impl="triton")
    with pytest.raises(ValueError, match=r"^key_positions must have shape \[N\] = \(9,\)"):
        ragged_decode_attention(**_decode_args(), window=8, key_positions=torch.arange(10),
                                impl="triton")


def test_the_cache_passes_its_positions_only_with_a_window(monkeypatch):
    seen = []
    original = cache_module.ragged_decode_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "ragged_decode_attention", spy)
    ragged = _small_cache()
    ragged.attend(0, torch.zeros(1, 4, 4), impl="torch")
    ragged.attend(0, torch.zeros(1, 4, 4), window=3, softcap=5.0, sinks=torch.zeros(4),
                  impl="torch")
    assert seen[0]["key_positions"] is None and seen[0]["window"] is None
    assert seen[1]["key_positions"] is ragged.layer(0).positions
    assert (seen[1]["window"], seen[1]["softcap"]) == (3, 5.0)


# ------------------------------------------------------------ 5. int64 index-like metadata

def _ragged_gather_args():
    generator = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, 10, 4, generator=generator), torch.randn(2, 2, 10, 4,
                                                                       generator=generator)
    indices = torch.tensor([0, 3, 9, 1, 2, 5, 7], dtype=torch.int32)
    cu_seqlens = torch.tensor([0, 3, 5, 5, 7], dtype=torch.int32)
    return k, v, indices, cu_seqlens


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_int64_segment_metadata_gathers_like_int32(impl, check):
    k, v, indices, cu_seqlens = _ragged_gather_args()
    expected = gather_kv_ragged(k, v, indices, cu_seqlens, impl=impl)
    got = gather_kv_ragged(k, v, indices.long(), torch.cumsum(torch.tensor([0, 3, 2, 0, 2]), 0),
                           check_indices=check, impl=impl)
    assert got[0].dtype == k.dtype
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    out_cu = torch.tensor([0, 4, 7, 8, 11])
    out = (torch.zeros(11, 4), torch.zeros(11, 4))
    gather_kv_ragged(k, v, indices, cu_seqlens.long(), out=out, out_cu_seqlens=out_cu,
                     check_indices=check, impl=impl)
    rows = torch.tensor([0, 1, 2, 4, 5, 8, 9])
    assert torch.equal(out[0][rows], expected[0]) and torch.equal(out[1][rows], expected[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_int64_segment_metadata_decodes_like_int32(impl, check):
    arguments = _decode_args()
    seq_lens = torch.tensor([2, 1, 3, 0], dtype=torch.int32)
    expected = ragged_decode_attention(**arguments, seq_lens=seq_lens, impl=impl)
    arguments["cu_seqlens"] = arguments["cu_seqlens"].long()
    got = ragged_decode_attention(**arguments, seq_lens=seq_lens.long(), check_segments=check,
                                  impl=impl)
    assert torch.equal(got, expected)


# Each of these would be valid after wrapping to int32 (2**32 + x wraps to x): they must raise.
WRAPPING = 2**32


@pytest.mark.parametrize("impl", IMPLS)
def test_int64_gather_metadata_past_int32_raises_even_unchecked(impl, no_kernel_runs):
    k, v, indices, cu_seqlens = _ragged_gather_args()
    wrapped_cu = cu_seqlens.long() + torch.tensor([0, 0, WRAPPING, WRAPPING, 0])
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing"):
        gather_kv_ragged(k, v, indices, wrapped_cu, impl=impl)
    with pytest.raises(ValueError, match=(r"^cu_seqlens holds values in \[0, 4294967301\], past "
                                          r"the int32 range the kernels read")):
        gather_kv_ragged(k, v, indices, wrapped_cu, check_indices=False, impl=impl)
    out = (torch.zeros(7, 4), torch.zeros(7, 4))
    wrapped_out_cu = cu_seqlens.long() - torch.tensor([0, 0, 0, 0, WRAPPING])
    with pytest.raises(ValueError, match=(r"^out_cu_seqlens holds values in \[-4294967289, 5\], "
                                          r"past the int32 range")):
        gather_kv_ragged(k, v, indices, cu_seqlens, out=out, out_cu_seqlens=wrapped_out_cu,
                         check_indices=False, impl=impl)
    with pytest.raises(ValueError, match=r"^indices holds values in \[0, 4294967305\], past"):
        gather_kv_ragged(k, v, indices.long() + torch.tensor([0, 0, WRAPPING, 0, 0, 0, 0]),
                         cu_seqlens, check_indices=False, impl=impl)
    uniform = torch.tensor([[[0, 3, 9], [1, 2, 3]]] * 2) + torch.tensor([0, 0, WRAPPING])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        gather_kv(k, v, uniform, impl=impl)
    with pytest.raises(ValueError, match=r"^indices holds values in \[0, 4294967305\], past"):
        gather_kv(k, v, uniform, check_indices=False, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_int64_decode_metadata_past_int32_raises_even_unchecked(impl, no_kernel_runs):
    arguments = _decode_args()
    arguments["cu_seqlens"] = torch.tensor([0, 2, 4, 7, 9 + WRAPPING])
    with pytest.raises(ValueError, match=r"cu_seqlens must end at N = k_packed.shape\[0\] = 9"):
        ragged_decode_attention(**arguments, impl=impl)
    with pytest.raises(ValueError, match=r"^cu_seqlens holds values in \[0, 4294967305\], past"):
        ragged_decode_attention(**arguments, check_segments=False, max_seq_len=9, impl=impl)
    arguments = _decode_args()
    seq_lens = torch.tensor([2, 1, 3 + WRAPPING, 0])
    with pytest.raises(ValueError, match=r"seq_lens\[2\] \(segment b=1, h=0\) = 4294967299 "
                                         r"exceeds the segment's room"):
        ragged_decode_attention(**arguments, seq_lens=seq_lens, impl=impl)
    with pytest.raises(ValueError, match=r"^seq_lens holds values in \[0, 4294967299\], past"):
        ragged_decode_attention(**arguments, seq_lens=seq_lens, check_segments=False,
                                max_seq_len=3, impl=impl)


def test_max_seq_len_cannot_exceed_the_rows(no_kernel_runs):
    # It sizes the Triton grid: a segment holds at most N = 9 rows.
    with pytest.raises(ValueError, match=r"^max_seq_len must be <= 9, got 10$"):
        ragged_decode_attention(**_decode_args(), max_seq_len=10, impl="triton")
    with pytest.raises(ValueError, match=r"^max_seq_len must be <= 9, got 1000000000000$"):
        ragged_decode_attention(**_decode_args(), max_seq_len=10**12, check_segments=False,
                                impl="triton")


def test_row_counts_past_int32_are_refused(no_kernel_runs):
    # Expanded (stride-0) tensors: sizes past int32 without the memory.
    rows = INT32_MAX + 1
    k_packed = torch.zeros(1, 8).expand(rows, 8)
    with pytest.raises(ValueError, match=(r"^k_packed has N = 2147483648 rows, past the int32 "
                                          r"limit 2147483647")):
        ragged_decode_attention(torch.zeros(1, 2, 8), k_packed, k_packed,
                                torch.tensor([0, 0, rows]), impl="triton")
    k = torch.zeros(1, 1, 1, 4).expand(1, 1, rows, 4)
    with pytest.raises(ValueError, match=r"^k has T = 2147483648 positions, past the int32 limit"):
        gather_kv(k, k, torch.zeros(1, 1, 1, dtype=torch.int64), impl="triton")
    indices = torch.zeros(1, dtype=torch.int32).expand(rows)
    small = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"^indices has N = 2147483648 rows, past the int32 limit"):
        gather_kv_ragged(small, small, indices, torch.tensor([0, rows]), impl="triton")
