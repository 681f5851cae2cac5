#!/usr/bin/env bash
# Issue 15's GPU measurements as one ordered queue, run through gpu_run.sh in as few device calls as fit.
# A session has ~15 minutes of device time and 10 minutes per command, so the queue is cut into calls by a
# time budget: each entry has its own limit, and an entry that would overrun WAVE_BUDGET seconds is left for
# the next call, which starts where this one stopped.
#   bash benchmarks/gpu_wave.sh            # entries 1.. within WAVE_BUDGET (default 540 s)
#   WAVE_START=5 bash benchmarks/gpu_wave.sh   # the next call: from entry 5 on
#   WAVE_LIST=1 bash benchmarks/gpu_wave.sh    # print the queue and exit
# Needs .whl/ carried (megatron-core 0.16.1 and 0.19.2 cp312 wheels, liger-kernel; docs/launch.md). Output
# per entry in $OUT/<n>_<name>.md (gpu_run.sh's), so the files come back with the call.
set -uo pipefail
cd "$(dirname "$0")/.."

# entry: "issue item | budget s | gpu_run.sh item (name:--flag,value,...)"
QUEUE=(
  "8 headline KD step, bf16 teacher    |200| kd_step"
  "8+6 KD step, FP8 teacher, fused opt-ins |170| kd_step:--teacher-precision,fp8,--teacher-fp8-fast-accum,--fused-kernels,--fused-adam"
  "1 KD fused with the output layer    |100| kd_linear"
  "2 student step, fused kernels, Adam |240| train:--fused-kernels,--fused-adam,--backends,sdpa"
  "2 student step, Llama-3.1-8B layers |200| train:--shape,llama8b,--fused-kernels,--backends,sdpa"
  "2 student step, compile and Liger   |240| train:--compile,--liger,--backends,sdpa"
  "3+4 importance pass, rewrite        |200| prune"
  "6 FP8 teacher KD loss, fast accum   |170| fp8_distill:--parts,accuracy"
  "5 planner vs peak, train            |120| memory_plan"
  "5 planner vs peak, distill          |150| memory_plan:--job,distill"
  "7 megatron-core 0.19.2 GPU subset   |200| core_019"
  "2 FP8 spec teacher layer            |100| fp8:--parts,layer"
)

if [ -n "${WAVE_LIST:-}" ]; then
  for i in "${!QUEUE[@]}"; do echo "$((i + 1)). ${QUEUE[$i]}"; done
  exit 0
fi
start=${WAVE_START:-1} budget=${WAVE_BUDGET:-540} used=0
for i in "${!QUEUE[@]}"; do
  n=$((i + 1)); [ "$n" -lt "$start" ] && continue
  IFS='|' read -r what limit item <<< "${QUEUE[$i]}"
  item=${item// /}
  if [[ $item == *--liger* ]] && ! ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    item=${item/,--liger/}; echo "=== wave: no liger-kernel wheel in .whl/, entry $n runs without --liger"
  fi
  if [ $((used + limit)) -gt "$budget" ]; then
    echo "=== wave: stopping before entry $n ($what): ${used}s used of ${budget}s; next call: WAVE_START=$n"
    exit 0
  fi
  echo "=== wave entry $n: $what (limit ${limit}s)"
  t0=$(date +%s)
  if [ "$item" = core_019 ]; then
    # the same kernel tests and a GPU demo with megatron-core 0.19.2 in place of 0.16.1 (CI stays on 0.16)
    OUT_PREFIX="${n}_" BENCH_TIMEOUT=$((limit / 2)) WAVE_CORE=0.19.2 bash benchmarks/gpu_run.sh "kernel_tests demo_gpu"
  else
    OUT_PREFIX="${n}_" BENCH_TIMEOUT=$limit bash benchmarks/gpu_run.sh "$item"
  fi
  used=$((used + $(date +%s) - t0))
done
echo "=== wave: queue done, ${used}s used"
