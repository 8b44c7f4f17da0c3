"""The benchmark scripts keep working: every perf/bench_*.py runs its smallest CPU case, passes its
correctness check and records a JSON line (timings themselves are not asserted: machines are
shared and noisy)."""

import json
import os
import subprocess
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parent.parent / "perf"


def test_run_all_quick_records_every_benchmark(tmp_path):
    results = tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, str(PERF / "run_all.py"), "--quick", "--device", "cpu",
                          "--results", str(results)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "REFUSED" not in run.stdout
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    recorded_ops = {row["op"].split("/")[0].split()[0] for row in rows}
    for script in PERF.glob("bench_*.py"):
        assert f"## {script.stem}" in run.stdout
    assert {"attention_scores", "pool_scores", "gather_kv", "ragged_attention",
            "ragged_decode_attention"} <= recorded_ops
    for row in rows:
        assert row["median_ms"] > 0 and row["git_commit"] and row["device"].startswith("cpu")


def test_recorder_refuses_to_report_a_wrong_result(tmp_path, capsys):
    sys.path.insert(0, str(PERF))
    try:
        from runner import Recorder
    finally:
        sys.path.remove(str(PERF))
    import torch

    recorder = Recorder(torch.device("cpu"), tmp_path / "results.jsonl")

    def wrong():
        raise AssertionError("output: 3 of 4 elements differ")

    row = recorder.measure("demo", {"T": 4}, torch.float32, "torch", lambda: None, check=wrong)
    assert row is None and not (tmp_path / "results.jsonl").exists()
    assert recorder.failures and "REFUSED" in capsys.readouterr().out
    row = recorder.measure("demo", {"T": 4}, torch.float32, "torch", lambda: None,
                           check=lambda: None, baseline=lambda: None, bytes_moved=1e6,
                           peak_gb_per_s=4800.0)
    assert row["speedup"] > 0 and row["gb_per_s"] > 0
    assert row["fraction_of_peak_bw"] == row["gb_per_s"] / 4800.0
    assert json.loads((tmp_path / "results.jsonl").read_text())["op"] == "demo"
