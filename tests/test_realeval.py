"""proxykv.realeval: the real-text evaluation on the real Gemma 3 270M — its records, the work it
shares between methods (which must not change what any method selects), and its reports."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from proxykv import realtext as R
from proxykv.cli import _COMMITTED_ALIGNERS
from proxykv.hf import early_layers_proxy
from proxykv.realeval import (
    RealEvalConfig,
    _Context,
    headline,
    markdown_report,
    plot_report,
    run_realtext_eval,
    wilson_interval,
)
from proxykv.zoo.evaluate import METHODS, aligner_folders, build_pipeline, kv_bytes

pytestmark = pytest.mark.slow
LENGTH = 256


@pytest.fixture(scope="module")
def setup(gemma):
    from pathlib import Path

    import proxykv

    model, tokenizer = gemma
    proxy = early_layers_proxy(model, 6)
    committed = Path(proxykv.__file__).parent / "aligners"
    aligners = aligner_folders([committed / name
                                for name in _COMMITTED_ALIGNERS[("gemma3-270m", 6)]])
    assert set(aligners) == {"axial", "linear"}
    return model, proxy, tokenizer, aligners


def test_shared_work_scores_as_each_method_alone(setup):
    """The shared prefill and proxy scores give every method the scores its own pipeline
    computes (so the same selection at every keep ratio)."""
    model, proxy, tokenizer, aligners = setup
    ids = torch.tensor([R.eval_samples(tokenizer, 1, LENGTH, seed=4)[0].context_ids])
    pipes = {name: build_pipeline(name, model, proxy, aligners, tokenizer, 0.3, "torch")
             for name in METHODS}
    try:
        context = _Context(pipes, proxy, ids)
        for name, pipe in pipes.items():
            shared = context.scored_for(name)
            alone = pipe.score(ids)
            torch.testing.assert_close(shared.scores, alone.scores, rtol=1e-5, atol=1e-6)
            for ratio in (0.3, 0.5) if not METHODS[name].keep_everything else (1.0,):
                got = pipe.compact(shared, keep_ratio=ratio).selection.to_mask()
                assert torch.equal(got, pipe.compact(alone, keep_ratio=ratio).selection.to_mask())
            if METHODS[name].aligner:
                assert shared.cache is context.base().cache
                assert shared.seconds["total"] == pytest.approx(
                    context.base().seconds["total"] + shared.seconds["proxy_scoring"] +
                    shared.seconds["align"])
            alone.release()
        context.release()
    finally:
        for pipe in pipes.values():
            pipe.close()


def test_a_run_records_every_task_method_and_ratio(setup, tmp_path):
    model, proxy, tokenizer, aligners = setup
    config = RealEvalConfig(lengths=(LENGTH,), n=1, keep_ratios=(0.3, 0.5), impl="torch")
    records = run_realtext_eval(model, proxy, tokenizer, aligners, config, progress=False)
    tasks = (*R.TASKS, "overall")
    assert len(records) == (1 + 2 * (len(METHODS) - 1)) * len(tasks)
    count = {"passkey": 1, "kv": R.KV_PAIRS, "twohop": 1,
             "continuation": R.CONTINUATION_TOKENS - 1, "overall": R.KV_PAIRS + 2}
    for record in records:
        assert record["questions"] == count[record["task"]], record
        assert 0.0 <= record["accuracy"] <= 1.0
        assert record["length"] == LENGTH and record["n"] == 1
        method = METHODS[record["method"]]
        assert record["scoring_seconds"] > 0 and record["prefill_seconds"] > 0
        if method.scorer == "random":  # the shared prefill is all their scoring
            assert record["scoring_seconds"] == record["prefill_seconds"]
        if method.aligner:  # the shared prefill, then the proxy's scoring and alignment
            assert record["scoring_seconds"] == pytest.approx(
                record["prefill_seconds"] + record["proxy_seconds"])
        recall = record["recall_vs_kvzip"]
        assert (recall is None) == (record["method"] in ("kvzip", "full")), record
        per_layer = record["recall_vs_kvzip_per_layer"]
        assert per_layer is None if recall is None else \
            (len(per_layer) == 3 and min(per_layer) <= recall <= max(per_layer))
        assert (record["proxy_seconds"] is None) == (method.aligner is None)
    full = {r["task"]: r for r in records if r["method"] == "full"}
    # the continuation's reference is the model's own forward over the context and the text
    sample = R.eval_samples(tokenizer, 1, LENGTH, seed=0)[0]
    ids = torch.tensor([sample.context_ids + sample.continuation_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, LENGTH:-1].float()
    text = ids[0, LENGTH + 1:]
    nll = -logits.log_softmax(-1).gather(1, text[:, None]).mean()
    assert full["continuation"]["nll_full"] == pytest.approx(float(nll), rel=1e-4)
    assert full["continuation"]["nll"] == full["continuation"]["nll_full"]
    assert full["continuation"]["accuracy"] == 1.0
    for record in records:
        if record["task"] == "continuation":
            assert record["nll_full"] == full["continuation"]["nll_full"]
    kvzip = [r for r in records if r["method"] == "kvzip"]
    assert max(r["peak_bytes"] for r in kvzip) > full["overall"]["peak_bytes"]

    report = markdown_report(records, "proxykv eval --target gemma3-270m --length 256")
    assert f"## {LENGTH} tokens (1 contexts)" in report and "Headline at keep 0.3" in report
    assert "| proxykv_axial | continuation |" in report
    summary = headline(records)[LENGTH]
    assert summary["proxykv_axial_scoring_over_prefill"] > 1.0
    assert 0.0 < summary["proxykv_axial_proxy_over_prefill"]
    plot_report(records, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_kv_bytes_count_sliding_layers_at_their_window(gemma):
    model, _ = gemma
    per_row = 2 * 1 * 256 * 4  # K and V, one KV head of 256 float32
    assert kv_bytes(model, 100) == per_row * 18 * 100
    assert kv_bytes(model, 4096) == per_row * (3 * 4096 + 15 * 512)


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == 1.0
    low, high = wilson_interval(5, 10)
    assert math.isclose(low + high, 1.0) and low == pytest.approx(0.2366, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
