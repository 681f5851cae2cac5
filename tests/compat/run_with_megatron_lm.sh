#!/usr/bin/env bash
# The tests that run Megatron-LM's own code (tests/megatron_lm) against another Megatron-LM release: its
# training code (save_checkpoint, load_checkpoint, setup_model_and_optimizer) and its megatron-core, both from
# one checkout, on this machine's Python.
#
#   bash tests/compat/run_with_megatron_lm.sh MEGATRON_LM_CHECKOUT [pytest args...]   (default: tests/megatron_lm)
#
# MEGATRON_LM_CHECKOUT: a Megatron-LM tree at a core_v* tag (`git archive core_v0.19.0 | tar -x -C DIR`).
# The vendored copy (tests/megatron_lm/vendor, core_v0.16.1) stays what CI runs.
set -euo pipefail
src=$(cd "${1:?usage: run_with_megatron_lm.sh MEGATRON_LM_CHECKOUT [pytest args...]}" && pwd); shift
[ -f "$src/megatron/training/checkpointing.py" ] || { echo "$src is not a Megatron-LM checkout" >&2; exit 2; }
MINITRON_MEGATRON_LM_SRC="$src" exec bash "$(dirname "$0")/run_with_core.sh" "$src" "${@:-tests/megatron_lm}"
