"""The zoo's saved tokenizer loads through plain ``AutoTokenizer.from_pretrained`` as it was built.

transformers 5 replaces the saved tokenizer class of some model types (Qwen2, the zoo's
architecture, among them) with its own, which rebuilds a byte-level BPE tokenizer from the
word-level ``tokenizer.json``; :func:`proxykv.zoo.tokenizer.save_tokenizer` saves the tokenizer so
that this does not happen. CI also runs this file on the lowest supported transformers (see
``.ci/run``), which sets ``PROXYKV_EXPECT_TRANSFORMERS`` to the version it installed.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from proxykv.zoo import MODELS, weights_path
from proxykv.zoo import tasks as T
from proxykv.zoo.tokenizer import build_tokenizer, save_tokenizer

#: rendered zoo prompts: every task's evaluation context, and one whole training sequence
#: (context, then ``<query> key answer <sep>`` per question)
PROMPTS = [T.eval_samples(task, 1, 1024, 0)[0].context for task in T.TASKS] + [
    T.training_sample(T.train_seed(0, 1), "vartrack", 1024, 4).training_ids()[0],
]


@pytest.fixture(scope="module")
def reference():
    return build_tokenizer()


def _auto(folder, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


def check_like_built(tok, ref) -> None:
    """``tok`` encodes and decodes exactly like ``ref`` (= :func:`build_tokenizer`)."""
    assert len(tok) == len(ref) == T.VOCAB_SIZE
    ids = tok(list(T.VOCAB), add_special_tokens=False)["input_ids"]
    wrong = [w for w, i, got in zip(T.VOCAB, range(T.VOCAB_SIZE), ids) if got != [i]]
    assert not wrong, f"{len(wrong)} of {T.VOCAB_SIZE} vocabulary words get other ids: {wrong[:8]}"
    for name in ("pad", "unk", "eos"):
        assert getattr(tok, f"{name}_token") == getattr(ref, f"{name}_token")
        assert getattr(tok, f"{name}_token_id") == getattr(ref, f"{name}_token_id")
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (T.PAD, T.UNK, T.SEP)
    for word in ("<repeat>", "<query>"):
        assert tok.encode(word, add_special_tokens=False) == [T.VOCAB.index(word)]
    assert tok.encode("<repeat>") == ref.encode("<repeat>") == [T.VOCAB.index("<repeat>")]
    for prompt in PROMPTS:
        text = T.render(prompt)
        got = tok(text, add_special_tokens=False)["input_ids"]
        assert len(got) == len(text.split()), (
            f"{len(text.split())} words encode to {len(got)} ids")
        assert got == ref(text, add_special_tokens=False)["input_ids"] == prompt
        assert tok.encode(text) == ref.encode(text)  # the default add_special_tokens=True
        assert tok.decode(got) == text
    assert tok.encode("k1 nonsense", add_special_tokens=False) == [T.KEY_IDS[1], T.UNK]


@pytest.mark.parametrize("name", MODELS)
def test_zoo_folder_loads_with_auto_tokenizer(name, reference):
    check_like_built(_auto(weights_path(name)), reference)


def test_saved_beside_a_qwen2_config_loads_with_auto_tokenizer(tmp_path, reference):
    shutil.copy(weights_path("target") / "config.json", tmp_path / "config.json")
    save_tokenizer(tmp_path)
    check_like_built(_auto(tmp_path), reference)
    # trust_remote_code=True takes tokenizer_config.json's auto_map: the same tokenizer
    check_like_built(_auto(tmp_path, trust_remote_code=True), reference)


def test_expected_transformers_version():
    """CI's run on the lowest supported transformers really imported that version."""
    expected = os.environ.get("PROXYKV_EXPECT_TRANSFORMERS")
    if not expected:
        pytest.skip("PROXYKV_EXPECT_TRANSFORMERS is not set (only CI's lowest-version run sets it)")
    assert transformers.__version__ == expected, transformers.__file__
