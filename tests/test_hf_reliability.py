"""The pipeline's reliability rules (docs/bad-input.md, "Pipeline"): a failed call leaves every
object as it was; an object used with the wrong partner, or after its pipeline closed, is refused
by name; length checks run before the prefill; what ``generate`` cannot honour is refused."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from proxykv import get_policy  # noqa: E402
from proxykv.hf import ProxyKV  # noqa: E402
from proxykv.hf.testing import tiny_model  # noqa: E402

VOCAB = 100


@pytest.fixture(scope="module")
def target():
    return tiny_model("qwen2", num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def proxy():
    return tiny_model("qwen2", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                      vocab_size=VOCAB, seed=1)


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def layer_contents(cache) -> list:
    """Every layer's kept rows (uniform) or the ragged cache's per-layer positions and rows."""
    if cache.is_ragged:
        return [tuple(t.clone() for t in cache.ragged.to_packed(index))
                for index in range(len(cache.layers))]
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def assert_same_contents(before, after):
    assert len(before) == len(after)
    for first, second in zip(before, after):
        for a, b in zip(first, second):
            assert torch.equal(a, b)


class FailOnce:
    """A forward pre-hook on one decoder layer that raises the first time the layer is entered
    (the layers before it have appended their rows by then)."""

    def __init__(self, model, layer: int):
        self.handle = model.model.layers[layer].register_forward_pre_hook(self)
        self.armed = True

    def __call__(self, module, args):
        if self.armed:
            self.armed = False
            raise RuntimeError("injected failure")

    def remove(self):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------
# a proxy that shares modules with the target (issue item 2)


def test_target_as_its_own_proxy_runs_sequentially_and_repeats(target):
    ids = ids_of(1, 48, seed=2)
    with pytest.raises(ValueError, match="shares modules with the target"):
        ProxyKV(target, target, aligner="depth_interp", keep_ratio=0.3, concurrent=True)
    assert target.config._attn_implementation == "sdpa"
    with ProxyKV(target, target, aligner="depth_interp", keep_ratio=0.3, impl="torch") as pipe:
        assert pipe.concurrent is False
        masks = [pipe.compress(ids).selection.to_mask() for _ in range(3)]
        assert all(torch.equal(masks[0], mask) for mask in masks[1:])
        assert pipe.compress(ids).stats.concurrent is False


# ---------------------------------------------------------------------------------------------
# close() for good; a dropped pipeline restores the target


def test_a_closed_pipeline_and_its_caches_refuse_further_use(target):
    ids = ids_of(1, 30)
    for policy in ("topk", "head_budget"):
        pipe = ProxyKV(target, keep_ratio=0.5, policy=policy, impl="torch")
        cache = pipe.compress(ids)
        scored = pipe.score(ids)
        before = layer_contents(cache)
        pipe.close()
        assert pipe.closed and target.config._attn_implementation == "sdpa"
        for call in (lambda: pipe.compress(ids), lambda: pipe.score(ids),
                     lambda: pipe.compact(scored), lambda: pipe.generate(ids_of(1, 2), 2,
                                                                          cache=cache)):
            with pytest.raises(ValueError, match="closed"):
                call()
        with pytest.raises(ValueError, match="closed"):
            target(input_ids=ids_of(1, 2), cache=cache, use_cache=True)
        assert cache.appended == 0
        assert_same_contents(before, layer_contents(cache))


def test_a_dropped_pipeline_does_not_leave_the_target_switched(target):
    pipe = ProxyKV(target, keep_ratio=0.5)
    assert target.config._attn_implementation == "proxykv_sdpa"
    del pipe
    gc.collect()
    assert target.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------
# the wrong partner


def test_a_cache_is_refused_by_another_model(target):
    other = tiny_model("qwen2", num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
                       seed=5)
    ids = ids_of(1, 30)
    with ProxyKV(target, keep_ratio=0.5, policy="head_budget", impl="torch") as mine, \
            ProxyKV(other, keep_ratio=0.5, impl="torch") as theirs:
        cache = mine.compress(ids)
        before = layer_contents(cache)
        with pytest.raises(ValueError, match="not made by this pipeline's target"):
            theirs.generate(ids_of(1, 2), 2, cache=cache)
        with pytest.raises(ValueError, match="made for another model"):
            other(input_ids=ids_of(1, 2), cache=cache, use_cache=True)
        assert_same_contents(before, layer_contents(cache))
        assert cache.appended == 0
        mine.generate(ids_of(1, 2), 2, cache=cache)  # still usable by its own model


def test_a_proxy_needs_an_aligner(target, proxy):
    with pytest.raises(ValueError, match="proxykv align-train"):
        ProxyKV(target, proxy, keep_ratio=0.3)
    assert target.config._attn_implementation == "sdpa"


def test_an_aligner_folder_that_is_missing_is_named(target, proxy, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ProxyKV(target, proxy, aligner=str(tmp_path / "nope"), keep_ratio=0.3)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ProxyKV(target, proxy, aligner=tmp_path / "nope", keep_ratio=0.3)
    with pytest.raises(ValueError, match="neither a registered aligner"):
        ProxyKV(target, proxy, aligner="axail", keep_ratio=0.3)


# ---------------------------------------------------------------------------------------------
# a failed call leaves every object as it was


@pytest.mark.parametrize("policy", ["topk", "head_budget"])
def test_a_generation_that_fails_part_way_leaves_the_cache_whole(target, policy):
    context, question = ids_of(1, 40, seed=4), ids_of(1, 3, seed=5)
    with ProxyKV(target, keep_ratio=0.4, policy=policy, impl="torch") as pipe:
        cache = pipe.compress(context)
        before = layer_contents(cache)
        expected = pipe.generate(question, 4, cache=cache)
        for failing_layer, new_tokens in ((1, 4), (2, 1)):
            hook = FailOnce(target, failing_layer)
            try:
                with pytest.raises(RuntimeError, match="injected"):
                    pipe.generate(question, new_tokens, cache=cache)
            finally:
                hook.remove()
            assert cache.appended == 0
            assert_same_contents(before, layer_contents(cache))
            assert torch.equal(pipe.generate(question, 4, cache=cache), expected)

        # the model's own forward, failing in layer 2 after layers 0 and 1 appended
        hook = FailOnce(target, 2)
        full_ids = torch.cat([context, question], dim=1)
        try:
            with pytest.raises(RuntimeError, match="injected"):
                target(input_ids=question, position_ids=torch.arange(40, 43)[None],
                       cache=cache, use_cache=True)
        finally:
            hook.remove()
        assert cache.get_seq_length() == 40  # the layers that appended were rolled back
        assert_same_contents(before, layer_contents(cache))
        out = target.generate(full_ids, max_new_tokens=4, do_sample=False, cache=cache,
                              attention_mask=torch.ones_like(full_ids))
        assert torch.equal(out[:, 40:], expected)


def test_beam_search_is_refused_and_the_cache_stays_usable(target):
    context, question = ids_of(1, 40, seed=6), ids_of(1, 3, seed=7)
    full_ids = torch.cat([context, question], dim=1)
    with ProxyKV(target, keep_ratio=0.5, impl="torch") as pipe:
        cache = pipe.compress(context)
        before = layer_contents(cache)
        for kwargs in (dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
            with pytest.raises(ValueError, match="beam search"):
                target.generate(full_ids, max_new_tokens=3, cache=cache, **kwargs)
            assert cache.appended == 0
            assert_same_contents(before, layer_contents(cache))
        assert pipe.generate(question, 3, cache=cache).shape == (1, 6)


def test_length_checks_run_before_the_prefill(target):
    calls = []
    handle = target.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = ids_of(2, 30)
    mask = torch.ones_like(ids)
    mask[1, :12] = 0  # row 1 has 18 tokens
    try:
        with ProxyKV(target, budget=20, impl="torch") as pipe:
            with pytest.raises(ValueError, match=r"row 1 .*18 tokens.*budget must be <= T=18"):
                pipe.compress(ids, mask)
        window = get_policy("pooled_window", window=20)
        with ProxyKV(target, policy=window, keep_ratio=0.9, impl="torch") as pipe:
            with pytest.raises(ValueError, match="row 1 .*18 tokens"):
                pipe.compress(ids, mask)
    finally:
        handle.remove()
    assert calls == []


# ---------------------------------------------------------------------------------------------
# ProxyKV.generate honours the generation config or refuses it


def test_generate_honours_the_repetition_penalty(target):
    ids = ids_of(1, 24, seed=8)
    config = target.generation_config
    try:
        config.repetition_penalty = 1.8
        expected = target.generate(ids, max_new_tokens=8, do_sample=False)
        with ProxyKV(target, scorer="random", keep_ratio=1.0, impl="torch") as pipe:
            assert torch.equal(pipe.generate(ids, 8), expected)
            cache = pipe.compress(ids[:, :-1])
            assert torch.equal(pipe.generate(ids[:, -1:], 8, cache=cache)[:, 1:],
                               expected[:, 24:])
            config.repetition_penalty = None
            plain = pipe.generate(ids, 8)
        assert not torch.equal(plain, expected)  # the penalty changed the answer
    finally:
        config.repetition_penalty = None


def test_generate_refuses_what_it_does_not_apply(target):
    config = target.generation_config
    with ProxyKV(target, scorer="random", keep_ratio=1.0, impl="torch") as pipe:
        for name, value in (("no_repeat_ngram_size", 2), ("num_beams", 3),
                            ("min_new_tokens", 4)):
            setattr(config, name, value)
            try:
                with pytest.raises(ValueError, match=f"{name}={value}"):
                    pipe.generate(ids_of(1, 10), 3)
            finally:
                setattr(config, name, None)


# ---------------------------------------------------------------------------------------------
# errors that name the cause


def test_nan_scores_name_the_model_that_produced_them(target, proxy):
    broken = tiny_model("qwen2", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                        vocab_size=VOCAB, seed=1)
    with torch.no_grad():
        broken.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with ProxyKV(target, broken, aligner="depth_interp", keep_ratio=0.5, impl="torch") as pipe:
        with pytest.raises(ValueError, match=r"the proxy \(Qwen2ForCausalLM, 2 layers\)"):
            pipe.compress(ids_of(1, 20))


def test_proxykv_is_served_lazily_from_the_package():
    code = ("import sys, proxykv; assert 'transformers' not in sys.modules; "
            "import proxykv.hf; assert proxykv.ProxyKV is proxykv.hf.ProxyKV; "
            "assert 'ProxyKV' in dir(proxykv)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_aligner_trained_for_another_pair_warns(target, proxy, tmp_path):
    import warnings

    from proxykv.align import get_aligner
    from proxykv.hf.identity import model_fingerprint

    other_target = tiny_model("qwen2", num_layers=3, num_heads=4, num_kv_heads=2,
                              vocab_size=VOCAB, seed=9)
    aligner = get_aligner("linear", (2, 1), (3, 2))
    aligner.save(tmp_path / "mine", metadata={"target_fingerprint": model_fingerprint(target),
                                              "proxy_fingerprint": model_fingerprint(proxy)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProxyKV(target, proxy, aligner=str(tmp_path / "mine"), keep_ratio=0.3).close()
    with pytest.warns(UserWarning, match=r"trained for another target model.*align-train"):
        ProxyKV(other_target, proxy, aligner=str(tmp_path / "mine"), keep_ratio=0.3).close()
