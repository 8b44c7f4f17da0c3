"""model_fingerprint / config_fingerprint / describe_model: equal for the same model however it is
run or loaded, different for any change of weights, dtype or configuration."""

from __future__ import annotations

import copy
import re

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

from proxykv.hf.identity import (
    config_fingerprint,
    describe_model,
    model_fingerprint,
)
from proxykv.hf.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def test_is_a_stable_hex_digest(model):
    first = model_fingerprint(model)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert model_fingerprint(model) == first
    assert model_fingerprint(tiny_model("qwen2")) == first  # rebuilt from the same seed


def test_ignores_the_attention_implementation(model):
    before = model_fingerprint(model)
    try:
        for name in ("eager", "sdpa", "eager"):
            model.set_attn_implementation(name)
            assert model.config._attn_implementation == name
            assert model_fingerprint(model) == before, name
    finally:
        model.set_attn_implementation("sdpa")


def test_ignores_where_the_model_was_loaded_from(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config._name_or_path == str(tmp_path)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert config_fingerprint(loaded) == config_fingerprint(model)


def test_a_one_ulp_change_of_one_weight_changes_it(model):
    changed = copy.deepcopy(model)
    weight = changed.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))
    assert model_fingerprint(changed) != model_fingerprint(model)
    assert config_fingerprint(changed) == config_fingerprint(model)


def test_the_same_config_with_another_seed_differs():
    model, other = tiny_model("qwen2"), tiny_model("qwen2", seed=1)
    assert other.config.to_dict() == model.config.to_dict()
    assert config_fingerprint(other) == config_fingerprint(model)
    assert model_fingerprint(other) != model_fingerprint(model)


def test_a_config_change_or_a_dtype_changes_it(model):
    changed = copy.deepcopy(model)
    changed.config.rms_norm_eps = 1e-5
    assert model_fingerprint(changed) != model_fingerprint(model)
    assert config_fingerprint(changed) != config_fingerprint(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert model_fingerprint(half) != model_fingerprint(model)


def test_runtime_flags_and_non_persistent_buffers_are_left_out(model):
    changed = copy.deepcopy(model)
    changed.config.use_cache = not changed.config.use_cache
    changed.config.output_hidden_states = True
    with torch.no_grad():  # derived from the config; its last bits depend on the device
        changed.model.rotary_emb.inv_freq.mul_(1 + 1e-7)
    assert model_fingerprint(changed) == model_fingerprint(model)


def tied_model(seed: int = 0):
    config = copy.deepcopy(tiny_model("qwen2").config)
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_tied_weights_are_deterministic():
    tied = [tied_model() for _ in range(2)]
    assert tied[0].lm_head.weight is tied[0].model.embed_tokens.weight
    assert model_fingerprint(tied[0]) == model_fingerprint(tied[1])


def test_refuses_weights_on_the_meta_device(model):
    on_meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="on the meta device"):
        model_fingerprint(on_meta)


def test_describe_model(model):
    assert describe_model(model) == {"class": "Qwen2ForCausalLM", "model_type": "qwen2",
                                     "layers": 2, "kv_heads": 2, "hidden_size": 64,
                                     "vocab_size": 100}
