"""``proxykv eval`` and ``proxykv demo`` on the committed zoo pair.

Both run as a user runs them: the ``proxykv`` command in a fresh process, without the test
suite's ``TRITON_INTERPRET=1`` (the kernels' CPU path is the torch implementation there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from proxykv.cli import main  # noqa: E402
from proxykv.zoo import WEIGHTS_DIR  # noqa: E402
from proxykv.zoo import tasks as T  # noqa: E402
from proxykv.zoo.evaluate import METHODS, markdown_table, summary  # noqa: E402

REQUIRED_KEYS = {"method", "keep_ratio", "task", "accuracy", "scoring_seconds",
                 "recall_vs_kvzip", "ttft_seconds", "decode_tokens_per_s", "kv_kept_bytes",
                 "peak_bytes"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # one thread: torch's default (every core) slows to a crawl when the machine is busy
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "proxykv.cli", *args], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def quick_records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    run_cli("eval", "--quick", "--json", str(folder / "eval.json"), "--markdown",
            str(folder / "eval.md"), "--plot", str(folder / "eval.png"))
    return folder, json.loads((folder / "eval.json").read_text())


def test_quick_eval_reaches_the_full_cache_bar(quick_records):
    _, records = quick_records
    full = {r["task"]: r["accuracy"] for r in records if r["method"] == "full"}
    assert set(full) == {*T.TASKS, "overall"}
    assert min(full.values()) >= 0.95, full


def test_quick_eval_records_every_method_ratio_and_task(quick_records):
    folder, records = quick_records
    assert all(REQUIRED_KEYS <= set(r) for r in records)
    for method in METHODS:
        rows = [r for r in records if r["method"] == method]
        ratios = {r["keep_ratio"] for r in rows}
        assert ratios == ({1.0} if method == "full" else {0.1, 0.3}), (method, ratios)
        assert {r["task"] for r in rows} == {*T.TASKS, "overall"}
    kvzip = [r for r in records if r["method"] == "kvzip"]
    assert all(r["recall_vs_kvzip"] == 1.0 for r in kvzip)
    assert (folder / "eval.png").stat().st_size > 10_000
    assert "| kvzip | overall |" in (folder / "eval.md").read_text()


def test_compression_costs_accuracy_for_random_but_not_kvzip(quick_records):
    _, records = quick_records

    def overall(method, ratio):
        return next(r["accuracy"] for r in records if r["method"] == method
                    and r["task"] == "overall" and r["keep_ratio"] == ratio)

    assert overall("kvzip", 0.3) > overall("random", 0.3)
    assert overall("kvzip", 0.3) > overall("random", 0.1)


def test_summary_and_table_from_records():
    records = [
        {"method": "kvzip", "keep_ratio": 0.3, "task": "overall", "accuracy": 0.8,
         "scoring_seconds": 2.0, "questions": 10},
        {"method": "proxykv_axial", "keep_ratio": 0.3, "task": "overall", "accuracy": 0.6,
         "scoring_seconds": 0.5, "questions": 10},
        {"method": "snapkv", "keep_ratio": 0.3, "task": "multiquery", "accuracy": 0.25,
         "scoring_seconds": 0.1, "questions": 4},
    ]
    head = summary(records)
    assert head["proxykv_axial_accuracy_over_kvzip"] == pytest.approx(0.75)
    assert head["proxykv_axial_scoring_time_over_kvzip"] == pytest.approx(0.25)
    assert head["snapkv_multiquery_accuracy"] == 0.25
    table = markdown_table(records, "proxykv eval")
    assert "| proxykv_axial | overall | 0.600 |" in table


def test_eval_rejects_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--methods", "nonsense"])
    assert exit_info.value.code == 2 and "unknown nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--target", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_demo_answers_with_full_and_compressed_cache():
    out = run_cli("demo").stdout
    assert "kept fraction per layer" in out and "% saved" in out
    assert "correct: full cache 4/4" in out
    assert "aligner axial (trained)" in out
    assert (WEIGHTS_DIR / "aligner_axial" / "config.json").is_file()
