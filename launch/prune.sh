#!/usr/bin/env bash
# Minitron pruning under torchrun (GPUS = TP x PP x DP processes):
#   GPUS=8 TP=1 LOAD=checkpoints/llama31_8b DATA=data/calib SCORES=scores.pt SCORES_ONLY=1 launch/prune.sh \
#       --seq-length 8192     # the calibration window (default: the checkpoint's maximum context)
#   GPUS=8 TP=1 LOAD=... SCORES=scores.pt SAVE=checkpoints/pruned launch/prune.sh \
#       --target hidden_size=3072 ffn_hidden_size=9216
# Extra arguments (--target ..., --num-samples, --batch-agg, ...) pass through to `minitron prune`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require LOAD "the checkpoint to prune"
args=(--load "${LOAD}" --tp "${TP:-1}" --pp "${PP:-1}")
[[ -n "${DATA:-}" ]] && args+=(--data "${DATA}")
[[ -n "${SCORES:-}" ]] && args+=(--scores "${SCORES}")
if [[ "${SCORES_ONLY:-0}" == 1 ]]; then
    require SCORES "the importance-scores file to write (SCORES_ONLY=1)"
    args+=(--scores-only)
else
    require SAVE "where to write the pruned checkpoint (or SCORES_ONLY=1 with SCORES)"
    args+=(--save "${SAVE}")
fi
[[ -n "${DATA:-}" || -n "${SCORES:-}" ]] || die "DATA (calibration prefix) or SCORES (existing scores) is needed"
run_minitron prune "${args[@]}" "$@"
