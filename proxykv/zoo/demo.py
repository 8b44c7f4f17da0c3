"""``proxykv demo``: ProxyKV end to end on the zoo's model pair, in well under a minute on a CPU.

One multi-query prompt (a context of key-value pairs in filler; four questions asked after it)
is compressed once at keep 0.3 — the proxy scores it concurrently with the target's prefill, the
trained aligner maps the scores onto the target's layers and KV heads, the policy selects, the
gather kernels compact — and every question is answered with the full cache and with the
compressed one.
"""

from __future__ import annotations

import textwrap
import time

from proxykv.zoo import tasks as T

DEMO_SEED_INDEX = 0


def run_demo(keep_ratio: float = 0.3, device="cpu", length: int = 1024, out=print) -> dict:
    """Run the demo, printing as it goes; returns the figures (for tests)."""
    from proxykv.hf import ProxyKV, get_scorer
    from proxykv.zoo.evaluate import GREEDY, load_pair

    start = time.perf_counter()
    target, proxy, tokenizer, aligners = load_pair(device=device)
    aligner = aligners.get("axial", "depth_interp")
    aligner_label = "axial (trained)" if "axial" in aligners else "depth_interp (no trained one)"
    sample = T.eval_samples("multiquery", 1, length, base_seed=DEMO_SEED_INDEX)[0]
    context_text = T.render(sample.context)
    context = tokenizer(context_text, add_special_tokens=False,
                        return_tensors="pt")["input_ids"].to(device)
    out(f"proxykv demo: zoo target ({target.config.num_hidden_layers} layers, "
        f"{target.config.num_key_value_heads} KV heads) with its proxy "
        f"({proxy.config.num_hidden_layers} layers, {proxy.config.num_key_value_heads} KV head), "
        f"aligner {aligner_label}, "
        f"keep {keep_ratio}")
    out(f"\nContext ({context.shape[1]} tokens, abridged):")
    out(textwrap.shorten(context_text, width=400, placeholder=" ..."))

    repeat = [tokenizer.convert_tokens_to_ids("<repeat>")]
    scorer = get_scorer("reconstruction", repeat_prompt=repeat)
    results = {"questions": [], "correct_full": 0, "correct_compressed": 0}
    with ProxyKV(target, proxy, aligner=aligner, policy="topk", scorer=scorer,
                 keep_ratio=keep_ratio) as pipe, \
            ProxyKV(target, scorer=get_scorer("random"), keep_ratio=1.0) as full_pipe:
        cache = pipe.compress(context)
        full = full_pipe.compress(context)
        out(f"\n{'question':<16} {'expected':<10} {'full cache':<12} {'compressed':<12}")
        for question, answer in zip(sample.questions, sample.answers):
            q_text, expected = T.render(question), T.render(answer)
            q_ids = tokenizer(q_text, add_special_tokens=False,
                              return_tensors="pt")["input_ids"].to(device)
            n = len(answer)
            got_full = tokenizer.decode(full_pipe.generate(q_ids, n, cache=full, **GREEDY)[0, -n:])
            got_comp = tokenizer.decode(pipe.generate(q_ids, n, cache=cache, **GREEDY)[0, -n:])
            results["correct_full"] += got_full == expected
            results["correct_compressed"] += got_comp == expected
            results["questions"].append((q_text, expected, got_full, got_comp))
            out(f"{q_text:<16} {expected:<10} {got_full:<12} {got_comp:<12}")
    stats = cache.stats
    n_questions = len(sample.questions)
    out(f"\ncorrect: full cache {results['correct_full']}/{n_questions}, compressed "
        f"{results['correct_compressed']}/{n_questions}")
    out("\nkept fraction per layer (rows) and KV head (columns):")
    for layer, row in enumerate(stats.kept_fraction[0].tolist()):
        out(f"  layer {layer}: " + "  ".join(f"{v:.2f}" for v in row))
    saved = stats.kv_bytes_before - stats.kv_bytes_after
    out(f"\nKV cache: {stats.kv_bytes_before / 1024:.1f} KiB -> {stats.kv_bytes_after / 1024:.1f} "
        f"KiB ({saved / 1024:.1f} KiB, {100 * saved / stats.kv_bytes_before:.0f}% saved)")
    out("stage timings: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in stats.seconds.items()))
    out(f"(the proxy's prefill + scoring ran {'concurrently with' if stats.concurrent else 'after'}"
        f" the target's prefill; demo total {time.perf_counter() - start:.1f} s)")
    results["stats"] = stats
    return results


__all__ = ["run_demo"]
