#!/bin/bash
# Minitron pruning on one node (importance from forward passes on calibration data, then trimming):
#
#   LOAD=ckpt/llama31_8b_corrected DATA=data/calib_text_document SCORES=ckpt/llama31_8b.scores.pt \
#   SAVE=ckpt/llama31_4b_width_pruned sbatch slurm/prune.sh --seq-length 8192 --target hidden_size=3072 ffn_hidden_size=9216
#   (--seq-length: the calibration window; without it, the checkpoint's maximum context, 131072 for Llama-3.1)
#
# With SCORES set, the first run writes the scores and later runs (other targets) reuse them; SCORES_ONLY=1
# stops after the scores. TP/PP (default 1/1) give the model layout; the other GPUs of the node run DP.
# Arguments pass through to `minitron prune` (--target ..., --num-samples, --seq-agg, --depth-metrics, ...).
#SBATCH --job-name=minitron-prune
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=minitron-prune_%j.out
set -euo pipefail
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
slurm_require LOAD "the checkpoint to prune"
if [[ "${SCORES_ONLY:-0}" != 1 ]]; then
    slurm_require SAVE "where to write the pruned checkpoint (or SCORES_ONLY=1 with SCORES)"
fi
slurm_setup
export LOAD SAVE=${SAVE:-} DATA=${DATA:-} SCORES=${SCORES:-} TP=${TP:-1} PP=${PP:-1}
run_on_nodes prune.sh "$@"
