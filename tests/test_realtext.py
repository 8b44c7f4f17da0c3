"""proxykv.realtext: the real-text corpus, its train/eval split, the samples' promises, and the
answer check (one teacher-forced forward) against greedy generation over compressed caches.

The tokenizer and model are the real Gemma 3 270M (the ``gemma`` extra; see
tests/test_real_model.py)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from proxykv import realtext as R
from proxykv.hf import ProxyKV


@pytest.fixture(scope="module")
def tokenizer(gemma):
    return gemma[1]


def test_the_split_shares_no_topic_and_no_paragraph():
    topics = R._topics_by_split()
    assert topics["train"] and topics["eval"]
    assert not set(topics["train"]) & set(topics["eval"])
    assert sorted(topics["train"] + topics["eval"]) == list(topics["all"])
    train, held = set(R.paragraphs("train")), set(R.paragraphs("eval"))
    assert len(train) > 150 and len(held) > 80 and not train & held
    assert set(R.paragraphs("all")) == train | held
    with pytest.raises(ValueError, match="split must be"):
        R.paragraphs("test")


@pytest.mark.parametrize("length", [256, 1024, 3000])
def test_a_sample_holds_every_needle_inside_a_context_of_exactly_its_length(tokenizer, length):
    for sample in R.eval_samples(tokenizer, 3, length, seed=5):
        assert len(sample.context_ids) == length
        assert len(sample.continuation_ids) == R.CONTINUATION_TOKENS
        assert sample.context_ids[0] == tokenizer.bos_token_id
        text = tokenizer.decode(sample.context_ids)
        tasks = [q.task for q in sample.questions]
        assert tasks == ["passkey"] + ["kv"] * R.KV_PAIRS + ["twohop"]
        for question in sample.questions:
            fact = question.prompt.strip()
            assert f"{fact} {question.answer}" in text, question
        hop = sample.questions[-1]
        first = text.index(f"{hop.prompt.strip()} {hop.answer} door.")
        second_prompt, number = hop.then
        second = text.index(f"{second_prompt.format(hop.answer).strip()} {number}.")
        assert first < second
        # the continuation is the text that follows, not a needle
        follow = tokenizer.decode(sample.continuation_ids)
        assert not any(q.answer in follow for q in sample.questions[:-1])


def test_samples_are_reproducible_from_their_seed_and_differ_across_seeds(tokenizer):
    first = R.eval_samples(tokenizer, 2, 512, seed=1)
    assert first == R.eval_samples(tokenizer, 2, 512, seed=1)
    other = R.eval_samples(tokenizer, 2, 512, seed=2)
    assert first[0].context_ids != other[0].context_ids
    assert first[0].questions != other[0].questions
    # another length draws other contexts from the same seed
    assert R.eval_samples(tokenizer, 1, 600, seed=1)[0].context_ids[:512] != \
        first[0].context_ids


def test_lengths_the_samples_cannot_hold_are_refused(tokenizer):
    with pytest.raises(ValueError, match="length must be at least 256"):
        R.eval_samples(tokenizer, 1, 255)
    with pytest.raises(ValueError, match="eval paragraphs hold"):
        R.eval_samples(tokenizer, 1, 200_000)


def test_training_prompts_come_from_the_train_part_only(tokenizer):
    prompts = R.text_prompts(tokenizer, 3, 300, seed=0)
    assert [len(p) for p in prompts] == [300] * 3 and len({tuple(p) for p in prompts}) == 3
    held = R.paragraphs("eval")
    for prompt in prompts:
        text = tokenizer.decode(prompt[1:])
        first = text.split(R.SEPARATOR)[1]
        assert first in R.paragraphs("train") and first not in held
    with pytest.raises(ValueError, match="train paragraphs hold"):
        R.text_prompts(tokenizer, 1, 200_000)


def test_ask_needs_both_hops_and_builds_the_second_from_the_first_answer():
    single = R.Question("kv", "\n\nThe code is", "1234")
    hop = R.Question("twohop", "\n\nA's locker is the one with the", "red",
                     ("\n\nThe locker with the {} door has the code", "5678"))
    asked = []

    def answers(prompt, word):
        asked.append((prompt, word))
        return word in ("1234", "red")

    assert R.ask(single, answers)
    assert not R.ask(hop, answers)  # the second hop is wrong
    assert asked[-1] == ("\n\nThe locker with the red door has the code", "5678")
    asked.clear()
    assert not R.ask(hop, lambda prompt, word: asked.append(prompt) or False)
    assert len(asked) == 1  # a wrong first hop ends the question


def _one_hot_logits(tokens: list[int], vocab: int) -> torch.Tensor:
    logits = torch.zeros(1, len(tokens), vocab)
    logits[0, torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return logits


def test_greedy_starts_with_needs_every_token_and_the_end_of_the_word(tokenizer):
    prompt, word = "\n\nThe pass key is", "12345"
    word_ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    period = tokenizer(".", add_special_tokens=False)["input_ids"]
    six = tokenizer("6", add_special_tokens=False)["input_ids"]
    vocab = len(tokenizer)

    def fake(predicted):
        def logits_of(ids, last):
            assert last == len(word_ids) + 1 and ids.shape[1] > last
            return _one_hot_logits(predicted, vocab)
        return logits_of

    assert R.greedy_starts_with(fake(word_ids + period), tokenizer, prompt, word)
    assert not R.greedy_starts_with(fake(word_ids + six), tokenizer, prompt, word)  # 123456
    wrong = list(word_ids)
    wrong[-1] = six[0]
    assert not R.greedy_starts_with(fake(wrong + period), tokenizer, prompt, word)


@pytest.mark.slow
def test_the_teacher_forced_check_agrees_with_greedy_generation(gemma):
    """Over full and compressed caches, right and wrong answers alike."""
    model, tokenizer = gemma
    outcomes = []
    for keep in (1.0, 0.3):
        with ProxyKV(model, scorer="window", keep_ratio=keep, impl="torch") as pipe:
            for sample in R.eval_samples(tokenizer, 2, 512, seed=3):
                cache = pipe.compress(torch.tensor([sample.context_ids]))

                def generated(prompt, word, cache=cache, pipe=pipe):
                    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
                    new = len(tokenizer(" " + word, add_special_tokens=False).input_ids) + 1
                    out = pipe.generate(ids, new, cache=cache, do_sample=False, eos_token_id=[])
                    match = re.match(r"\s*([A-Za-z0-9]+)", tokenizer.decode(out[0, ids.shape[1]:]))
                    return bool(match) and match.group(1) == word

                def forced(prompt, word, cache=cache, pipe=pipe):
                    return R.greedy_starts_with(
                        lambda ids, last: pipe.logits(ids, cache=cache, last=last), tokenizer,
                        prompt, word)

                for question in sample.questions:
                    outcome = R.ask(question, forced)
                    assert outcome == R.ask(question, generated), (keep, question)
                    outcomes.append(outcome)
    assert True in outcomes and False in outcomes  # both kinds of answer were compared
