"""RaggedKVCache: built from a full cache and a Selection, appended to step by step, attended over —
against dense attention over the kept positions plus the appended tokens."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import proxykv.cache as cache_module
from proxykv.cache import RaggedKVCache
from proxykv.selection import Selection
from proxykv.testing import assert_close
from proxykv.testing import strategies as pst

IMPLS = ["torch", "triton"]


def _full_cache(b, layers, h_kv, t, d, dtype, layout, seed, device):
    generator = torch.Generator().manual_seed(seed)
    return [(pst.make_bhtd((b, h_kv, t, d), dtype, layout, generator, device),
             pst.make_bhtd((b, h_kv, t, d), dtype, layout, generator, device))
            for _ in range(layers)]


def _dense_attention(q, k, v, visible):
    """float64 attention of ``q [B, H_q, D]`` over ``k, v [B, H_kv, T, D]`` restricted to
    ``visible [B, H_kv, T]``; zeros for a head that sees nothing."""
    group = q.shape[1] // k.shape[1]
    expand = lambda t: t.double().cpu().repeat_interleave(group, dim=1)
    mask = visible.cpu().repeat_interleave(group, dim=1)[:, :, None, :]
    out = F.scaled_dot_product_attention(q.double().cpu()[:, :, None], expand(k), expand(v),
                                         attn_mask=mask)[:, :, 0]
    return torch.where(mask[:, :, 0].any(-1, keepdim=True), out, 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).replace("torch.", ""))
def test_keeping_every_position_decodes_like_the_full_cache(impl, dtype, device):
    b, layers, h_q, h_kv, t, d = 2, 2, 4, 2, 97, 32
    cache = _full_cache(b, layers, h_kv, t, d, dtype, "bthd", 1, device)
    selection = Selection.from_mask(torch.ones(b, layers, h_kv, t, dtype=torch.bool))
    ragged = RaggedKVCache.from_selection(cache, selection, impl=impl)
    q = torch.randn(b, h_q, d).to(dtype=dtype, device=device)
    for layer, (k, v) in enumerate(cache):
        out = ragged.attend(layer, q, impl=impl)
        expected = F.scaled_dot_product_attention(
            q.double().cpu()[:, :, None], k.double().cpu().repeat_interleave(2, 1),
            v.double().cpu().repeat_interleave(2, 1))[:, :, 0]
        assert_close(out, expected, dtype=dtype, name=f"layer {layer}")
        keys, values, cu_seqlens, positions = ragged.to_packed(layer)
        assert torch.equal(keys.cpu(), k.cpu().reshape(b * h_kv * t, d))
        assert torch.equal(values.cpu(), v.cpu().reshape(b * h_kv * t, d))
        assert torch.equal(positions.cpu(), torch.arange(t, dtype=torch.int32).repeat(b * h_kv))
        assert cu_seqlens.tolist() == [i * t for i in range(b * h_kv + 1)]


@st.composite
def decode_sessions(draw):
    b, layers = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h_q, h_kv = draw(pst.gqa_heads(ratios=(1, 2, 4), max_kv_heads=2))
    t = draw(pst.lengths(1, 120))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    density = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]),
                                         min_size=h_kv, max_size=h_kv)))
    mask = torch.rand(b, layers, h_kv, t, generator=generator) < density[:, None]
    steps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=6))  # tokens per append
    return (b, layers, h_q, h_kv, t, mask, steps, draw(st.integers(0, 4)),
            draw(st.sampled_from([torch.float32, torch.float16])), draw(pst.layouts()),
            draw(st.integers(0, 1000)))


@pytest.mark.parametrize("impl", IMPLS)
@given(session=decode_sessions())
def test_append_then_attend_equals_attention_over_the_concatenation(impl, session, device):
    b, layers, h_q, h_kv, t, mask, steps, reserve, dtype, layout, seed = session
    d = 16
    cache = _full_cache(b, layers, h_kv, t, d, dtype, layout, seed, device)
    ragged = RaggedKVCache.from_selection(cache, Selection.from_mask(mask), reserve_steps=reserve,
                                          impl=impl)
    generator = torch.Generator().manual_seed(seed + 1)
    full = [(k.cpu(), v.cpu()) for k, v in cache]
    visible = [mask[:, layer] for layer in range(layers)]
    for count in steps:
        for layer in range(layers):
            k_new = torch.randn(b, h_kv, count, d, generator=generator).to(dtype)
            v_new = torch.randn(b, h_kv, count, d, generator=generator).to(dtype)
            if count == 1 and layer == 0:  # the [B, H_kv, D] form of a single token
                ragged.append(layer, k_new[:, :, 0].to(device), v_new[:, :, 0].to(device))
            else:
                ragged.append(layer, k_new.to(device), v_new.to(device))
            k_full, v_full = full[layer]
            full[layer] = (torch.cat([k_full, k_new], 2), torch.cat([v_full, v_new], 2))
            visible[layer] = torch.cat([visible[layer],
                                        torch.ones(b, h_kv, count, dtype=torch.bool)], -1)
        q = torch.randn(b, h_q, d, generator=generator).to(dtype=dtype, device=device)
        for layer in range(layers):
            out = ragged.attend(layer, q, impl=impl)
            expected = _dense_attention(q, *full[layer], visible[layer])
            assert_close(out, expected, dtype=dtype, name=f"layer {layer} after {count} more")
    for layer in range(layers):
        assert torch.equal(ragged.lengths(layer), visible[layer].sum(-1))
        assert ragged.next_position(layer) == t + sum(steps)
        _, _, cu_seqlens, positions = ragged.to_packed(layer)
        assert cu_seqlens.tolist() == [0] + visible[layer].sum(-1).reshape(-1).cumsum(0).tolist()
        expected_positions = torch.cat([row.nonzero()[:, 0] for row in
                                        visible[layer].reshape(b * h_kv, -1)])
        assert torch.equal(positions.cpu().long(), expected_positions)


@pytest.mark.parametrize("impl", IMPLS)
def test_appends_reuse_the_storage_until_the_spare_room_runs_out(impl, device):
    b, h_kv, t, d = 1, 2, 40, 8
    cache = _full_cache(b, 1, h_kv, t, d, torch.float32, "contiguous", 0, device)
    mask = torch.zeros(b, 1, h_kv, t, dtype=torch.bool)
    mask[..., ::4] = True
    ragged = RaggedKVCache.from_selection(cache, Selection.from_mask(mask), reserve_steps=3,
                                          impl=impl)
    storage = ragged.layer(0).keys.data_ptr()
    token = torch.zeros(b, h_kv, d, device=device)
    for _ in range(3):
        ragged.append(0, token, token)
        assert ragged.layer(0).keys.data_ptr() == storage and ragged.num_repacks == 0
    ragged.append(0, token, token)
    assert ragged.num_repacks == 1
    # Each repack at least doubles the spare: 100 more steps take a logarithmic number of them.
    for _ in range(100):
        ragged.append(0, token, token)
    assert ragged.num_repacks <= 1 + 6, ragged.num_repacks
    assert ragged.lengths(0).tolist() == [[10 + 104, 10 + 104]]


def test_a_repack_copying_in_several_chunks_keeps_every_row(monkeypatch, device):
    monkeypatch.setattr(cache_module, "COPY_CHUNK_ROWS", 3)  # ragged rows: 7 + 2 -> 3 chunks
    b, h_kv, t, d = 1, 2, 30, 4
    cache = _full_cache(b, 1, h_kv, t, d, torch.float32, "contiguous", 1, device)
    mask = torch.zeros(b, 1, h_kv, t, dtype=torch.bool)
    mask[0, 0, 0, ::5] = True   # 6 rows
    mask[0, 0, 1, 3] = True     # 1 row
    ragged = RaggedKVCache.from_selection(cache, Selection.from_mask(mask), reserve_steps=1)
    tokens = [torch.full((b, h_kv, d), float(step), device=device) for step in range(2)]
    for token in tokens:
        ragged.append(0, token, token * 2)
    assert ragged.num_repacks == 1
    keys, values, _, positions = ragged.to_packed(0)
    k, v = cache[0]
    expected_k = torch.cat([torch.cat([k[0, hh][mask[0, 0, hh].to(device)]]
                                      + [token[0, hh, None] for token in tokens])
                            for hh in range(h_kv)])
    expected_v = torch.cat([torch.cat([v[0, hh][mask[0, 0, hh].to(device)]]
                                      + [2 * token[0, hh, None] for token in tokens])
                            for hh in range(h_kv)])
    assert torch.equal(keys.cpu(), expected_k.cpu()) and torch.equal(values.cpu(),
                                                                     expected_v.cpu())
    expected_positions = [0, 5, 10, 15, 20, 25, 30, 31, 3, 30, 31]
    assert positions.cpu().tolist() == expected_positions


def test_nbytes_is_what_is_allocated_and_shrinks_with_the_budget(device):
    b, layers, h_kv, t, d = 1, 2, 2, 200, 16
    cache = _full_cache(b, layers, h_kv, t, d, torch.float16, "contiguous", 0, device)
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(b, layers, h_kv, t, generator=generator) < torch.tensor(
        [0.1, 0.5])[:, None]
    ragged = RaggedKVCache.from_selection(cache, Selection.from_mask(mask), reserve_steps=4)
    allocated = 0
    for layer in range(layers):
        view = ragged.layer(layer)
        tensors = (view.keys, view.values, view.positions, view.cu_seqlens, view.seq_lens)
        allocated += sum(x.untyped_storage().nbytes() for x in tensors)
        rows = int(mask[:, layer].sum()) + b * h_kv * 4
        assert view.keys.shape == (rows, d) and view.positions.shape == (rows,)
    assert ragged.nbytes == allocated
    full_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in cache)
    assert ragged.nbytes < 0.45 * full_bytes


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_and_ragged_selections_build_the_same_cache(impl, device):
    b, layers, h_kv, t, d = 2, 1, 2, 30, 8
    cache = _full_cache(b, layers, h_kv, t, d, torch.float32, "cache_slice", 2, device)
    mask = torch.zeros(b, layers, h_kv, t, dtype=torch.bool)
    mask[..., 3:30:3] = True
    uniform = Selection.from_mask(mask)
    assert not uniform.is_ragged
    a = RaggedKVCache.from_selection(cache, uniform, impl=impl)
    c = RaggedKVCache.from_selection(cache, uniform.to_ragged(), impl=impl)
    for got, want in zip(a.to_packed(0), c.to_packed(0)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------- bad input

def _small_cache():
    cache = [(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4))]
    return cache, Selection.from_mask(torch.ones(1, 1, 2, 6, dtype=torch.bool))


@pytest.mark.parametrize("mutate, error, message", [
    (lambda c, s: (c + c, s), ValueError,
     r"past_key_values must be a sequence of 1 \(keys, values\) pairs .* got 2"),
    (lambda c, s: ([(c[0][0][:, :, :5], c[0][1])], s), ValueError,
     r"past_key_values\[0\] keys must have shape \[B, H_kv, T, D\] = \[1, 2, 6, D\]"),
    (lambda c, s: ([(c[0][0], c[0][1].half())], s), ValueError,
     r"past_key_values\[0\] values is torch.float16 on cpu; every layer must match layer 0"),
    (lambda c, s: ([c[0][0]], s), TypeError, r"past_key_values\[0\] must be a \(keys, values\)"),
    (lambda c, s: (c, s.indices), TypeError, "selection must be a proxykv.Selection, got Tensor"),
], ids=["layers", "seq-len", "dtype", "not-pair", "not-selection"])
def test_from_selection_bad_input_raises(mutate, error, message):
    cache, selection = mutate(*_small_cache())
    with pytest.raises(error, match=message):
        RaggedKVCache.from_selection(cache, selection)


def test_from_selection_rejects_a_bad_selection():
    cache, _ = _small_cache()
    unsorted = Selection(torch.tensor([3, 1, 0, 5], dtype=torch.int32),
                         torch.tensor([0, 2, 4], dtype=torch.int32), 1, 1, 2, 6, 2.0)
    with pytest.raises(ValueError, match="strictly increasing within each segment"):
        RaggedKVCache.from_selection(cache, unsorted)
    with pytest.raises(ValueError, match=r"growth must be a finite float > 0 .*got 0.0"):
        RaggedKVCache.from_selection(cache, _small_cache()[1], growth=0)
    with pytest.raises(ValueError, match="reserve_steps must be >= 0, got -1"):
        RaggedKVCache.from_selection(cache, _small_cache()[1], reserve_steps=-1)


@pytest.mark.parametrize("k_new, error, message", [
    (torch.zeros(1, 3, 4), ValueError,
     (r"k_new must be \[B, H_kv, D\] or \[B, H_kv, t, D\] with B = 1, H_kv = 2, D = 4, got "
      r"shape \(1, 3, 1, 4\)")),
    (torch.zeros(1, 2, 5), ValueError, r"with B = 1, H_kv = 2, D = 4, got shape \(1, 2, 1, 5\)"),
    (torch.zeros(2, 4), ValueError, r"k_new must be \[B, H_kv, D\] or \[B, H_kv, t, D\]"),
    (torch.zeros(1, 2, 4, dtype=torch.float16), TypeError,
     "k_new must be float32, got torch.float16"),
    (torch.zeros(1, 2, 4, device="meta"), ValueError,
     "k_new must be on cpu .*, got meta"),
], ids=["heads", "head-dim", "rank", "dtype", "device"])
def test_append_bad_input_raises(k_new, error, message):
    cache, selection = _small_cache()
    ragged = RaggedKVCache.from_selection(cache, selection)
    with pytest.raises(error, match=message):
        ragged.append(0, k_new, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="layer_index must be <= 0, got 1"):
        ragged.append(1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"v_new must have the shape of k_new \(1, 2, 1, 4\)"):
        ragged.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 2, 4))


# ------------------------------------------------------------------ questions: append n, crop n

def _snapshot(cache):
    """Everything a cache holds that a reader can see: valid rows, positions, lengths."""
    return [(tuple(t.cpu() for t in cache.to_packed(layer)), cache.lengths(layer).tolist(),
             cache.next_position(layer), cache.layer(layer).max_seq_len)
            for layer in range(cache.num_layers)]


def _assert_same_snapshot(a, b):
    assert len(a) == len(b)
    for (tensors_a, *rest_a), (tensors_b, *rest_b) in zip(a, b):
        assert rest_a == rest_b
        for x, y in zip(tensors_a, tensors_b):
            assert x.dtype == y.dtype and torch.equal(x, y)


def _pruned_cache(impl, device, reserve_steps, seed=2):
    b, layers, h_kv, t, d = 1, 2, 2, 80, 16
    full = _full_cache(b, layers, h_kv, t, d, torch.float32, "cache_slice", seed, device)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, layers, h_kv, t, generator=generator) < torch.tensor(
        [0.1, 0.6])[None, None, :, None]
    cache = RaggedKVCache.from_selection(full, Selection.from_mask(mask),
                                         reserve_steps=reserve_steps, impl=impl)
    return full, mask, cache


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reserve_steps", [64, 3], ids=["room", "repacks"])
def test_question_over_the_cache_equals_dense_attention_then_crop_restores_it(
        impl, reserve_steps, device):
    """Append a 9-token question in one call, attend with all 9 queries (each sees the kept
    context and the question causally), crop it: the cache is as before, whether the append fit
    the spare room or repacked."""
    full, mask, cache = _pruned_cache(impl, device, reserve_steps)
    before = _snapshot(cache)
    generator = torch.Generator().manual_seed(7)
    b, h_q, h_kv, num_new, d = 1, 6, 2, 9, 16
    for layer, (k, v) in enumerate(full):
        k_new = torch.randn(b, h_kv, num_new, d, generator=generator).to(device)
        v_new = torch.randn(b, h_kv, num_new, d, generator=generator).to(device)
        q = torch.randn(b, h_q, num_new, d, generator=generator).to(device)
        cache.append(layer, k_new, v_new)
        out, lse = cache.attend(layer, q, return_lse=True, impl=impl)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        keys, values = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
        t = k.shape[2]
        visible = torch.cat([mask[:, layer], torch.ones(b, h_kv, num_new, dtype=torch.bool)], -1)
        visible = visible.repeat_interleave(h_q // h_kv, 1)[:, :, None, :] & torch.ones(
            num_new, t + num_new, dtype=torch.bool).tril(t)
        expected = F.scaled_dot_product_attention(
            q.double().cpu(), keys.double().cpu().repeat_interleave(3, 1),
            values.double().cpu().repeat_interleave(3, 1), attn_mask=visible)
        assert_close(out, expected, dtype=torch.float32, name=f"question, layer {layer}")
    assert cache.next_position(0) == 80 + num_new
    cache.crop(num_new)
    _assert_same_snapshot(_snapshot(cache), before)


@pytest.mark.parametrize("impl", IMPLS)
def test_two_questions_in_turn_equal_two_fresh_caches(impl, device):
    """Question A (then crop), question B from the same compressed cache, equals question B on
    a freshly built cache — and the decode step after it too."""
    questions = []
    generator = torch.Generator().manual_seed(8)
    for num_new in (5, 3):
        questions.append([(torch.randn(1, 2, num_new, 16, generator=generator).to(device),
                           torch.randn(1, 2, num_new, 16, generator=generator).to(device),
                           torch.randn(1, 4, num_new, 16, generator=generator).to(device))
                          for _ in range(2)])
    _, _, reused = _pruned_cache(impl, device, reserve_steps=2)
    _, _, fresh = _pruned_cache(impl, device, reserve_steps=2)

    def ask(cache, question):
        outs = []
        for layer, (k_new, v_new, q) in enumerate(question):
            cache.append(layer, k_new, v_new)
            outs.append(cache.attend(layer, q, impl=impl))
        return outs

    ask(reused, questions[0])
    reused.crop(questions[0][0][0].shape[2])
    for a, b in zip(ask(reused, questions[1]), ask(fresh, questions[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    q_step = torch.randn(1, 4, 16, generator=generator).to(device)
    kv_step = torch.randn(1, 2, 16, generator=generator).to(device)
    for cache in (reused, fresh):
        cache.append(0, kv_step, kv_step)
    torch.testing.assert_close(reused.attend(0, q_step, impl=impl),
                               fresh.attend(0, q_step, impl=impl), rtol=0, atol=0)
    assert reused.next_position(0) == fresh.next_position(0)


def test_crop_one_layer_and_bad_crops():
    _, _, cache = _pruned_cache("torch", torch.device("cpu"), reserve_steps=4)
    kv = torch.randn(1, 2, 3, 16)
    cache.append(0, kv, kv)
    with pytest.raises(ValueError, match=r"n = 1 exceeds the 0 rows appended to every segment "
                                         r"of layer 1"):
        cache.crop(1)  # layer 1 had no append: nothing cropped anywhere
    assert cache.next_position(0) == 83
    with pytest.raises(ValueError, match=r"n = 4 exceeds the 3 rows"):
        cache.crop(4, layer_index=0)
    with pytest.raises(TypeError, match=r"n must be an int"):
        cache.crop(1.0)
    with pytest.raises(ValueError, match=r"n must be >= 0"):
        cache.crop(-1)
    cache.crop(2, layer_index=0)
    assert cache.next_position(0) == 81 and cache.next_position(1) == 80


def test_a_question_longer_than_a_segment_is_refused():
    _, _, cache = _pruned_cache("torch", torch.device("cpu"), reserve_steps=4)
    shortest = int(cache.lengths(0).min())
    with pytest.raises(ValueError, match=rf"q has T_new = {shortest + 1} new tokens, but a "
                                         rf"segment of layer 0 holds only {shortest} rows"):
        cache.attend(0, torch.randn(1, 4, shortest + 1, 16))


def test_crop_across_a_repack_gives_the_room_back():
    """Rows appended before and after a repack are cropped alike; their room becomes spare again,
    so the same appends then fit without another repack."""
    _, _, cache = _pruned_cache("torch", torch.device("cpu"), reserve_steps=3)
    before = _snapshot(cache)
    first, second = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 8, 16)
    cache.append(0, first, first)
    cache.append(0, second, second)  # does not fit the 1 row left: repacks
    assert cache.num_repacks == 1
    cache.crop(10, layer_index=0)
    _assert_same_snapshot(_snapshot(cache), before)
    cache.append(0, first, first)
    cache.append(0, second, second)
    assert cache.num_repacks == 1
