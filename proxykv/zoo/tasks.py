"""Synthetic long-context tasks of the model zoo, generated from a seed over a fixed vocabulary.

Vocabulary (256 ids, :data:`VOCAB`): 5 special tokens, 100 keys (``k0`` … ``k99``), 100 values
(``v0`` … ``v99``) and 51 filler words. A *pair* is a key immediately followed by what it is
bound to (``k17 v42`` reads "k17 is v42"). A question is ``<query> key`` and its answer is the
token(s) the model must produce next; in the training sequences each answer is followed by
``<sep>``.

Tasks (each :class:`Sample` holds the context ids, the questions, the expected answers and a
plain-text rendering):

- ``multikey`` — RULER's multi-key needle: ``n_pairs`` pairs scattered through filler, one
  (``n_questions``) of them asked for; the other pairs are distractors.
- ``multiquery`` — several questions after one context. The context is complete without any
  question (KVzip's query-agnostic setting): it is meant to be compressed first, and each
  question is then asked on its own after the (compressed) context.
- ``vartrack`` — variable tracking: ``n_chains`` chains of assignments (``k3 v9`` … ``k5 k3`` …
  ``k8 k5``: k8 = k5 = k3 = v9), appearing in order through the filler, each of ``hops`` >= 2
  assignments. ONE chain is asked for (by its last variable), so eliminating values already
  given cannot score. The answer is the chain resolved step by step, ending with the value
  (``k5 k3 v9``); accuracy is exact match on all of it, so the final value counts only when
  every hop was followed. A value token always ends an answer.
- ``copy`` (training only) — random tokens, ``<repeat>``, the same tokens again: the skill that
  reconstruction (KVzip-style) scoring asks of a model.

Seeds: every sample is a pure function of its task, its keyword arguments and one integer seed.
Training seeds lie in ``[0, EVAL_SEED_BASE)`` (:func:`train_seed`), evaluation seeds in
``[EVAL_SEED_BASE, 2**63)`` (:func:`eval_seed`), so no evaluation sample is ever a training sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<unk>", "<repeat>", "<query>", "<sep>")
N_KEYS = 100
N_VALUES = 100
FILLER_WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "on", "at", "by", "with", "from", "for", "as",
    "it", "was", "sky", "sea", "hill", "tree", "road", "town", "rain", "wind", "stone", "river",
    "field", "light", "cloud", "grass", "bird", "house", "door", "wall", "boat", "lamp", "bread",
    "salt", "iron", "wood", "snow", "fire", "moon", "star", "sand", "leaf", "path", "bell",
    "glass", "rope", "mill",
)
KEY_WORDS = tuple(f"k{i}" for i in range(N_KEYS))
VALUE_WORDS = tuple(f"v{i}" for i in range(N_VALUES))
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + KEY_WORDS + VALUE_WORDS + FILLER_WORDS
VOCAB_SIZE = len(VOCAB)
assert VOCAB_SIZE == 256 and len(set(VOCAB)) == VOCAB_SIZE

PAD, UNK, REPEAT, QUERY, SEP = range(len(SPECIAL_TOKENS))
KEY_IDS = np.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + N_KEYS)
VALUE_IDS = np.arange(KEY_IDS[-1] + 1, KEY_IDS[-1] + 1 + N_VALUES)
FILLER_IDS = np.arange(VALUE_IDS[-1] + 1, VOCAB_SIZE)
#: tokens the copy task draws from (everything but the special tokens)
CONTENT_IDS = np.arange(len(SPECIAL_TOKENS), VOCAB_SIZE)

TASKS = ("multikey", "multiquery", "vartrack")
EVAL_SEED_BASE = 2**40
_SEED_LIMIT = 2**63


def train_seed(run_seed: int, step: int, index: int = 0) -> int:
    """The seed of training sample ``index`` of ``step`` in run ``run_seed``, in
    ``[0, EVAL_SEED_BASE)``."""
    ss = np.random.SeedSequence([0, int(run_seed), int(step), int(index)])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) % EVAL_SEED_BASE


def eval_seed(index: int, base_seed: int = 0) -> int:
    """The seed of evaluation sample ``index`` (of evaluation run ``base_seed``), at least
    ``EVAL_SEED_BASE``."""
    ss = np.random.SeedSequence([1, int(base_seed), int(index)])
    return EVAL_SEED_BASE + int(ss.generate_state(1, dtype=np.uint64)[0]) % (
        _SEED_LIMIT - EVAL_SEED_BASE)


def is_eval_seed(seed: int) -> bool:
    return EVAL_SEED_BASE <= seed < _SEED_LIMIT


def is_key(token: int) -> bool:
    return KEY_IDS[0] <= token <= KEY_IDS[-1]


def is_value(token: int) -> bool:
    return VALUE_IDS[0] <= token <= VALUE_IDS[-1]


def render(ids) -> str:
    """Plain text of token ids: the words joined by single spaces (the tokenizer's decoding)."""
    return " ".join(VOCAB[int(i)] for i in ids)


def encode_words(text: str) -> list[int]:
    """Inverse of :func:`render` (without the tokenizer); unknown words become ``<unk>``."""
    index = {w: i for i, w in enumerate(VOCAB)}
    return [index.get(w, UNK) for w in text.split()]


@dataclass
class Sample:
    """One prompt: a context, questions asked after it, and the expected answers.

    ``questions[i]`` (``[<query>, key]``) follows the context directly; ``answers[i]`` is the
    greedy continuation expected after ``context + questions[i]`` (without the ``<sep>``).
    ``loss_positions`` is only used by training sequences.
    """

    task: str
    seed: int
    context: list[int]
    questions: list[list[int]]
    answers: list[list[int]]
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        lines = [render(self.context)]
        for q, a in zip(self.questions, self.answers):
            lines.append(f"{render(q)} -> {render(a)}")
        return "\n".join(lines)

    def prompt_ids(self, i: int = 0) -> list[int]:
        """Context followed by question ``i``: what the model is given."""
        return self.context + self.questions[i]

    def training_ids(self) -> tuple[list[int], list[int]]:
        """All questions in one sequence (``<query> key answer <sep>`` each); ids and loss mask."""
        ids = list(self.context)
        mask = [0] * len(ids)
        for q, a in zip(self.questions, self.answers):
            ids += q
            mask += [0] * len(q)
            ids += a
            mask += [1] * len(a)
            ids.append(SEP)
            mask.append(0)
        return ids, mask


def _place(rng: np.random.Generator, length: int, spans: list[list[int]]) -> list[int]:
    """Filler of ``length`` tokens with the given spans inserted at random, in the given order."""
    used = sum(len(s) for s in spans)
    n_filler = length - used
    if n_filler < 0:
        raise ValueError(f"length={length} is too short for {used} tokens of pairs")
    filler = rng.choice(FILLER_IDS, size=n_filler).tolist()
    # choose insertion points in the filler (with repetition: spans may be adjacent)
    cuts = np.sort(rng.integers(0, n_filler + 1, size=len(spans)))
    out: list[int] = []
    prev = 0
    for cut, span in zip(cuts, spans):
        out += filler[prev:cut]
        out += span
        prev = cut
    out += filler[prev:]
    return out


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def multikey(seed: int, length: int = 1024, n_pairs: int = 16, n_questions: int = 1,
             task: str = "multikey") -> Sample:
    """``n_pairs`` key-value pairs in ``length`` tokens of filler; ``n_questions`` keys asked
    for."""
    seed = _check_seed(seed)
    if not 1 <= n_questions <= n_pairs <= N_KEYS:
        raise ValueError(f"need 1 <= n_questions <= n_pairs <= {N_KEYS}, got "
                         f"n_questions={n_questions}, n_pairs={n_pairs}")
    rng = np.random.default_rng(seed)
    keys = rng.choice(KEY_IDS, size=n_pairs, replace=False).tolist()
    values = rng.choice(VALUE_IDS, size=n_pairs).tolist()
    context = _place(rng, length, [[k, v] for k, v in zip(keys, values)])
    asked = rng.permutation(n_pairs)[:n_questions].tolist()
    return Sample(task, seed, context, [[QUERY, keys[i]] for i in asked],
                  [[values[i]] for i in asked], {"n_pairs": n_pairs})


def multiquery(seed: int, length: int = 1024, n_pairs: int = 16, n_questions: int = 4) -> Sample:
    """One context of ``n_pairs`` pairs, ``n_questions`` questions (each asked on its own)."""
    return multikey(seed, length, n_pairs, n_questions, task="multiquery")


def vartrack(seed: int, length: int = 1024, n_chains: int = 4, hops: int | tuple[int, int] = (2, 3),
             n_questions: int = 1) -> Sample:
    """``n_chains`` assignment chains of ``hops`` assignments each; ``n_questions`` chains asked.

    ``hops`` is an int or an inclusive range ``(lo, hi)`` drawn per chain.
    """
    seed = _check_seed(seed)
    lo, hi = (hops, hops) if isinstance(hops, int) else hops
    if lo < 1 or hi < lo:
        raise ValueError(f"hops must be >= 1 (an int or a range lo <= hi), got {hops}")
    if not 1 <= n_questions <= n_chains:
        raise ValueError(f"need 1 <= n_questions <= n_chains, got {n_questions}, {n_chains}")
    rng = np.random.default_rng(seed)
    n_hops = rng.integers(lo, hi + 1, size=n_chains).tolist()
    if sum(n_hops) > N_KEYS:
        raise ValueError(f"{sum(n_hops)} variables needed, only {N_KEYS} keys")
    variables = rng.choice(KEY_IDS, size=sum(n_hops), replace=False).tolist()
    values = rng.choice(VALUE_IDS, size=n_chains).tolist()
    chains = []  # per chain: list of assignments [lhs, rhs] in order of definition
    start = 0
    for c, h in enumerate(n_hops):
        names = variables[start:start + h]
        start += h
        rhs = [values[c]] + names[:-1]
        chains.append([[names[j], rhs[j]] for j in range(h)])
    # interleave the chains at random while keeping each chain's order
    owners = [c for c, h in enumerate(n_hops) for _ in range(h)]
    owners = rng.permutation(owners).tolist()
    taken = [0] * n_chains
    spans = []
    for c in owners:
        spans.append(chains[c][taken[c]])
        taken[c] += 1
    context = _place(rng, length, spans)
    asked = rng.permutation(n_chains)[:n_questions].tolist()
    questions, answers = [], []
    for c in asked:
        chain = chains[c]
        questions.append([QUERY, chain[-1][0]])
        answers.append([a[1] for a in reversed(chain)])
    return Sample("vartrack", seed, context, questions, answers, {"hops": n_hops})


def copy(seed: int, length: int = 64) -> Sample:
    """``(length - 1) // 2`` random content tokens, ``<repeat>``, the same tokens again.

    The context is the random tokens, the single question is ``[<repeat>]`` and its answer the
    tokens again.
    """
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    n = (length - 1) // 2
    tokens = rng.choice(CONTENT_IDS, size=n).tolist()
    return Sample("copy", seed, tokens, [[REPEAT]], [list(tokens)])


def segment_copy(seed: int, length: int = 1024) -> Sample:
    """Chunked reconstruction: random content, ``<repeat>``, then a segment of the content of
    ``length // 4`` tokens starting at a random offset (as a chunked KVzip-style reconstruction
    feeds it). The question is ``[<repeat>, first segment token]`` and the answer the rest of
    the segment, so the model must find where the segment starts by matching tokens.
    """
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    m = max(2, length // 4)
    n = length - m - 1
    tokens = rng.choice(CONTENT_IDS, size=n).tolist()
    start = int(rng.integers(0, n - m + 1))
    seg = tokens[start:start + m]
    return Sample("segment_copy", seed, tokens, [[REPEAT, seg[0]]], [seg[1:]], {"start": start})


GENERATORS = {"multikey": multikey, "multiquery": multiquery, "vartrack": vartrack, "copy": copy,
              "segment_copy": segment_copy}

#: the evaluation settings of each task at context length ``length`` (keyword arguments)
EVAL_SETTINGS = {
    "multikey": {"n_pairs": 16, "n_questions": 1},
    "multiquery": {"n_pairs": 16, "n_questions": 4},
    "vartrack": {"n_chains": 4, "hops": (2, 3), "n_questions": 1},
}


def make_sample(task: str, seed: int, length: int = 1024, **kwargs) -> Sample:
    """A sample of ``task`` (one of :data:`TASKS` or ``"copy"``) from ``seed``."""
    if task not in GENERATORS:
        raise ValueError(f"task must be one of {sorted(GENERATORS)}, got {task!r}")
    return GENERATORS[task](seed, length=length, **kwargs)


def eval_samples(task: str, n: int, length: int = 1024, base_seed: int = 0,
                 **overrides) -> list[Sample]:
    """``n`` evaluation samples of ``task`` (evaluation seeds only) with :data:`EVAL_SETTINGS`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    kwargs = {**EVAL_SETTINGS[task], **overrides}
    return [make_sample(task, eval_seed(i, base_seed), length, **kwargs) for i in range(n)]


def training_sample(seed: int, kind: str, length: int, n_pairs: int) -> Sample:
    """A training sample (every pair / chain is asked, as in the recipe of ZOO-NOTES)."""
    if is_eval_seed(seed):
        raise ValueError(f"seed {seed} is an evaluation seed; training seeds are < "
                         f"{EVAL_SEED_BASE}")
    if kind == "copy":
        return copy(seed, length)
    if kind == "segment_copy":
        return segment_copy(seed, length)
    if kind == "retrieval":
        n_q = n_pairs * 4
        return multikey(seed, length - n_q, n_pairs, n_pairs, task="retrieval")
    if kind == "vartrack":
        n_chains = max(1, n_pairs // 3)
        n_q = n_chains * (2 + 4 + 1)  # at most: <query> key, 4 hops, <sep>
        return vartrack(seed, length - n_q, n_chains, (1, 4), n_questions=n_chains)
    raise ValueError(f"kind must be copy, segment_copy, retrieval or vartrack, got {kind!r}")
