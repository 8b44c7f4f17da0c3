"""Capture of post-RoPE Q/K through transformers' attention-function interface (proxykv.hf)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface

from proxykv.hf import capture_attention, check_supported_model
from proxykv.hf.capture import CAPTURE_NAME_PREFIX
from proxykv.hf.testing import layer_inputs, reference_qk, tiny_model

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, num_layers=2, seed=i) for i, arch in enumerate(ARCHS)}


def _padded_batch(vocab=100, length=24, pad=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def _no_capture_registered():
    for mapping in (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping):
        assert not [k for k in mapping if str(k).startswith(CAPTURE_NAME_PREFIX)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_outputs_unchanged_and_every_layer_seen(models, arch, implementation):
    model = models[arch]
    model.set_attn_implementation(implementation)
    try:
        ids, mask, positions = _padded_batch()
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, position_ids=positions).logits
            seen = []
            with capture_attention(model, lambda call: seen.append(
                    (call.layer_idx, tuple(call.query.shape), tuple(call.key.shape),
                     call.num_key_value_groups, call.scaling))) as capture:
                assert model.config._attn_implementation == capture.name
                got = model(ids, attention_mask=mask, position_ids=positions).logits
        assert torch.equal(got, expected)
        assert seen == [(layer, (2, 4, 24, 16), (2, 2, 24, 16), 2, 0.25) for layer in range(2)]
        assert model.config._attn_implementation == implementation
        _no_capture_registered()
    finally:
        model.set_attn_implementation("sdpa")


def test_capture_with_cache_sees_past_and_new_keys(models):
    from transformers import DynamicCache
    model = models["qwen3"]
    ids = torch.randint(0, 100, (1, 20))
    cache = DynamicCache(config=model.config)
    shapes = []
    with torch.no_grad():
        model(ids[:, :12], cache=cache)
        with capture_attention(model, lambda c: shapes.append((c.query.shape[2], c.key.shape[2]))):
            model(ids[:, 12:], cache=cache, position_ids=torch.arange(12, 20)[None])
    assert shapes == [(8, 20), (8, 20)]


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_qk_equal_hand_computed(models, arch):
    model = models[arch]
    ids, mask, positions = _padded_batch(seed=3)
    layer = 1
    hidden = layer_inputs(model, layer, input_ids=ids, attention_mask=mask, position_ids=positions)
    theta = model.config.rope_parameters["rope_theta"]
    q_ref, k_ref = reference_qk(model.model.layers[layer].self_attn, hidden, positions,
                                rope_theta=theta)
    captured = {}

    def keep(call):
        if call.layer_idx == layer:
            captured["q"], captured["k"] = call.query.clone(), call.key.clone()

    with torch.no_grad(), capture_attention(model, keep):
        model(ids, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(captured["q"], q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured["k"], k_ref, atol=1e-5, rtol=1e-5)


def test_removed_after_exception_in_block_and_in_callback(models):
    model = models["llama"]
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model, lambda call: None):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    _no_capture_registered()

    def failing(call):
        raise KeyError("callback failed")

    with pytest.raises(KeyError, match="callback failed"), torch.no_grad(), \
            capture_attention(model, failing):
        model(torch.randint(0, 100, (1, 8)))
    assert model.config._attn_implementation == "sdpa"
    _no_capture_registered()
    # and the model still runs normally
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 8)))


def test_unsupported_models_raise(models):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*llama, mistral, qwen2"):
        capture_attention(gpt2, lambda call: None)
    sliding = tiny_model("qwen2", num_layers=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=0)
    with pytest.raises(ValueError, match=r"every layer attends through a sliding window \(8"):
        capture_attention(sliding, lambda call: None)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        capture_attention(torch.nn.Linear(2, 2), lambda call: None)
    with pytest.raises(TypeError, match="callback must be callable"):
        capture_attention(models["qwen2"], "not a function")
    model = models["qwen2"]
    with capture_attention(model, lambda call: None), \
            pytest.raises(ValueError, match="already being captured"):
        capture_attention(model, lambda call: None)
    assert check_supported_model(model) == "sdpa"


def test_unsupported_attention_implementation(models):
    model = models["llama"]
    model.config._attn_implementation_internal = "flex_attention"
    try:
        with pytest.raises(ValueError, match="sdpa, eager"):
            capture_attention(model, lambda call: None)
    finally:
        model.config._attn_implementation_internal = "sdpa"


def test_import_proxykv_without_transformers():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import proxykv\n"
        "try:\n"
        "    import proxykv.hf\n"
        "except ImportError as error:\n"
        "    assert 'pip install proxykv[hf]' in str(error), error\n"
        "    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# with_lse: the attention's own log-sum-exps (CPU flash kernel)


def _capture_run(model, ids, past_ids=None, *, with_lse: bool, mask=None):
    """(logits, [(layer, query, key, scaling, lse)]) of a forward over ``ids`` after ``past_ids``
    (prefilled without capture), captured with or without ``with_lse``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    offset = 0
    with torch.no_grad():
        if past_ids is not None:
            model(input_ids=past_ids, cache=cache, use_cache=True)
            offset = past_ids.shape[1]
    seen = []
    positions = torch.arange(offset, offset + ids.shape[1])[None].expand(ids.shape[0], -1)
    with capture_attention(model, lambda call: seen.append(
            (call.layer_idx, call.query.clone(), call.key.clone(), call.scaling,
             None if call.lse is None else call.lse.clone())), with_lse=with_lse), \
            torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits
    return logits, seen


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("past", [0, 23])
def test_with_lse_hands_over_each_querys_log_sum_exp(models, arch, past):
    model = models[arch]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 100, (1, 17), generator=g)
    past_ids = torch.randint(0, 100, (1, past), generator=g) if past else None
    plain, _ = _capture_run(model, ids, past_ids, with_lse=False)
    logits, seen = _capture_run(model, ids, past_ids, with_lse=True)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # the model's outputs hold
    assert len(seen) == model.config.num_hidden_layers
    for _, query, key, scaling, lse in seen:
        assert lse is not None and lse.shape == query.shape[:3]
        group = query.shape[1] // key.shape[1]
        logits_qk = scaling * query.double() @ key.double().repeat_interleave(group, 1).transpose(
            -1, -2)
        t_new, t_k = query.shape[2], key.shape[2]
        visible = torch.ones(t_new, t_k, dtype=torch.bool).tril(t_k - t_new)
        expected = logits_qk.masked_fill(~visible, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(lse.double(), expected, rtol=1e-5, atol=1e-5)


def test_with_lse_follows_a_padding_mask_and_skips_what_it_cannot_take(models):
    model = models["qwen2"]
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    plain, _ = _capture_run(model, ids, with_lse=False, mask=mask)
    logits, seen = _capture_run(model, ids, with_lse=True, mask=mask)
    torch.testing.assert_close(logits[1, 4:], plain[1, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0], plain[0], rtol=1e-5, atol=1e-5)
    assert all(lse is not None for *_, lse in seen)
    eager = tiny_model("qwen2", num_layers=1, attn_implementation="eager")
    _, seen = _capture_run(eager, ids[:1], with_lse=True)  # eager: its own function, no lse
    assert seen[0][-1] is None
    with pytest.raises(TypeError, match="with_lse must be a bool"):
        capture_attention(model, lambda call: None, with_lse=1)
    capture = capture_attention(model, lambda call: None, with_lse=True)
    query = torch.zeros(1, 4, 3, 16)
    plain = {"softcap": None, "sinks": None, "sliding_window": None}
    assert capture._flash_applies(query, None, plain, (), {})
    for kwargs in ({"is_causal": False}, {"dropout": 0.1}, {"position_bias": query}):
        assert not capture._flash_applies(query, None, plain, (), kwargs), kwargs
    assert not capture._flash_applies(query, None, {**plain, "softcap": 5.0}, (), {})
    assert not capture._flash_applies(query, None, plain, (), {"proxykv_compressed_layer": 1})


def test_reconstruction_scores_do_not_depend_on_where_the_lse_comes_from(models, monkeypatch):
    from proxykv.hf import capture as capture_module
    from proxykv.hf import get_scorer

    model = models["qwen2"]
    ids = torch.randint(0, 100, (1, 60), generator=torch.Generator().manual_seed(6))
    scorer = get_scorer("reconstruction", chunk_size=16, impl="torch")
    with_lse, _ = scorer.score(model, ids)
    monkeypatch.setattr(capture_module, "_FLASH_CPU", None)  # the stock attention, no lse
    without, _ = scorer.score(model, ids)
    torch.testing.assert_close(with_lse, without, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", ["noncausal", "square", "past", "causal_mask", "padded_mask"])
def test_flash_attention_with_lse_equals_sdpa(case):
    from types import SimpleNamespace

    from proxykv.hf.capture import _flash_attention_with_lse

    g = torch.Generator().manual_seed(8)
    batch = 2 if case == "padded_mask" else 1
    t_new, t_k = (9, 9) if case in ("square", "noncausal") else (5, 14)
    q = torch.randn(batch, 4, t_new, 8, generator=g)
    k, v = torch.randn(batch, 2, t_k, 8, generator=g), torch.randn(batch, 2, t_k, 8, generator=g)
    seen = torch.ones(t_new, t_k, dtype=torch.bool).tril(t_k - t_new)
    mask = None
    if case == "noncausal":
        seen = torch.ones(t_new, t_k, dtype=torch.bool)
    elif case == "causal_mask":
        mask = seen[None, None]
    elif case == "padded_mask":
        mask = seen[None, None].repeat(2, 1, 1, 1)
        mask[1, :, :, :3] = False  # row 1 is left-padded by 3
    module = SimpleNamespace(is_causal=case != "noncausal")
    output, lse = _flash_attention_with_lse(module, q, k, v, mask, 0.3)
    full_mask = seen[None, None] if mask is None else mask
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=full_mask,
                                                               scale=0.3)
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    logits = (0.3 * q @ kk.transpose(-1, -2)).masked_fill(~full_mask, float("-inf"))
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=1e-5, atol=1e-5)
