#!/bin/bash
# MN-Minitron-8B: distill the width-pruned student from the (corrected) Mistral-NeMo-12B teacher with the
# 2408.11796 Table 4 settings (peak LR 1e-4, min LR 4.5e-7, 60 warm-up steps, cosine, global batch 768,
# context 8192, 380B tokens = 60400 steps) on 32 H100 nodes, as in the paper.
#
#   TEACHER=ckpt/mistral_nemo_12b_corrected STUDENT=ckpt/mn_minitron_8b_pruned DATA=data/mix_text_document \
#   SAVE_DIR=ckpt/mn_minitron_8b sbatch slurm/distill_8b.sh [key=value overrides ...]
#
# Layout TP4 PP1 + sequence parallel, micro-batch 1 (DP 64): query groups 8 allow TP 1/2/4/8 inside the
# NVLink node; `minitron plan` puts this at ~35 GiB per GPU (bf16 student + fp32 grads + sharded Adam +
# bf16 teacher + activations at seq 8192), and PP1 has no pipeline bubble and no teacher-widened p2p
# buffers. TP=8 (~27 GiB) leaves room for experiments; PP=2 only if the teacher grows. Change with TP=/PP=.
# Resubmits itself (scontrol requeue) after saving when the time limit nears; resumes from SAVE_DIR.
#SBATCH --job-name=minitron-distill-8b
#SBATCH --nodes=32
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=minitron-distill-8b_%j.out
set -euo pipefail
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
slurm_require TEACHER "the teacher checkpoint (Mistral-NeMo-12B after teacher correction)"
slurm_require STUDENT "the pruned student checkpoint (minitron prune output)"
slurm_require DATA "the distillation data prefix or blend, e.g. data/mix_text_document or [0.7,a,0.3,b]"
slurm_require SAVE_DIR "where the distilled student's checkpoints go (and are resumed from)"
slurm_setup
export CONFIG=${CONFIG:-${REPO_DIR}/examples/mn_minitron_8b_distill.yaml}
[[ "${DATA}" == \[* ]] || DATA="[${DATA}]"
table4=(train.lr=1e-4 train.min_lr=4.5e-7 train.lr_warmup_iters=60 train.lr_decay_style=cosine
        data.global_batch_size=768 model.seq_length=8192 train.train_iters=${TRAIN_ITERS:-60400})
run_on_nodes distill.sh "${table4[@]}" \
    parallel.tensor_model_parallel_size="${TP:-4}" parallel.pipeline_model_parallel_size="${PP:-1}" \
    parallel.sequence_parallel=true data.micro_batch_size="${MICRO_BATCH:-1}" \
    distill.teacher="${TEACHER}" distill.student="${STUDENT}" data.train_data="${DATA}" train.save="${SAVE_DIR}" \
    "$@"
