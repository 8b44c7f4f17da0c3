"""ProxyKV over tiny random-weight transformers models: generation from compressed caches against
plain ``generate`` (keep everything) and against an independent oracle (a full-model run whose
attention masks out exactly the dropped positions per KV head)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel  # noqa: E402

from proxykv.hf import CompressedCache, ProxyKV  # noqa: E402
from proxykv.hf.compressed import (  # noqa: E402
    disable_compressed_attention,
    enable_compressed_attention,
)
from proxykv.hf.pipeline import prefill  # noqa: E402
from proxykv.hf.scorers import _Prompt  # noqa: E402
from proxykv.hf.testing import tiny_model  # noqa: E402

ARCHS = ("qwen2", "llama", "qwen3")
VOCAB = 100


def pair(arch: str):
    """A target and a proxy of one family whose depth and KV head counts differ."""
    target = tiny_model(arch, num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=VOCAB)
    proxy = tiny_model(arch, num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                       vocab_size=VOCAB, seed=1)
    return target, proxy


@pytest.fixture(scope="module")
def models():
    return {arch: pair(arch) for arch in ARCHS}


def make(target, proxy=None, **kwargs) -> ProxyKV:
    """A pipeline on the torch kernels (fast on CPU); the Triton ones run in the oracle test."""
    kwargs.setdefault("impl", "torch")
    if proxy is not None:
        kwargs.setdefault("aligner", "depth_interp")
    return ProxyKV(target, proxy, **kwargs)


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def padded_batch():
    """Two rows, the second left-padded by 7."""
    ids = ids_of(2, 36, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# the oracle: the full model, no cache, attention masking the dropped context positions per head

ORACLE = "proxykv_test_oracle"


class Oracle:
    """Greedy decoding with the full model and no cache, where query positions at or past the
    context length ``T`` do not see the context positions the selection dropped (per layer and
    KV head); padding (left) is never seen."""

    def __init__(self, model, keep_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                 context_length: int):
        self.model, self.keep, self.context_length = model, keep_mask, context_length
        self.padding = attention_mask

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        b, h_q, s, d = query.shape
        group = h_q // key.shape[1]
        k = key.repeat_interleave(group, dim=1).float()
        v = value.repeat_interleave(group, dim=1).float()
        logits = query.float() @ k.transpose(-1, -2) * scaling
        allowed = torch.ones(s, s, dtype=torch.bool).tril().expand(b, h_q, s, s).clone()
        t = self.context_length
        keep = self.keep[:, module.layer_idx].repeat_interleave(group, dim=1)  # [B, H_q, T]
        allowed[:, :, t:, :t] &= keep[:, :, None, :]
        if self.padding is not None:
            allowed &= self.padding_mask[:, None, None, :s].bool()
            # a padding query sees nothing; let it see itself so no NaN enters the values
            allowed |= ~allowed.any(-1, keepdim=True) & torch.eye(s, dtype=torch.bool)
        logits = logits.masked_fill(~allowed, float("-inf"))
        out = logits.softmax(-1) @ v
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The full model's logits at every position of ``ids`` under the oracle's masks."""
        AttentionInterface.register(ORACLE, self.attention)
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ORACLE)
        try:
            self.padding_mask = torch.ones_like(ids) if self.padding is None else torch.cat(
                [self.padding, torch.ones(ids.shape[0], ids.shape[1] - self.padding.shape[1],
                                          dtype=self.padding.dtype)], dim=1)
            positions = (self.padding_mask.cumsum(1) - 1).clamp_min(0)
            with torch.no_grad():
                return self.model(input_ids=ids, position_ids=positions,
                                  use_cache=False).logits.float()
        finally:
            self.model.set_attn_implementation(previous)
            AttentionInterface._global_mapping.pop(ORACLE, None)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        for _ in range(new_tokens):
            ids = torch.cat([ids, self.logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids


# ---------------------------------------------------------------------------------------------
# keep everything == plain generate


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scorer", ["reconstruction", "window"])
@pytest.mark.parametrize("policy", ["topk", "head_budget"])
@pytest.mark.parametrize("with_proxy", [False, True])
def test_keep_everything_equals_generate(models, arch, scorer, policy, with_proxy):
    target, proxy = models[arch]
    ids = ids_of(1, 40)
    expected = target.generate(ids, max_new_tokens=6, do_sample=False)
    with make(target, proxy if with_proxy else None, policy=policy, scorer=scorer,
                 keep_ratio=1.0) as pipe:
        assert torch.equal(pipe.generate(ids, 6), expected)


@pytest.mark.parametrize("policy", ["topk", "head_budget"])
def test_keep_everything_padded_batch_equals_generate(models, policy):
    target, proxy = models["qwen2"]
    ids, mask = padded_batch()
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with make(target, proxy, policy=policy, keep_ratio=1.0) as pipe:
        assert torch.equal(pipe.generate(ids, 6, attention_mask=mask), expected)


# ---------------------------------------------------------------------------------------------
# pruned caches against the oracle


def _expected_rows(cache: CompressedCache, full_layers, layer: int):
    """(keys, values) of the kept positions of one layer, packed per (row, head), from the full
    cache and the selection's mask."""
    keep = cache.selection.to_mask()[:, layer]  # [B, H, T]
    keys, values = full_layers[layer]
    return keys[keep], values[keep]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["topk", "head_budget"])
def test_pruned_cache_holds_the_selected_positions(models, arch, policy):
    from proxykv.hf import prefill
    from proxykv.hf.scorers import _Prompt

    target, proxy = models[arch]
    ids = ids_of(1, 48, seed=5)
    with make(target, proxy, policy=policy, keep_ratio=0.4) as pipe:
        cache = pipe.compress(ids)
    full = prefill(target, _Prompt(target, ids, None))
    full_layers = [(layer.keys, layer.values) for layer in full.layers]
    assert cache.is_ragged == (policy == "head_budget")
    for layer in range(3):
        keys, values = _expected_rows(cache, full_layers, layer)
        if cache.is_ragged:
            got_k, got_v, _, _ = cache.ragged.to_packed(layer)
        else:
            got_k = cache.layers[layer].keys.reshape(-1, keys.shape[-1])
            got_v = cache.layers[layer].values.reshape(-1, keys.shape[-1])
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert cache.stats.kept.sum() == cache.selection.total_kept
    assert cache.stats.kv_bytes_after < cache.stats.kv_bytes_before


@pytest.mark.parametrize(("arch", "impl"), [(arch, "torch") for arch in ARCHS] +
                         [("qwen2", "triton")])
@pytest.mark.parametrize("policy", ["topk", "head_budget"])
@pytest.mark.parametrize("with_proxy", [False, True])
def test_pruned_generation_equals_masked_oracle(models, arch, impl, policy, with_proxy):
    target, proxy = models[arch]
    context, question = ids_of(1, 40, seed=7), ids_of(1, 5, seed=8)
    with make(target, proxy if with_proxy else None, policy=policy, keep_ratio=0.5,
              impl=impl) as pipe:
        cache = pipe.compress(context)
        answer = pipe.generate(question, 6, cache=cache)
        full_ids = torch.cat([context, question], dim=1)
        own = target.generate(full_ids, attention_mask=torch.ones_like(full_ids),
                              max_new_tokens=6, do_sample=False, cache=cache)
        cache.restore()
    oracle = Oracle(target, cache.selection.to_mask(), None, 40).generate(full_ids, 6)
    assert torch.equal(answer, oracle[:, 40:])
    assert torch.equal(own, oracle)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_over_a_pruned_cache_equal_the_masked_oracle(models, arch):
    target, proxy = models[arch]
    context, text = ids_of(1, 40, seed=7), ids_of(1, 9, seed=9)
    with make(target, proxy, policy="head_budget", keep_ratio=0.5) as pipe:
        cache = pipe.compress(context)
        before = pipe.generate(text[:, :3], 4, cache=cache)
        logits = pipe.logits(text, cache=cache)
        tail = pipe.logits(text, cache=cache, last=3)
        assert torch.equal(pipe.generate(text[:, :3], 4, cache=cache), before)  # restored
        for last in (0, 10, 1.5):
            with pytest.raises((ValueError, TypeError), match="last"):
                pipe.logits(text, cache=cache, last=last)
        with pytest.raises(TypeError, match="CompressedCache"):
            pipe.logits(text, cache=None)
    oracle = Oracle(target, cache.selection.to_mask(), None, 40).logits(
        torch.cat([context, text], dim=1))[:, 40:]
    assert logits.shape == (1, 9, VOCAB) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, oracle, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tail, logits[:, -3:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["topk", "head_budget"])
def test_pruned_padded_batch_rows_equal_running_alone(models, policy):
    target, proxy = models["qwen3"]
    ids, mask = padded_batch()
    question = ids_of(2, 4, seed=9)
    with make(target, proxy, policy=policy, keep_ratio=0.5) as pipe:
        cache = pipe.compress(ids, mask)
        together = pipe.generate(question, 5, cache=cache)
        full_ids = torch.cat([ids, question], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(question)], dim=1)
        own = target.generate(full_ids, attention_mask=full_mask, max_new_tokens=5,
                              do_sample=False, cache=cache)
        cache.restore()
        keep = cache.selection.to_mask()
        assert not keep[1, ..., :7].any()  # padding is never kept
        for row, pad in enumerate((0, 7)):
            alone = pipe.compress(ids[row:row + 1, pad:])
            assert torch.equal(alone.selection.to_mask(), keep[row:row + 1, ..., pad:])
            assert torch.equal(pipe.generate(question[row:row + 1], 5, cache=alone),
                               together[row:row + 1])
    oracle = Oracle(target, keep, mask, ids.shape[1]).generate(full_ids, 5)
    assert torch.equal(own, oracle)


def test_two_questions_equal_separate_runs(models):
    target, proxy = models["llama"]
    context = ids_of(1, 40, seed=11)
    questions = [ids_of(1, 4, seed=12), ids_of(1, 6, seed=13)]
    with make(target, proxy, policy="head_budget", keep_ratio=0.3) as pipe:
        cache = pipe.compress(context)
        answers = [pipe.generate(q, 5, cache=cache) for q in questions]
        assert cache.appended == 0
        for q, answer in zip(questions, answers):
            assert torch.equal(pipe.generate(q, 5, cache=pipe.compress(context)), answer)


@pytest.mark.parametrize("scorer", ["reconstruction", "window"])
def test_concurrent_and_sequential_select_the_same(models, scorer):
    target, proxy = models["qwen2"]
    ids = ids_of(2, 32, seed=14)
    masks = []
    for concurrent in (True, False):
        with make(target, proxy, scorer=scorer, policy="head_budget", keep_ratio=0.3,
                     concurrent=concurrent) as pipe:
            cache = pipe.compress(ids)
            assert cache.stats.concurrent is concurrent
            masks.append(cache.selection.to_mask())
    assert torch.equal(masks[0], masks[1])


def test_stats_and_restore(models):
    target, proxy = models["qwen2"]
    with make(target, proxy, policy="topk", keep_ratio=0.25) as pipe:
        cache = pipe.compress(ids_of(1, 40))
        stats = cache.stats
        assert set(stats.seconds) == {"target_prefill", "proxy_scoring", "align", "select",
                                      "compact", "total"}
        assert all(v >= 0 for v in stats.seconds.values())
        assert stats.kept.shape == (1, 3, 2) and bool((stats.kept == 10).all())
        assert stats.kv_bytes_after * 4 == stats.kv_bytes_before
        assert "saved" in stats.summary()
        assert torch.allclose(stats.kept_fraction, torch.full((1, 3, 2), 0.25, dtype=torch.float64))
        pipe.generate(ids_of(1, 3), 4, cache=cache)
        assert cache.get_seq_length() == 40 and cache.layers[0].keys.shape[-2] == 10


def test_close_restores_the_attention(models):
    target, _ = models["qwen2"]
    pipe = make(target, keep_ratio=0.5)
    assert target.config._attn_implementation == "proxykv_sdpa"
    pipe.close()
    assert target.config._attn_implementation == "sdpa"
    first, second = ProxyKV(target, keep_ratio=0.5), ProxyKV(target, keep_ratio=0.5)
    first.close()  # out of order: the second still needs the compressed attention
    assert target.config._attn_implementation == "proxykv_sdpa"
    second.close()
    second.close()
    assert target.config._attn_implementation == "sdpa"


def test_score_once_compact_at_several_budgets(models):
    target, proxy = models["qwen2"]
    ids = ids_of(1, 40, seed=21)
    with make(target, proxy, policy="head_budget", keep_ratio=0.5) as pipe:
        scored = pipe.score(ids)
        for ratio in (0.2, 0.5):
            assert torch.equal(pipe.compact(scored, keep_ratio=ratio).selection.to_mask(),
                               pipe.compress(ids, keep_ratio=ratio).selection.to_mask())
        scored.release()
        with pytest.raises(ValueError, match="released"):
            pipe.compact(scored)


def test_per_head_cache_refuses_the_stock_attention(models):
    target, proxy = models["qwen2"]
    ids = ids_of(1, 30)
    with make(target, proxy, policy="head_budget", keep_ratio=0.5) as pipe:
        cache = pipe.compress(ids)
        disable_compressed_attention(target)
        try:
            with pytest.raises(ValueError, match="enable_compressed_attention"):
                target(input_ids=ids_of(1, 2), cache=cache, use_cache=True)
        finally:
            enable_compressed_attention(target)
        assert cache.appended == 0
        # a cache built without a pipeline is caught by the next layer's update
        unbound = CompressedCache.from_selection(
            [(layer.keys, layer.values) for layer in prefill(target, _Prompt(target, ids, None))
             .layers], cache.selection)
    with pytest.raises(RuntimeError, match="enable_compressed_attention"):
        target(input_ids=ids_of(1, 2), cache=unbound, use_cache=True)


# ---------------------------------------------------------------------------------------------
# bad input: ValueError, nothing modified


def test_bad_input_leaves_the_models_untouched(models):
    target, proxy = models["qwen2"]
    other_vocab = tiny_model("qwen2", num_layers=2, vocab_size=VOCAB + 1)
    cases = [
        (dict(proxy=other_vocab, keep_ratio=0.5), "vocab_size"),
        (dict(proxy=proxy, aligner="linear", keep_ratio=0.5), None),  # shapes fit: fine
        (dict(proxy=None, aligner="depth_interp", keep_ratio=0.5), "aligner needs a proxy"),
        (dict(proxy=proxy, aligner="depth_interp", keep_ratio=0.5, budget=4), "exactly one"),
        (dict(proxy=proxy, aligner="depth_interp"), "exactly one"),
        (dict(proxy=proxy, aligner="depth_interp", keep_ratio=1.5), "keep_ratio"),
        (dict(proxy=proxy, keep_ratio=0.5), "align-train"),
    ]
    for kwargs, message in cases:
        if message is None:
            ProxyKV(target, **kwargs).close()
            continue
        with pytest.raises(ValueError, match=message):
            ProxyKV(target, **kwargs)
        assert target.config._attn_implementation == "sdpa"

    from proxykv.align import get_aligner

    wrong = get_aligner("linear", (3, 1), (3, 2))
    with pytest.raises(ValueError, match="aligner maps"):
        ProxyKV(target, proxy, aligner=wrong, keep_ratio=0.5)
    assert target.config._attn_implementation == "sdpa"


def test_bad_prompts_and_questions(models):
    target, proxy = models["qwen2"]
    with make(target, proxy, policy="head_budget", keep_ratio=0.5) as pipe:
        with pytest.raises(ValueError, match="max_position_embeddings"):
            pipe.compress(ids_of(1, 1025))
        with pytest.raises(ValueError, match="vocab_size"):
            pipe.compress(torch.full((1, 8), VOCAB))
        cache = pipe.compress(ids_of(2, 30))
        before = cache.selection.to_mask()
        with pytest.raises(ValueError, match="batch size"):
            pipe.generate(ids_of(1, 3), 4, cache=cache)
        with pytest.raises(TypeError, match="CompressedCache"):
            pipe.generate(ids_of(2, 3), 4, cache=object())
        assert cache.appended == 0 and torch.equal(cache.selection.to_mask(), before)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="supported architectures"):
        ProxyKV(gpt2, keep_ratio=0.5)


def test_a_proxy_with_another_tokenizer_is_refused(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from proxykv.zoo.tokenizer import save_tokenizer

    for name, seed in (("target", 0), ("proxy", 1)):
        tiny_model("qwen2", num_layers=2, vocab_size=256, seed=seed).save_pretrained(
            tmp_path / name)
        save_tokenizer(tmp_path / name)
    target, proxy = (AutoModelForCausalLM.from_pretrained(str(tmp_path / name))
                     for name in ("target", "proxy"))
    ProxyKV(target, proxy, aligner="depth_interp", keep_ratio=0.5).close()  # same tokenizer
    path = tmp_path / "proxy" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["k0"], vocab["k1"] = vocab["k1"], vocab["k0"]  # same size, other ids
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="tokenizer"):
        ProxyKV(target, proxy, keep_ratio=0.5)
    assert target.config._attn_implementation == "sdpa"


def test_the_full_cache_is_released_after_compaction(models):
    import gc
    import weakref

    target, proxy = models["qwen2"]
    with make(target, proxy, policy="head_budget", keep_ratio=0.3) as pipe:
        scored = pipe.score(ids_of(1, 40))
        full = weakref.ref(scored.cache)
        cache = pipe.compact(scored)
        scored.release()
        gc.collect()
        assert full() is None  # the compressed cache keeps only the gathered pairs
        assert cache.stats.kv_bytes_after < cache.stats.kv_bytes_before


def test_sampling_arguments(models):
    target, proxy = models["qwen2"]
    context, question = ids_of(1, 30, seed=31), ids_of(1, 3, seed=32)
    with make(target, proxy, keep_ratio=0.5) as pipe:
        cache = pipe.compress(context)
        greedy = pipe.generate(question, 6, cache=cache)
        assert torch.equal(pipe.generate(question, 6, cache=cache, do_sample=True, top_k=1),
                           greedy)
        draws = [pipe.generate(question, 6, cache=cache, do_sample=True, temperature=2.0,
                               top_p=0.9, generator=torch.Generator().manual_seed(s))
                 for s in (0, 0, 1)]
        assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
        with pytest.raises(ValueError, match="temperature"):
            pipe.generate(question, 2, cache=cache, do_sample=True, temperature=0.0)
        assert cache.appended == 0
        stopped = pipe.generate(question, 6, cache=cache, eos_token_id=int(greedy[0, 3]))
        assert stopped.shape[1] == 3 + 1 and int(stopped[0, -1]) == int(greedy[0, 3])


@pytest.mark.parametrize("policy", ["topk", "head_budget"])
def test_eager_models_get_the_compressed_eager_attention(policy):
    target = tiny_model("llama", num_layers=3, vocab_size=VOCAB, attn_implementation="eager")
    ids = ids_of(1, 36, seed=41)
    expected = target.generate(ids, max_new_tokens=5, do_sample=False)
    with make(target, policy=policy, keep_ratio=1.0) as pipe:
        assert target.config._attn_implementation == "proxykv_eager"
        # the fallback to eager for an ordinary cache leaves generate unchanged
        assert torch.equal(target.generate(ids, max_new_tokens=5, do_sample=False), expected)
        assert torch.equal(pipe.generate(ids, 5), expected)
    assert target.config._attn_implementation == "eager"
