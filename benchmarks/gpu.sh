#!/usr/bin/env bash
# Everything issue 3 asks of a GPU, as one command that fits one call on a lent machine:
#
#   bash benchmarks/gpu.sh OUT_DIR [BUDGET_SECONDS]        (default budget: 480 s)
#
# 1. the Triton kernels' tests (the vLLM serving kernel's too), compiled on the device, against the
#    torch kernels;
# 2. the benchmarks, most important first: kernels (Triton vs copy bandwidth, the vLLM serving kernel
#    `roadkit::rotate_slots` included), decode (mixed batches vs the base model), overhead, compiled,
#    step, prefill, train, merge.
# The benchmarks stop at the budget's end; results are rewritten after every scenario, so what
# finished is kept. OUT_DIR receives five files: tests.log, bench.log, results.json, results.md and
# decode_vs_adapters.png. Nothing is installed: the machine's python3 has torch, Triton,
# transformers and peft. ROADKIT_BENCH_PRESET (default --gpu) picks another size, e.g. --quick to
# try this script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-480}
preset=${ROADKIT_BENCH_PRESET:---gpu}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
end=$((SECONDS + budget))

python3 - <<'EOF' 2>&1 | tee "$out/tests.log"
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
timeout $((budget / 4)) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_vllm_slots.py 2>&1 | tee -a "$out/tests.log"
tests=${PIPESTATUS[0]}

left=$((end - SECONDS))
timeout --signal=INT --kill-after=20 "$left" python3 -m benchmarks.run "$preset" --keep-going --reps 3 \
  --scenarios kernels,decode,overhead,compiled,step,prefill,train,merge --out "$out" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}

echo "tests: exit $tests; benchmarks: exit $bench (124: stopped at the budget of ${budget} s, finished scenarios kept)"
# The tables the GPU targets are read from (the rest is in results.md).
[ -f "$out/results.md" ] && awk '/^## (kernels|decode|overhead|compiled)/ {p = 1} /^## (step|prefill|train|merge)/ {p = 0}
  p && /^(##|\|)/' "$out/results.md"
[ "$tests" -eq 0 ] && { [ "$bench" -eq 0 ] || [ "$bench" -eq 124 ]; }
