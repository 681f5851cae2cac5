#!/usr/bin/env bash
# Run benchmarks on a lent GPU machine that has torch + triton but not megatron-core / liger-kernel.
# Wheels for Python 3.12 are carried in .whl/ (see benchmarks/RESULTS.md, "How to run them"; gpu_wave.sh queues).
#   bash benchmarks/gpu_run.sh "kd_loss fp8 train"        # which bench_<name>.py to run, in order
#   bash benchmarks/gpu_run.sh "fp8_distill:--parts,step"  # with arguments
#   WAVE_CORE=0.19.2 bash benchmarks/gpu_run.sh kernel_tests   # with another megatron-core wheel from .whl/
#   (demo_gpu: `minitron demo --size tiny` on the GPU, the whole recipe end to end)
#   (kernel_tests: the fused FP8, KD and layer (RMSNorm, RoPE, SwiGLU) kernel tests, compiled for the GPU instead of
#    interpreted, the SDPA and fused-Adam GPU tests)
# Each benchmark gets its own time limit (BENCH_TIMEOUT, default 240 s) so one hang does not eat the rest;
# its output goes to $OUT/<name>.md when OUT is set (else benchmarks/out/).
set -uo pipefail
cd "$(dirname "$0")/.."
# fewer out-of-memory stops from fragmentation near the H200's limit (the headline KD step plans ~124 of 139 GiB);
# peak *allocated* bytes, what the benchmarks report, do not depend on it
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# megatron-core: the wheel of version WAVE_CORE (default 0.16.1, what CI runs) when .whl/ holds several; each
# version in its own target so that one machine can run both
core=${WAVE_CORE:-0.16.1}
if [ -d .whl ] && ! python3 -c "import megatron.core" 2>/dev/null; then
  others=(); for w in .whl/*.whl; do [[ $(basename "$w") == megatron_core-* ]] || others+=("$w"); done
  if [ ${#others[@]} -gt 0 ] && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${others[@]}" \
      || exit 1
  fi
  if [ ! -d "/tmp/site-core-$core" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "/tmp/site-core-$core" \
      .whl/megatron_core-"$core"-*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site-core-$core:/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/out}; mkdir -p "$out"
python3 -c "import megatron.core as m; print('megatron-core', m.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for item in ${1:-kd_loss fp8 train distill prune}; do
  name=${item%%:*}; extra=()  # "name:--flag,value" passes "--flag value" to that benchmark
  [[ $item == *:* ]] && IFS=, read -ra extra <<< "${item#*:}"
  echo "=== bench_$name ${extra[*]} $(date +%T)"
  case $name in
    memory_plan) cmd=(torchrun --nproc-per-node 1 benchmarks/bench_memory_plan.py --job train) ;;
    demo_gpu) cmd=(python3 -m megatron_minitron.cli demo --size tiny --output /tmp/demo_gpu) ;;
    kernel_tests) cmd=(env TRITON_INTERPRET=$([ -n "${SMOKE:-}" ] && echo 1 || echo 0) python3 -m pytest -q -p no:cacheprovider tests/unit/test_fp8_fused.py tests/unit/test_kd_triton.py tests/unit/test_kd_linear.py tests/unit/test_fused_layer_kernels.py tests/unit/test_model.py::test_sdpa_gqa_runs_a_fused_kernel_on_cuda tests/unit/test_train_optim.py) ;;
    *) cmd=(python3 benchmarks/bench_$name.py)
       [ -n "${SMOKE:-}" ] && extra+=(--smoke) ;;  # SMOKE=1: check the queue on a CPU (times nothing)
  esac
  timeout --kill-after=15 "${BENCH_TIMEOUT:-240}" "${cmd[@]}" "${extra[@]}" 2>&1 | grep -v "UserWarning\|warnings.warn" | tee "$out/${OUT_PREFIX:-}$name.md"
  echo "=== bench_$name exit ${PIPESTATUS[0]} $(date +%T)"
done
