#!/bin/bash
# Llama-3.1-Minitron-4B (Width by default, CONFIG=examples/llama31_minitron_4b_depth_distill.yaml for Depth):
# distill the pruned student from the corrected Llama-3.1-8B with the 2408.11796 Table 4 settings (peak LR
# 1e-4, min LR 1e-5, 40 warm-up steps, cosine, global batch 1152, context 8192, 94B tokens = 9961 steps).
#
#   TEACHER=ckpt/llama31_8b_corrected STUDENT=ckpt/llama31_4b_width_pruned DATA=data/mix_text_document \
#   SAVE_DIR=ckpt/llama31_minitron_4b_width sbatch slurm/distill_4b.sh [key=value overrides ...]
#
# Layout TP2 PP1 + sequence parallel, micro-batch 1 (DP 64 on 16 nodes): `minitron plan` puts the width
# student at ~45 GiB and the depth student at ~40 GiB per GPU with the bf16 8B teacher; TP2 keeps the
# tensor-parallel all-reduces small and PP1 has no bubble. TP=4 halves weights if memory is short.
# Resubmits itself (scontrol requeue) after saving when the time limit nears; resumes from SAVE_DIR.
#SBATCH --job-name=minitron-distill-4b
#SBATCH --nodes=16
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=minitron-distill-4b_%j.out
set -euo pipefail
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
slurm_require TEACHER "the teacher checkpoint (Llama-3.1-8B after teacher correction)"
slurm_require STUDENT "the pruned student checkpoint (minitron prune output)"
slurm_require DATA "the distillation data prefix or blend, e.g. data/mix_text_document or [0.7,a,0.3,b]"
slurm_require SAVE_DIR "where the distilled student's checkpoints go (and are resumed from)"
slurm_setup
export CONFIG=${CONFIG:-${REPO_DIR}/examples/llama31_minitron_4b_width_distill.yaml}
[[ "${DATA}" == \[* ]] || DATA="[${DATA}]"
table4=(train.lr=1e-4 train.min_lr=1e-5 train.lr_warmup_iters=40 train.lr_decay_style=cosine
        data.global_batch_size=1152 model.seq_length=8192 train.train_iters=${TRAIN_ITERS:-9961})
run_on_nodes distill.sh "${table4[@]}" \
    parallel.tensor_model_parallel_size="${TP:-2}" parallel.pipeline_model_parallel_size="${PP:-1}" \
    parallel.sequence_parallel=true data.micro_batch_size="${MICRO_BATCH:-1}" \
    distill.teacher="${TEACHER}" distill.student="${STUDENT}" data.train_data="${DATA}" train.save="${SAVE_DIR}" \
    "$@"
