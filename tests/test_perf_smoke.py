"""The benchmark scripts keep working: every perf/bench_*.py runs its smallest CPU case, passes its
correctness check and records a JSON line (timings themselves are not asserted: machines are
shared and noisy)."""

import json
import os
import re
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


def test_summarize_writes_json_and_markdown(tmp_path):
    results = tmp_path / "results.jsonl"
    rows = [{"op": "gather_kv", "shape": {"T": 8}, "dtype": "float16", "impl": "triton",
             "median_ms": 0.5, "gb_per_s": 1200.0, "baseline": {"name": "copy", "median_ms": 0.4},
             "speedup": 0.8},
            {"op": "attention_scores/window", "shape": {"T_k": 4096}, "dtype": "bfloat16",
             "impl": "triton", "median_ms": 0.1, "tflop_per_s": 300.0}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = subprocess.run([sys.executable, str(PERF / "summarize.py"), str(results), "--json",
                          str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [r["op"] for r in summary] == ["gather_kv", "attention_scores/window"]
    assert summary[0]["baseline"] == "copy" and summary[1]["speedup"] is None
    assert "| gather_kv |" in (tmp_path / "s.md").read_text()
    missing = subprocess.run([sys.executable, str(PERF / "summarize.py"), str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_gpu_check_runs_existing_kernel_tests_and_benchmarks():
    script = (PERF / "gpu_check.sh").read_text()
    tests = re.findall(r"tests/test_\w+\.py", script)
    assert tests and all((PERF.parent / path).is_file() for path in tests)
    assert "test_compile" not in script and "test_perf_smoke" not in script  # CPU-only work
    benches = [spec.split(":")[0] for spec in script.split("for spec in ")[1].split(";")[0].split()]
    assert benches[:3] == ["attention", "gather", "attend"]
    assert all((PERF / f"bench_{name}.py").is_file() for name in benches)
