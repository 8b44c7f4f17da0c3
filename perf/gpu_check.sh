#!/usr/bin/env bash
# One prepared run on a GPU machine (the `device` tool), in the order the scarce time is best spent:
#   1. the compiled Triton kernels against their references (the kernel test files only, with the
#      small `gpu` hypothesis profile; nothing that tests CPU-only code);
#   2. the target benchmarks: scoring (attention), gather, attention over the compacted cache
#      (attend), each against its baseline (SDPA / a device-to-device copy / SDPA over the full cache);
#   3. the pipeline benchmark and the rest, while time remains.
# Budget: about 9 minutes on one H100/H200 including compilation (each phase has its own timeout).
# Writes under $OUT (default perf/results/gpu_check): env.txt, tests.txt, bench.txt,
# results.jsonl and its summary.json / summary.md.
#   bash perf/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-perf/results/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
RESULTS="$OUT_DIR/results.jsonl"

{
  echo "# gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT_DIR/env.txt"

if ! python -c "import proxykv" 2>/dev/null; then
  pip install -q -e ".[test]" 2>&1 | tail -2
fi

status=0
KERNEL_TESTS="tests/test_attention_scores.py tests/test_ragged_attention.py tests/test_decode.py \
  tests/test_gather.py tests/test_launch_limits.py tests/test_ragged_cache.py \
  tests/test_aggregate.py tests/test_pool.py"
timeout 240 env PROXYKV_TEST_BACKEND=compiled PROXYKV_HYPOTHESIS_PROFILE=gpu \
  python -m pytest $KERNEL_TESTS -q -x -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT_DIR/tests.txt"
test_status=${PIPESTATUS[0]}
[ "$test_status" -ne 0 ] && status=1

bench_status=0
: > "$OUT_DIR/bench.txt"
for spec in attention:120 gather:45 attend:90 pipeline:90 aggregate:30 pool:30 policies:30; do
  name=${spec%%:*}
  limit=${spec##*:}
  timeout "$limit" python "perf/bench_$name.py" --device cuda --results "$RESULTS" 2>&1 \
    | tee -a "$OUT_DIR/bench.txt"
  code=${PIPESTATUS[0]}
  if [ "$code" -ne 0 ]; then
    echo "bench_$name exited $code (timeout 124)" | tee -a "$OUT_DIR/bench.txt"
    bench_status=1
  fi
done
[ "$bench_status" -ne 0 ] && status=1
if [ -f "$RESULTS" ]; then
  python perf/summarize.py "$RESULTS" --json "$OUT_DIR/summary.json" \
    --markdown "$OUT_DIR/summary.md" > /dev/null
fi

echo "tests exit $test_status, benchmarks exit $bench_status" | tee -a "$OUT_DIR/env.txt"
exit $status
