#!/usr/bin/env bash
# Run benchmarks on a lent GPU machine that has torch + triton but not megatron-core / liger-kernel.
# Wheels for Python 3.12 are carried in .whl/ (see docs/launch.md, "benchmarks on a lent GPU").
#   bash benchmarks/gpu_run.sh "kd_loss fp8 train"        # which bench_<name>.py to run, in order
# Each benchmark gets its own time limit (BENCH_TIMEOUT, default 240 s) so one hang does not eat the rest;
# its output goes to $OUT/<name>.md when OUT is set (else benchmarks/out/).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for name in ${1:-kd_loss fp8 train distill prune}; do
  echo "=== bench_$name $(date +%T)"
  case $name in
    memory_plan) cmd=(torchrun --nproc-per-node 1 benchmarks/bench_memory_plan.py --job train) ;;
    *) cmd=(python3 benchmarks/bench_$name.py) ;;
  esac
  timeout "${BENCH_TIMEOUT:-240}" "${cmd[@]}" ${BENCH_ARGS:-} 2>&1 | grep -v "UserWarning\|warnings.warn" | tee "$out/$name.md"
  echo "=== bench_$name exit ${PIPESTATUS[0]} $(date +%T)"
done
