"""Scorers over real (tiny, random-weight) transformers models: proxykv.hf.scorers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache

from proxykv import attention_scores
from proxykv.hf import (
    DEFAULT_REPEAT_PROMPT_TEXT,
    ReconstructionScorer,
    WindowScorer,
    available_scorers,
    get_scorer,
)
from proxykv.hf.testing import layer_inputs, reference_qk, tiny_model

ARCHS = ("llama", "qwen2", "qwen3")
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, num_layers=3 if arch == "qwen3" else 2, seed=10 + i)
            for i, arch in enumerate(ARCHS)}


def _ids(batch, length, seed):
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _plain_prefill(model, ids, mask=None):
    cache = DynamicCache(config=model.config)
    if mask is None:
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    else:
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, cache=cache)
    return cache


def _assert_cache_identical(cache, reference):
    assert len(cache.layers) == len(reference.layers)
    for layer, expected in zip(cache.layers, reference.layers):
        assert layer.keys.shape == expected.keys.shape
        assert torch.equal(layer.keys, expected.keys)
        assert torch.equal(layer.values, expected.values)
    assert cache.get_seq_length() == reference.get_seq_length()


def test_registry():
    assert {"window", "reconstruction"} <= set(available_scorers())
    assert isinstance(get_scorer("window", window=8), WindowScorer)
    assert isinstance(get_scorer("reconstruction", chunk_size=16), ReconstructionScorer)
    with pytest.raises(ValueError, match="unknown scorer 'snap'.*reconstruction, window"):
        get_scorer("snap")
    with pytest.raises(TypeError, match="unexpected parameter.*windw.*window"):
        get_scorer("window", windw=8)


# ----------------------------------------------------------------------------------------------
# window


@pytest.mark.parametrize("arch", ARCHS)
def test_window_scores_equal_attention_scores_on_hand_computed_qk(models, arch):
    model = models[arch]
    ids = _ids(1, 40, seed=1)
    scorer = get_scorer("window", window=8)
    scores, cache = scorer.score(model, ids)
    num_layers = model.config.num_hidden_layers
    assert scores.shape == (1, num_layers, 2, 40) and scores.dtype == torch.float32
    positions = torch.arange(40)[None]
    theta = model.config.rope_parameters["rope_theta"]
    for layer in range(num_layers):
        hidden = layer_inputs(model, layer, input_ids=ids)
        q, k = reference_qk(model.model.layers[layer].self_attn, hidden, positions,
                            rope_theta=theta)
        expected = attention_scores(q[:, :, -8:], k)
        torch.testing.assert_close(scores[:, layer], expected, atol=1e-6, rtol=1e-5)
    _assert_cache_identical(cache, _plain_prefill(model, ids))


def test_window_reductions_and_window_longer_than_prompt(models):
    model = models["llama"]
    ids = _ids(1, 12, seed=2)
    hidden = layer_inputs(model, 0, input_ids=ids)
    q, k = reference_qk(model.model.layers[0].self_attn, hidden, torch.arange(12)[None])
    scores, _ = get_scorer("window", window=100, reduce="max", group_reduce="max").score(model, ids)
    expected = attention_scores(q, k, reduce="max", group_reduce="max")
    torch.testing.assert_close(scores[:, 0], expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# reconstruction


def _naive_reconstruction(model, ids, repeat_ids):
    """Run the model once over context + repeat prompt + context (eager attention, full
    attention matrices) and take, per context key, the largest probability any reconstruction
    query gives it, max over the heads of its GQA group."""
    length = ids.shape[1]
    sequence = torch.cat([ids, torch.tensor([repeat_ids]), ids], dim=1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(sequence, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    per_layer = []
    for probs in attentions:  # [1, H_q, L, L]
        best = probs[:, :, length:, :length].amax(dim=2)  # over reconstruction queries
        per_layer.append(best.view(1, -1, groups, length).amax(dim=2))
    return torch.stack(per_layer, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_reconstruction_equals_naive_and_leaves_cache_identical(models, arch):
    model = models[arch]
    ids = _ids(1, 30, seed=4)
    scorer = get_scorer("reconstruction", chunk_size=7, repeat_prompt=[5, 6, 7])
    scores, cache = scorer.score(model, ids)
    expected = _naive_reconstruction(model, ids, [5, 6, 7])
    torch.testing.assert_close(scores, expected, atol=2e-6, rtol=1e-4)
    _assert_cache_identical(cache, _plain_prefill(model, ids))
    assert cache.get_seq_length() == 30


def test_reconstruction_chunk_size_does_not_change_scores(models):
    model = models["qwen2"]
    ids = _ids(1, 25, seed=5)
    one, _ = get_scorer("reconstruction", chunk_size=1000, impl="torch").score(model, ids)
    many, _ = get_scorer("reconstruction", chunk_size=4, impl="torch").score(model, ids)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-5)


def test_reconstruction_default_repeat_prompt_and_tokenizer(models):
    model = models["llama"]  # LlamaConfig has bos_token_id = 1
    assert get_scorer("reconstruction").repeat_prompt_ids(model) == (1,)
    qwen = models["qwen2"]  # no bos_token_id: the documented default ids
    assert get_scorer("reconstruction").repeat_prompt_ids(qwen) == (0,)
    texts = []

    def tokenizer(text, add_special_tokens=True):
        texts.append((text, add_special_tokens))
        return {"input_ids": [3, 4]}

    assert get_scorer("reconstruction", tokenizer=tokenizer).repeat_prompt_ids(qwen) == (3, 4)
    assert texts == [(DEFAULT_REPEAT_PROMPT_TEXT, False)]
    scorer = get_scorer("reconstruction", repeat_prompt="again:", tokenizer=tokenizer)
    assert scorer.repeat_prompt_ids(qwen) == (3, 4) and texts[-1] == ("again:", False)
    assert get_scorer("reconstruction", repeat_prompt=torch.tensor([9])).repeat_prompt_ids(
        qwen) == (9,)


# ----------------------------------------------------------------------------------------------
# padded batches


@pytest.mark.parametrize("name,params", [("window", {"window": 6, "impl": "torch"}),
                                         ("reconstruction", {"chunk_size": 5, "impl": "torch"})])
def test_padded_batch_rows_equal_rows_alone(models, name, params):
    model = models["qwen3"]
    scorer = get_scorer(name, **params)
    length, pads = 20, (0, 6, 3)
    rows = [_ids(1, length - pad, seed=20 + i) for i, pad in enumerate(pads)]
    ids = torch.zeros(len(pads), length, dtype=torch.long)
    mask = torch.zeros(len(pads), length, dtype=torch.long)
    for i, (row, pad) in enumerate(zip(rows, pads)):
        ids[i, pad:], mask[i, pad:] = row[0], 1
    scores, cache = scorer.score(model, ids, mask)
    _assert_cache_identical(cache, _plain_prefill(model, ids, mask))
    for i, (row, pad) in enumerate(zip(rows, pads)):
        alone, _ = scorer.score(model, row)
        assert torch.all(scores[i, :, :, :pad] == NEG_INF)
        torch.testing.assert_close(scores[i, :, :, pad:], alone[0], atol=1e-5, rtol=1e-4)
        assert torch.isfinite(scores[i, :, :, pad:]).all()


def test_scoring_in_a_thread_while_another_model_runs(models):
    """The ProxyKV shape: a proxy scored in a worker thread while the target prefills in the
    main thread (its attention untouched)."""
    import threading
    proxy, target = models["qwen2"], models["llama"]
    ids = _ids(1, 24, seed=9)
    scorer = get_scorer("reconstruction", chunk_size=8, impl="torch")
    expected_scores, _ = scorer.score(proxy, ids)
    expected_target = _plain_prefill(target, ids)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=scorer.score(proxy, ids)))
    worker.start()
    for _ in range(3):
        target_cache = _plain_prefill(target, ids)
        _assert_cache_identical(target_cache, expected_target)
    worker.join()
    torch.testing.assert_close(result["out"].scores, expected_scores, atol=0, rtol=0)
    assert proxy.config._attn_implementation == "sdpa"


def test_eager_model(models):
    model = models["llama"]
    ids = _ids(1, 16, seed=11)
    expected, _ = get_scorer("reconstruction", chunk_size=6, impl="torch").score(model, ids)
    model.set_attn_implementation("eager")
    try:
        scores, cache = get_scorer("reconstruction", chunk_size=6, impl="torch").score(model, ids)
        _assert_cache_identical(cache, _plain_prefill(model, ids))
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_scorer_parameters():
    with pytest.raises(TypeError, match="window must be an int"):
        get_scorer("window", window="8")
    with pytest.raises(ValueError, match="window must be >= 1"):
        get_scorer("window", window=0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        get_scorer("window", reduce="median")
    with pytest.raises(ValueError, match="group_reduce must be one of"):
        get_scorer("window", group_reduce="sum")
    with pytest.raises(ValueError, match="impl must be one of"):
        get_scorer("window", impl="cuda")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        get_scorer("reconstruction", chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        get_scorer("reconstruction", chunk_size=2.0)
    with pytest.raises(ValueError, match="repeat_prompt is text, which needs tokenizer"):
        get_scorer("reconstruction", repeat_prompt="Repeat:")
    with pytest.raises(ValueError, match="repeat_prompt must hold at least one"):
        get_scorer("reconstruction", repeat_prompt=[])
    with pytest.raises(TypeError, match="repeat_prompt must hold int token ids"):
        get_scorer("reconstruction", repeat_prompt=[1, 2.5])
    with pytest.raises(TypeError, match="repeat_prompt must be text"):
        get_scorer("reconstruction", repeat_prompt=3)
    with pytest.raises(TypeError, match="repeat_prompt must be int32 or int64"):
        get_scorer("reconstruction", repeat_prompt=torch.tensor([1.0]))


def test_bad_score_arguments(models):
    model = models["qwen2"]
    scorer = get_scorer("window", window=4)
    ids = _ids(2, 10, seed=7)
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        scorer.score(model, [[1, 2, 3]])
    with pytest.raises(TypeError, match="input_ids must be int32 or int64"):
        scorer.score(model, ids.float())
    with pytest.raises(ValueError, match="input_ids must be a 2-D tensor"):
        scorer.score(model, ids[0])
    with pytest.raises(ValueError, match="input_ids must have B >= 1 and T >= 1"):
        scorer.score(model, ids[:, :0])
    bad = ids.clone()
    bad[1, 3] = 100
    with pytest.raises(ValueError, match=r"vocab_size=100.*got 100 at position \[1, 3\]"):
        scorer.score(model, bad)
    with pytest.raises(ValueError, match="max_position_embeddings = 1024"):
        scorer.score(model, torch.ones(1, 1025, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        scorer.score(model, ids, torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must be"):
        scorer.score(model, ids, torch.ones(2, 10))
    right = torch.ones(2, 10, dtype=torch.long)
    right[0, -2:] = 0
    with pytest.raises(ValueError, match="left-padded.*row 0"):
        scorer.score(model, ids, right)
    empty = torch.ones(2, 10, dtype=torch.long)
    empty[1] = 0
    with pytest.raises(ValueError, match="row 1 has no token"):
        scorer.score(model, ids, empty)
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        scorer.score(model, ids, torch.full((2, 10), 2))
    full = _plain_prefill(model, ids)
    with pytest.raises(ValueError, match="past_key_values must be empty"):
        scorer.score(model, ids, past_key_values=full)
    with pytest.raises(TypeError, match="past_key_values must be None or an empty"):
        scorer.score(model, ids, past_key_values=[])
    with pytest.raises(TypeError, match="PreTrainedModel"):
        scorer.score(torch.nn.Linear(2, 2), ids)
    with pytest.raises(ValueError, match=r"repeat_prompt must hold token ids in \[0, vocab"):
        get_scorer("reconstruction", repeat_prompt=[100]).score(model, ids)
    # nothing was left modified: the model still runs with its own attention
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_model_raises():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    for name in ("window", "reconstruction"):
        with pytest.raises(ValueError, match="supported architectures.*llama, mistral, qwen2"):
            get_scorer(name).score(gpt2, _ids(1, 8, seed=0))
