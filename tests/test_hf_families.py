"""ProxyKV over every supported family (tiny random configs): hybrid sliding/global layers (Gemma 2
and 3, gpt-oss, Qwen2/3 with sliding windows), soft-capping (Gemma 2), attention sinks (gpt-oss),
Mistral and Phi-3. Keep 1.0 must equal plain greedy ``generate``; a pruned cache must equal an
oracle: the full model under its own eager attention (its window, soft-cap and sinks) with the
dropped context positions masked per layer and KV head."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from proxykv.hf import ProxyKV, get_scorer
from proxykv.hf.architectures import layer_layout
from proxykv.hf.capture import stock_attention_function
from proxykv.hf.pipeline import prefill, shares_modules_with
from proxykv.hf.proxies import early_layers_proxy
from proxykv.hf.scorers import _Prompt
from proxykv.hf.testing import TINY_WINDOW, tiny_model

FAMILIES = ("mistral", "phi3", "qwen2_sliding", "qwen3_sliding", "gemma2", "gemma3_text",
            "gpt_oss")
HYBRID = ("qwen2_sliding", "gemma2", "gemma3_text", "gpt_oss")
#: families whose attention transformers runs in eager only (soft-capping, sinks)
EAGER_ONLY = ("gemma2", "gpt_oss")
VOCAB = 100
CONTEXT = 40  # > TINY_WINDOW: the sliding layers drop part of the context


def build(arch: str, **sizes):
    implementation = "eager" if arch in EAGER_ONLY else "sdpa"
    return tiny_model(arch, vocab_size=VOCAB, attn_implementation=implementation, **sizes)


def pair(arch: str):
    target = build(arch, num_layers=4, num_heads=4, num_kv_heads=2)
    proxy = build(arch, num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, seed=1)
    return target, proxy


@pytest.fixture(scope="module")
def models():
    return {arch: pair(arch) for arch in FAMILIES}


def make(target, proxy=None, **kwargs) -> ProxyKV:
    kwargs.setdefault("impl", "torch")
    if proxy is not None:
        kwargs.setdefault("aligner", "depth_interp")
    return ProxyKV(target, proxy, **kwargs)


def ids_of(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """The model's own greedy ``generate``; the mask is explicit because random ids hold the
    configs' pad token, which ``generate`` would otherwise take for padding."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, **kwargs)


def test_the_tiny_models_exercise_what_each_family_adds(models):
    for arch in HYBRID:
        layout = layer_layout(models[arch][0])
        assert layout.compressible and set(layout.sliding.values()) == {TINY_WINDOW}, arch
    assert models["gemma2"][0].config.attn_logit_softcapping is not None
    assert hasattr(models["gpt_oss"][0].model.layers[0].self_attn, "sinks")
    for arch in ("mistral", "phi3"):
        assert not layer_layout(models[arch][0]).sliding


# ---------------------------------------------------------------------------------------------
# keep everything == plain generate


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("scorer", ["reconstruction", "window"])
@pytest.mark.parametrize("with_proxy", [False, True])
def test_keep_everything_equals_generate(models, arch, scorer, with_proxy):
    target, proxy = models[arch]
    ids = ids_of(CONTEXT)
    expected = greedy(target, ids, 8)
    policy = "head_budget" if with_proxy else "topk"
    with make(target, proxy if with_proxy else None, scorer=scorer, policy=policy,
              keep_ratio=1.0) as pipe:
        assert torch.equal(pipe.generate(ids, 8), expected)
        cache = pipe.compress(ids[:, :-1])
        own = greedy(target, ids, 8, cache=cache)
        assert torch.equal(own, expected)


# ---------------------------------------------------------------------------------------------
# pruned caches against the oracle

ORACLE = "proxykv_test_family_oracle"


def oracle_generate(model, keep: torch.Tensor, context_length: int, ids: torch.Tensor,
                    new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the full model, no cache, under its own eager attention, where a
    query past the context does not see the context positions ``keep [1, Lc, H_kv, T]`` drops
    in the compressible layers."""
    layout = layer_layout(model)

    def attention(module, query, key, value, attention_mask, **kwargs):
        index = layout.index_of(module.layer_idx)
        if index is not None:
            b, h_q, s, _ = query.shape
            group = h_q // key.shape[1]
            dropped = ~keep[:, index].repeat_interleave(group, dim=1)  # [B, H_q, T]
            mask = attention_mask[..., :key.shape[2]].expand(b, h_q, s, key.shape[2]).clone()
            lowest = torch.finfo(mask.dtype).min
            mask[:, :, context_length:, :context_length] = mask[
                :, :, context_length:, :context_length].masked_fill(dropped[:, :, None], lowest)
            attention_mask = mask
        return stock_attention_function("eager", module)(module, query, key, value,
                                                         attention_mask, **kwargs)

    AttentionInterface.register(ORACLE, attention)
    AttentionMaskInterface.register(ORACLE, AttentionMaskInterface._global_mapping["eager"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(ORACLE)
    try:
        for _ in range(new_tokens):
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop(ORACLE, None)
        AttentionMaskInterface._global_mapping.pop(ORACLE, None)
    return ids


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize(("policy", "with_proxy"), [("topk", False), ("head_budget", True)])
def test_pruned_generation_equals_masked_oracle(models, arch, policy, with_proxy):
    target, proxy = models[arch]
    context, question = ids_of(CONTEXT, seed=7), ids_of(5, seed=8)
    with make(target, proxy if with_proxy else None, policy=policy, keep_ratio=0.3) as pipe:
        cache = pipe.compress(context)
        answer = pipe.generate(question, 12, cache=cache)  # the answer passes the window
        full_ids = torch.cat([context, question], dim=1)
        own = greedy(target, full_ids, 12, cache=cache)
        cache.restore()
    keep = cache.selection.to_mask()
    assert not bool(keep.all())
    expected = oracle_generate(target, keep, CONTEXT, full_ids, 12)
    assert torch.equal(answer, expected[:, CONTEXT:])
    assert torch.equal(own, expected)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_triton_compressed_attention_equals_the_oracle(models, arch):
    target, _ = models[arch]
    context, question = ids_of(CONTEXT, seed=3), ids_of(4, seed=4)
    with make(target, policy="head_budget", keep_ratio=0.4, impl="triton") as pipe:
        cache = pipe.compress(context)
        answer = pipe.generate(question, 6, cache=cache)
    expected = oracle_generate(target, cache.selection.to_mask(), CONTEXT,
                               torch.cat([context, question], dim=1), 6)
    assert torch.equal(answer, expected[:, CONTEXT:])


# ---------------------------------------------------------------------------------------------
# hybrid caches: what is compressed, what is kept, restore


@pytest.mark.parametrize("arch", HYBRID)
@pytest.mark.parametrize("policy", ["topk", "head_budget"])
def test_sliding_layers_are_kept_as_the_prefill_left_them(models, arch, policy):
    target, _ = models[arch]
    ids = ids_of(CONTEXT, seed=5)
    layout = layer_layout(target)
    with make(target, policy=policy, keep_ratio=0.3) as pipe:
        cache = pipe.compress(ids)
    full = prefill(target, _Prompt(target, ids, None))
    assert cache.compressed_layers == layout.compressible == cache.stats.compressed_layers
    assert cache.selection.num_layers == len(layout.compressible)
    assert tuple(cache.stats.kept.shape) == (1, len(layout.compressible), 2)
    sliding_bytes = 0
    for index in layout.sliding:
        layer = cache.layers[index]
        assert layer.is_sliding
        assert torch.equal(layer.keys, full.layers[index].keys)
        assert torch.equal(layer.values, full.layers[index].values)
        assert layer.keys.shape[2] == TINY_WINDOW - 1  # bounded by the window, not the context
        sliding_bytes += layer.keys.nbytes + layer.values.nbytes
    row_bytes = 2 * cache.head_dim * 4
    assert cache.stats.kv_bytes_after == int(cache.stats.kept.sum()) * row_bytes + sliding_bytes
    assert cache.stats.kv_bytes_before == sum(layer.keys.nbytes + layer.values.nbytes
                                              for layer in full.layers)
    assert "layers compressed: " + ", ".join(map(str, layout.compressible)) in \
        cache.stats.summary()


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss"])
@pytest.mark.parametrize("policy", ["topk", "head_budget"])
def test_two_questions_past_the_window_equal_separate_runs(models, arch, policy):
    """An answer longer than the window pushes the sliding layers' context rows out; restore must
    bring them back for the next question."""
    target, proxy = models[arch]
    context, first, second = ids_of(CONTEXT, seed=1), ids_of(6, seed=2), ids_of(6, seed=3)
    with make(target, proxy, policy=policy, keep_ratio=0.5) as pipe:
        cache = pipe.compress(context)
        pipe.generate(first, 2 * TINY_WINDOW, cache=cache)
        again = pipe.generate(second, 8, cache=cache)
        alone = pipe.generate(second, 8, cache=pipe.compress(context))
    assert torch.equal(again, alone)


def test_an_interrupted_forward_leaves_the_sliding_layers_as_they_were(models):
    """The model's own generate raises after the first layers (a sliding one among them) took
    the question's rows; the cache's next use must roll them back, without a restore()."""
    target, _ = models["gemma3_text"]
    context, question = ids_of(CONTEXT, seed=11), ids_of(4, seed=12)
    full_ids = torch.cat([context, question], dim=1)
    with make(target, keep_ratio=0.5) as pipe:
        cache = pipe.compress(context)
        expected = greedy(target, full_ids, 6, cache=cache)
        cache.restore()
        last = target.model.layers[-1].self_attn
        handle = last.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(
            RuntimeError("interrupted")))
        try:
            with pytest.raises(RuntimeError, match="interrupted"):
                greedy(target, full_ids, 6, cache=cache)
        finally:
            handle.remove()
        assert torch.equal(greedy(target, full_ids, 6, cache=cache), expected)


def test_scores_cover_the_full_attention_layers_only(models):
    target, _ = models["gemma3_text"]
    ids = ids_of(CONTEXT)
    layout = layer_layout(target)
    for name in ("reconstruction", "window"):
        scores, cache = get_scorer(name, impl="torch").score(target, ids)
        assert tuple(scores.shape) == (1, len(layout.compressible), 2, CONTEXT)
        plain = prefill(target, _Prompt(target, ids, None))
        for got, want in zip(cache.layers, plain.layers):  # the scorer's prefill, untouched
            assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
            assert got.get_seq_length() == want.get_seq_length()


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss", "gemma3_text"])
def test_window_scores_are_the_models_own_attention(models, arch):
    """SnapKV scores of each compressible layer equal the model's own eager attention weights
    (its soft-cap, its sinks' share) averaged over the window's queries and each GQA group."""
    target, _ = models[arch]
    ids, window = ids_of(CONTEXT, seed=21), 8
    scores, _ = get_scorer("window", window=window, impl="torch").score(target, ids)
    previous = target.config._attn_implementation
    target.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = target(ids, output_attentions=True).attentions  # per layer [1, Hq, T, T]
    finally:
        target.set_attn_implementation(previous)
    layout = layer_layout(target)
    for index, layer in enumerate(layout.compressible):
        per_query_head = weights[layer][:, :, -window:].mean(dim=2)  # [1, H_q, T]
        expected = per_query_head.view(1, 2, -1, CONTEXT).mean(dim=2)
        torch.testing.assert_close(scores[:, index], expected, rtol=1e-4, atol=1e-6)


def test_every_layer_sliding_is_refused_before_any_change():
    model = build("mistral", num_layers=2, sliding_window=TINY_WINDOW)
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"every layer attends through a sliding window \(16 "
                                         r"tokens.*sliding_window=None"):
        ProxyKV(model, keep_ratio=0.5)
    assert model.config._attn_implementation == before


# ---------------------------------------------------------------------------------------------
# early_layers_proxy


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_oss"])
def test_early_layers_proxy_is_the_targets_first_layers(arch):
    target = build(arch, num_layers=4)
    proxy = early_layers_proxy(target, 2)
    assert type(proxy) is type(target) and proxy.config.num_hidden_layers == 2
    assert not shares_modules_with(target, proxy)
    target_tensors = dict(target.named_parameters())
    for name, parameter in proxy.named_parameters():
        assert parameter is target_tensors[name]  # shared, not copied
    ids = ids_of(CONTEXT)
    with torch.no_grad():
        inside = target.model(ids, output_hidden_states=True).hidden_states
        own = proxy.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(own[1], inside[1])  # after the first layer
    assert torch.equal(own[2], proxy.model.norm(inside[2]))  # its head sees layer 1, normed
    assert proxy.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 4


def test_early_layers_proxy_runs_beside_its_target():
    target = build("gemma3_text", num_layers=4)
    proxy = early_layers_proxy(target, 2)
    ids = ids_of(CONTEXT, seed=9)
    expected = greedy(target, ids, 6)
    with make(target, proxy, keep_ratio=1.0) as pipe:
        assert pipe.concurrent  # its modules are its own
        assert torch.equal(pipe.generate(ids, 6), expected)
    selections = []
    for concurrent in (True, False):
        with make(target, proxy, keep_ratio=0.3, concurrent=concurrent) as pipe:
            selections.append(pipe.compress(ids).selection.to_mask())
            assert proxy.config._attn_implementation == "sdpa"
    assert torch.equal(*selections)
    assert target.config._attn_implementation == "sdpa"
    assert torch.equal(greedy(target, ids, 6), expected)


def test_early_layers_proxy_refuses_bad_requests():
    target = build("gemma3_text", num_layers=4)  # layer 0 slides, layer 1 is global
    with pytest.raises(ValueError, match=r"num_layers = 1: .* first full-attention layer is "
                                         r"layer 1, so num_layers must be >= 2"):
        early_layers_proxy(target, 1)
    for bad in (0, 4, 5):
        with pytest.raises(ValueError, match="num_layers"):
            early_layers_proxy(target, bad)
    with pytest.raises(TypeError, match="num_layers"):
        early_layers_proxy(target, 2.0)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        early_layers_proxy(torch.nn.Linear(2, 2), 1)
