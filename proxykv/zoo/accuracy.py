"""Full-cache greedy accuracy of a zoo model on the zoo's tasks (no compression, no pipeline).

A question counts as correct when greedy decoding after ``context + question`` reproduces the
whole expected answer. That equals "the argmax at every answer position of the teacher-forced
sequence ``context + question + answer`` is the expected token" (the first wrong argmax is where
greedy decoding would leave the answer), so one forward pass per question suffices; questions
are batched, right-padded (causal attention never looks at the padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proxykv.zoo.tasks import PAD, TASKS, Sample, eval_samples


@torch.no_grad()
def question_correct(model, samples: Sequence[Sample], batch_size: int = 8,
                     progress: bool = False) -> list[bool]:
    """One bool per (sample, question), in order: is the greedy answer exactly right."""
    items = []
    for s in samples:
        for q, a in zip(s.questions, s.answers):
            items.append((s.context + q, a))
    device = next(model.parameters()).device
    out: list[bool] = []
    batches = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="accuracy", leave=False)
    for start in batches:
        chunk = items[start:start + batch_size]
        seqs = [p + a for p, a in chunk]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x)
        logits = model(input_ids=ids.to(device)).logits
        pred = logits.argmax(-1).cpu()
        for i, (p, a) in enumerate(chunk):
            got = pred[i, len(p) - 1:len(p) - 1 + len(a)].tolist()
            out.append(got == list(a))
    return out


def accuracy(model, samples: Sequence[Sample], batch_size: int = 8,
             progress: bool = False) -> float:
    """Fraction of questions answered exactly right."""
    ok = question_correct(model, samples, batch_size, progress)
    return sum(ok) / max(1, len(ok))


def evaluate(model, length: int = 1024, n: int = 32, base_seed: int = 0,
             tasks: Sequence[str] = TASKS, batch_size: int = 8,
             progress: bool = False) -> dict[str, float]:
    """Accuracy per task on ``n`` evaluation samples of each task at context ``length``."""
    was_training = model.training
    model.eval()
    try:
        return {t: accuracy(model, eval_samples(t, n, length, base_seed), batch_size, progress)
                for t in tasks}
    finally:
        model.train(was_training)


@torch.no_grad()
def copy_accuracy(model, length: int = 1024, n: int = 8, base_seed: int = 0,
                  batch_size: int = 4, task: str = "copy") -> float:
    """Teacher-forced per-token accuracy of repeating random content after ``<repeat>`` (the
    skill reconstruction scoring relies on): the whole content of about ``length / 2`` tokens
    (``task="copy"``) or a segment of ``length / 4`` tokens at a random offset of about
    ``3 * length / 4`` tokens of content (``task="segment_copy"``)."""
    from proxykv.zoo.tasks import GENERATORS, eval_seed

    make = {"copy": GENERATORS["copy"], "segment_copy": GENERATORS["segment_copy"]}[task]

    was_training = model.training
    model.eval()
    try:
        hits = total = 0
        samples = [make(eval_seed(i, base_seed), length) for i in range(n)]
        for start in range(0, n, batch_size):
            chunk = samples[start:start + batch_size]
            ids = torch.tensor([s.context + s.questions[0] + s.answers[0] for s in chunk])
            pred = model(input_ids=ids).logits.argmax(-1)
            m = len(chunk[0].context) + len(chunk[0].questions[0])
            got = pred[:, m - 1:-1]
            want = ids[:, m:]
            hits += int((got == want).sum())
            total += want.numel()
        return hits / max(1, total)
    finally:
        model.train(was_training)


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m proxykv.zoo.accuracy",
                                description="Full-cache accuracy of a zoo checkpoint per task.")
    p.add_argument("path", help="a folder that AutoModelForCausalLM.from_pretrained loads")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--n", type=int, default=64, help="evaluation samples per task")
    p.add_argument("--seed", type=int, default=0, help="evaluation run (evaluation seeds only)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.path)
    acc = evaluate(model, args.length, args.n, args.seed, progress=True)
    acc["copy_token_accuracy"] = copy_accuracy(model, args.length, 8, args.seed)
    acc["segment_copy_token_accuracy"] = copy_accuracy(model, args.length, 8, args.seed,
                                                       task="segment_copy")
    print(json.dumps(acc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
