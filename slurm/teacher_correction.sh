#!/bin/bash
# Teacher correction (2408.11796): fine-tune the teacher on the distillation data before pruning/distilling.
# CONFIG defaults to examples/mistral_nemo_12b_teacher_correction.yaml (examples/llama31_8b_teacher_correction.yaml
# for Llama-3.1-8B). The run starts from TEACHER's weights (train.load) and resumes from SAVE_DIR after a requeue.
#
#   TEACHER=ckpt/mistral_nemo_12b DATA=data/mix_text_document SAVE_DIR=ckpt/mistral_nemo_12b_corrected \
#   sbatch slurm/teacher_correction.sh [key=value overrides ...]
#
# Layout from the config (Mistral-NeMo-12B: TP8 PP1 + SP; override with TP=/PP=/MICRO_BATCH=).
#SBATCH --job-name=minitron-teacher-correction
#SBATCH --nodes=32
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=minitron-teacher-correction_%j.out
set -euo pipefail
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
slurm_require TEACHER "the converted teacher checkpoint (minitron convert hf-to-mcore output)"
slurm_require DATA "the distillation data prefix or blend"
slurm_require SAVE_DIR "where the corrected teacher's checkpoints go (and are resumed from)"
slurm_setup
export CONFIG=${CONFIG:-${REPO_DIR}/examples/mistral_nemo_12b_teacher_correction.yaml}
[[ "${DATA}" == \[* ]] || DATA="[${DATA}]"
layout=()
[[ -n "${TP:-}" ]] && layout+=(parallel.tensor_model_parallel_size="${TP}")
[[ -n "${PP:-}" ]] && layout+=(parallel.pipeline_model_parallel_size="${PP}")
[[ -n "${MICRO_BATCH:-}" ]] && layout+=(data.micro_batch_size="${MICRO_BATCH}")
run_on_nodes train.sh train.load="${TEACHER}" data.train_data="${DATA}" train.save="${SAVE_DIR}" \
    ${layout[@]+"${layout[@]}"} "$@"
