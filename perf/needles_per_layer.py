"""Where each layer's scores put the needles of the real-text tasks: for every compressed layer of
a real model, the share of the needles' value tokens (their digits or words, not the space before
them) that the layer's own KVzip reconstruction scores rank in the top ``keep`` of the context,
and how many values keep every token — what a per-layer top-k at that ratio keeps of them.

    python perf/needles_per_layer.py [--target gemma3-270m] [--length 1024] [--n 6] [--keep 0.3]

Prints one line per layer. On Gemma 3 270M this is why KVzip's own per-layer selection loses the
answers there while the early-layers proxy's (its layer 5 scores mapped onto every layer) keeps
them: docs/real-eval.md.
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="gemma3-270m",
                        help="registry checkpoint name or model folder (default: %(default)s)")
    parser.add_argument("--length", type=int, default=1024, help="context tokens")
    parser.add_argument("--n", type=int, default=6, help="contexts")
    parser.add_argument("--keep", type=float, default=0.3, help="keep ratio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxykv import realtext
    from proxykv.hf import get_scorer
    from proxykv.hf.architectures import layer_layout
    from proxykv.hf.checkpoints import get

    folder = args.target if Path(args.target).is_dir() else get(args.target)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    scorer = get_scorer("reconstruction", tokenizer=tokenizer, impl="torch")
    layers = layer_layout(model).compressible
    budget = max(1, round(args.keep * args.length))
    in_top = [[] for _ in layers]
    whole = [[] for _ in layers]
    for sample in realtext.eval_samples(tokenizer, args.n, args.length, args.seed):
        ids = sample.context_ids
        scores, _ = scorer.score(model, torch.tensor([ids]))
        top = scores[0].amax(dim=1).topk(budget, dim=-1).indices  # [layers, budget], max over heads
        for question in sample.questions:
            value = question.then[1] if question.then else question.answer
            value_ids = tokenizer(" " + value, add_special_tokens=False)["input_ids"]
            start = next(i for i in range(len(ids) - len(value_ids) + 1)
                         if ids[i:i + len(value_ids)] == value_ids)
            tokens = [p for p in range(start, start + len(value_ids))
                      if tokenizer.decode([ids[p]]).strip()]
            for index in range(len(layers)):
                kept = set(top[index].tolist())
                in_top[index].append(sum(p in kept for p in tokens) / len(tokens))
                whole[index].append(all(p in kept for p in tokens))
    print(f"{args.target}, {args.n} contexts of {args.length} tokens, top {args.keep:g} per layer "
          f"by the layer's own KVzip scores:")
    for index, layer in enumerate(layers):
        print(f"  layer {layer}: value tokens kept {sum(in_top[index]) / len(in_top[index]):.2f}; "
              f"values kept whole {sum(whole[index])}/{len(whole[index])}")


if __name__ == "__main__":
    main()
