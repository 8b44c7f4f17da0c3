"""Long-context tasks over real text, for evaluating KV-cache compression on pretrained models.

The corpus: the prose paragraphs of CPython's reference documentation, ``pydoc_data.topics``
(shipped with every CPython; PSF License 2.0, https://docs.python.org/3/license.html), each
paragraph once — about 27k Gemma 3 tokens. Its topics are split once, by name, into a **train**
part (the aligner's prompts; 18.7k tokens) and an **eval** part (the evaluation's contexts; 8.7k
tokens, without any paragraph the train part also holds — topics repeat paragraphs of each
other), so no evaluated paragraph was seen in training.

A sample (:func:`eval_samples`) is a context of exactly ``length`` tokens: eval paragraphs in a
seeded order, with needle sentences inserted at seeded depths, followed by the next
:data:`CONTINUATION_TOKENS` tokens of the same text. Every needle is asked after the context was
compressed, each question on its own (KVzip's query-agnostic setting). Questions are sentence
starts that the needle's value completes — the form a base model answers (an instruction-style
question is continued, not answered, by a 270M base model):

- ``passkey``: one 5-digit pass key;
- ``kv``: :data:`KV_PAIRS` facts, each a sentence start of its own completed by 4 digits
  (``Captain Reyes keeps the spare key in locker 7302.``): facts of one template (``The number
  of the red box is ...``) were answered with another fact's number by the full cache;
- ``twohop``: ``<person>'s locker is the one with the <colour> door.`` and, later, ``The locker
  with the <colour> door has the code <4 digits>.``; asked in two steps (:func:`ask`), the
  second built from the model's own first answer — a 270M base model does not compose the two
  facts within one answer (``"The code of <person>'s locker is"`` is answered with the wrong
  words), but each hop must survive compression;
- ``continuation``: no needle — the teacher-forced log-likelihood and top-1 agreement of the
  text's next tokens over the compressed cache against the full cache.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

CORPUS = "pydoc_data.topics (CPython's reference documentation, PSF License 2.0)"
#: one topic in TRAIN_EVERY (by sorted name) is the train part
TRAIN_EVERY = 2
NEEDLE_TASKS = ("passkey", "kv", "twohop")
TASKS = (*NEEDLE_TASKS, "continuation")
KV_PAIRS = 4
SEPARATOR = "\n\n"  # between paragraphs, needles and before each question
CONTINUATION_TOKENS = 64
#: the key-value facts: each a sentence start no other fact shares (a base model answers a fact
#: by finding its start again; same-template facts such as "the number of the red box is ..."
#: were answered with another box's number), completed by a 4-digit value
_FACTS = (
    "The combination of the old bank safe is",
    "Doctor Morgan's office phone extension is",
    "The badge of the night librarian carries the number",
    "The ferry to the northern island leaves from pier",
    "The invoice for the garden furniture has the reference number",
    "Captain Reyes keeps the spare key in locker",
    "The seismograph station logged the tremor under the identifier",
    "The radio of the old lighthouse keeper is tuned to channel",
    "The museum catalogue lists the bronze statue as item",
    "The parcel for the bakery was shipped with the tracking code",
    "The conference room booking for Friday has the reservation",
    "The greenhouse thermostat is set to program",
)
_PEOPLE = ("Mara", "Jonas", "Priya", "Tomas", "Elena", "Kofi", "Ingrid", "Mateo", "Aiko", "Samir")
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey",
            "brown")


@dataclass(frozen=True)
class Question:
    task: str
    prompt: str     # what follows the compressed context
    answer: str     # the word a correct greedy answer starts with
    #: the second hop: a prompt with a ``{}`` for the first answer's word, and its answer
    then: tuple[str, str] | None = None


@dataclass(frozen=True)
class Sample:
    """``context_ids`` (exactly the requested length), ``continuation_ids`` (the text's next
    tokens) and the needles' ``questions``."""

    context_ids: list[int]
    continuation_ids: list[int]
    questions: tuple[Question, ...]


@cache
def _topics_by_split() -> dict[str, tuple[str, ...]]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    return {"train": tuple(n for i, n in enumerate(names) if i % TRAIN_EVERY == 0),
            "eval": tuple(n for i, n in enumerate(names) if i % TRAIN_EVERY != 0),
            "all": tuple(names)}


@cache
def paragraphs(split: str) -> tuple[str, ...]:
    """The prose paragraphs (each on one line) of the ``"train"`` or ``"eval"`` topics (or
    ``"all"``, in topic order); grammar rules, code blocks and tables are left out."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    from pydoc_data.topics import topics

    # Topics repeat paragraphs (of each other and of themselves): each paragraph once, and the
    # eval part without any paragraph of the train part.
    seen = set(paragraphs("train")) if split == "eval" else set()
    found = []
    for name in _topics_by_split()[split]:
        for block in topics[name].split("\n\n"):
            lines = block.strip().splitlines()
            if not lines or any(line.startswith(" ") for line in lines) or "***" in block \
                    or "::=" in block:
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) > 200 and text.count(".") >= 2 and text not in seen:
                seen.add(text)
                found.append(text)
    return tuple(found)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def text_prompts(tokenizer, count: int, length: int, seed: int = 0,
                 split: str = "train") -> list[list[int]]:
    """``count`` token-id prompts of exactly ``length`` tokens (bos first, when the tokenizer has
    one): ``split`` paragraphs in a seeded order each. Raises ``ValueError`` when the split holds
    fewer than ``length`` tokens."""
    rng = random.Random(seed)
    pool = list(paragraphs(split))
    out = []
    for _ in range(count):
        rng.shuffle(pool)
        ids = _bos(tokenizer)
        for paragraph in pool:
            ids += _tokens(tokenizer, SEPARATOR + paragraph)
            if len(ids) >= length:
                break
        if len(ids) < length:
            raise ValueError(f"the {split} paragraphs hold {len(ids)} tokens, fewer than "
                             f"length={length}")
        out.append(ids[:length])
    return out


def _needles(rng: random.Random) -> tuple[list[str], list[Question]]:
    key = rng.randint(10000, 99999)
    needles = [f"The pass key is {key}. Remember it. {key} is the pass key."]
    questions = [Question("passkey", SEPARATOR + "The pass key is", str(key))]
    for fact in rng.sample(_FACTS, KV_PAIRS):
        number = rng.randint(1000, 9999)
        needles.append(f"{fact} {number}.")
        questions.append(Question("kv", SEPARATOR + fact, str(number)))
    person, colour = rng.choice(_PEOPLE), rng.choice(_COLOURS)
    number = rng.randint(1000, 9999)
    # the two hops last (eval_samples places the first before the second)
    needles += [f"{person}'s locker is the one with the {colour} door.",
                f"The locker with the {colour} door has the code {number}."]
    questions.append(Question("twohop", f"{SEPARATOR}{person}'s locker is the one with the",
                              colour, (f"{SEPARATOR}The locker with the {{}} door has the code",
                                       str(number))))
    return needles, questions


def eval_samples(tokenizer, n: int, length: int, seed: int = 0) -> list[Sample]:
    """``n`` samples of ``length`` context tokens (see the module docstring), reproducible from
    ``seed``; every needle lies inside the context (the second hop after the first).

    Raises ``ValueError`` for a length the eval paragraphs cannot fill or too short to hold the
    needles."""
    if length < 256:
        raise ValueError(f"length must be at least 256 tokens to hold the needles, got {length}")
    rng = random.Random(f"proxykv-realtext-{seed}-{length}")
    pool = list(paragraphs("eval"))
    samples = []
    for _ in range(n):
        rng.shuffle(pool)
        needles, questions = _needles(rng)
        needle_tokens = sum(len(_tokens(tokenizer, SEPARATOR + needle)) for needle in needles)
        texts, total = [], len(_bos(tokenizer))
        ends = [total]  # ends[i]: where the text's first i paragraphs end
        for paragraph in pool:
            texts.append(paragraph)
            total += len(_tokens(tokenizer, SEPARATOR + paragraph))
            ends.append(total)
            if total >= length + CONTINUATION_TOKENS + 16:
                break
        else:
            raise ValueError(f"the eval paragraphs hold {total} tokens, fewer than "
                             f"length={length} + {CONTINUATION_TOKENS + 16}")
        # a needle goes after the first i paragraphs, where they end early enough for every
        # needle to stay inside the context wherever the others go
        slots = [i for i, end in enumerate(ends) if end + needle_tokens + 16 < length]
        if not slots:
            raise ValueError(f"length={length} is too short for the needles")
        order = list(range(len(needles)))
        rng.shuffle(order)
        hops = sorted(order.index(i) for i in (len(needles) - 2, len(needles) - 1))
        order[hops[0]], order[hops[1]] = len(needles) - 2, len(needles) - 1  # first hop first
        needles = [needles[i] for i in order]
        for offset, (slot, needle) in enumerate(zip(sorted(rng.choices(slots, k=len(needles))),
                                                    needles)):
            texts.insert(slot + offset, needle)
        ids = _bos(tokenizer) + _tokens(tokenizer, SEPARATOR.join(texts))
        context = ids[:length]
        samples.append(Sample(context, ids[length:length + CONTINUATION_TOKENS], tuple(questions)))
    return samples


def ask(question: Question, answers: Callable[[str, str], bool]) -> bool:
    """Whether the model answers ``question``, given ``answers(prompt, word)``: whether its greedy
    continuation of ``prompt`` starts with the word ``word`` (:func:`greedy_starts_with` over a
    cache). A two-hop question needs both hops: its second prompt names the first hop's answer,
    which is what the model's own first answer was whenever that one was right."""
    if not answers(question.prompt, question.answer):
        return False
    if question.then is None:
        return True
    prompt, answer = question.then
    return answers(prompt.format(question.answer), answer)


def greedy_starts_with(logits_of: Callable, tokenizer, prompt: str, word: str) -> bool:
    """Whether greedy decoding after ``prompt`` writes `` word`` and then ends the word, decided
    from one teacher-forced forward: ``logits_of(ids [1, n], last) -> [1, last, vocab]``, the
    logits at the last ``last`` positions of the prompt followed by the word's tokens. Greedy decoding writes the word exactly when each of its tokens is
    the argmax after the ones before (the same logits, computed at once), and the word ends
    when the next argmax token does not begin with a letter or digit."""
    import torch

    prompt_ids = _tokens(tokenizer, prompt)
    word_ids = _tokens(tokenizer, " " + word)
    ids = torch.tensor([prompt_ids + word_ids])
    chosen = logits_of(ids, len(word_ids) + 1)[0].argmax(dim=-1).tolist()
    if chosen[:len(word_ids)] != word_ids:
        return False
    after = tokenizer.decode(chosen[len(word_ids):])
    return not after[:1].isalnum()
