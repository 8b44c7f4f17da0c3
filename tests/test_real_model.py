"""ProxyKV on a real pretrained model: Google's Gemma 3 270M (base), built by
``proxykv.hf.checkpoints.get("gemma3-270m")`` from its registry package (the ``gemma`` extra; the
first run converts it, about a minute, and later runs reuse the cached folder).

Real text: paragraphs of Python's own reference documentation (``pydoc_data.topics``, shipped
with CPython under the PSF licence), prose paragraphs only (no grammar or code blocks).

- keep 1.0: ``ProxyKV.generate`` equals the model's own greedy ``generate`` over ~1k tokens;
- keep 0.3: a pass key the full cache retrieves survives compression. What keeps it, measured
  here: the digits after the key's first one score low under every per-token scorer (KVzip's
  reconstruction ranks them in the lower half), so a per-token top-k drops them and the model
  answers the key's first digits; SnapKV's question-aware recipe — a short observation window
  that holds the question and max-pooled scores that keep a high-scoring token's neighbours —
  keeps the whole key (4/4 prompts at kernel 15, 3/4 at 11,
  0/4 at 7; the reconstruction scorer 0/4 at every kernel).
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from proxykv.hf import ProxyKV, get_scorer
from proxykv.hf.architectures import layer_layout
from proxykv.policies import get_policy
from proxykv.realtext import paragraphs

pytestmark = pytest.mark.slow
CONTEXT = 1000
# The torch kernels: the suite runs with TRITON_INTERPRET=1, where impl=None would interpret the
# Triton ones (minutes at these lengths; tests/test_hf_families.py runs them on the same paths).


def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False)


def test_it_is_the_hybrid_model_the_notes_describe(gemma):
    model, _ = gemma
    layout = layer_layout(model)
    assert layout.compressible == (5, 11, 17)
    assert set(layout.sliding.values()) == {512} and len(layout.sliding) == 15


def test_keep_everything_equals_greedy_generate_over_real_prose(gemma):
    model, tokenizer = gemma
    text = " ".join(paragraphs("all")[10:40])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :CONTEXT]
    assert ids.shape[1] == CONTEXT
    expected = greedy(model, ids, 12)
    for scorer in ("reconstruction", "window"):
        with ProxyKV(model, scorer=scorer, keep_ratio=1.0, impl="torch") as pipe:
            assert torch.equal(pipe.generate(ids, 12), expected), scorer


def pass_key_prompt(tokenizer, seed: int) -> tuple[int, torch.Tensor]:
    """Real prose (~1.1k tokens) with a pass-key sentence at a seeded depth, closed by the
    sentence the key completes."""
    rng = random.Random(seed)
    key = rng.randint(10000, 99999)
    chosen = rng.sample(paragraphs("all"), 14)
    chosen.insert(rng.randint(2, 9), f"The pass key is {key}. Remember it. {key} is the pass key.")
    context = tokenizer(" ".join(chosen), return_tensors="pt").input_ids[:, :1100]
    question = tokenizer(" The pass key is", add_special_tokens=False,
                         return_tensors="pt").input_ids
    return key, torch.cat([context, question], dim=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_pass_key_survives_keep_0_3(gemma, seed):
    model, tokenizer = gemma
    key, ids = pass_key_prompt(tokenizer, seed)
    answer = tokenizer.decode(greedy(model, ids, 7)[0, ids.shape[1]:])
    assert str(key) in answer, f"the full cache does not retrieve the key: {answer!r}"
    policy = get_policy("pooled_window", window=16, kernel_size=15, mode="max")
    with ProxyKV(model, scorer=get_scorer("window", window=16, impl="torch"), policy=policy,
                 keep_ratio=0.3, impl="torch") as pipe:
        compressed = pipe.generate(ids, 7)
        stats = pipe.compress(ids[:, :-1]).stats
    assert stats.compressed_layers == (5, 11, 17)
    assert stats.kept_fraction.max() <= 0.3 + 1 / ids.shape[1]
    answer = tokenizer.decode(compressed[0, ids.shape[1]:])
    assert str(key) in answer, f"keep 0.3 lost the key {key}: {answer!r}"
