#!/usr/bin/env bash
# One prepared run on a GPU machine (the `device` tool): compiled-kernel tests, then every benchmark
# (run_all.py runs every perf/bench_*.py in name order: aggregate, align, attend, attention, gather,
# pipeline, policies, pool).
# Budget: at most 9 minutes on one H100/H200 (tests <= 4, benchmarks <= 5). Results go under $OUT when it is set.
#   bash perf/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-perf/results/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{
  echo "# gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT_DIR/env.txt"

if ! python -c "import proxykv" 2>/dev/null; then
  pip install -q -e ".[test]" 2>&1 | tail -2
fi

status=0
# Compiled Triton kernels on CUDA tensors, with the ci hypothesis profile (bounded).
timeout 240 env PROXYKV_TEST_BACKEND=compiled python -m pytest tests -q -x \
  --ignore=tests/test_compile.py --ignore=tests/test_cli.py \
  -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT_DIR/tests.txt"
test_status=${PIPESTATUS[0]}
[ "$test_status" -ne 0 ] && status=1

timeout 300 python perf/run_all.py --device cuda --results "$OUT_DIR/results.jsonl" 2>&1 \
  | tee "$OUT_DIR/bench.txt"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -ne 0 ] && status=1

echo "tests exit $test_status, benchmarks exit $bench_status" | tee -a "$OUT_DIR/env.txt"
exit $status
