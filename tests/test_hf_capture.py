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
