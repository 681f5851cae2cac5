#!/usr/bin/env bash
# minitron search on this node under torchrun:
#   GPUS=8 CONFIG=search.yaml launch/search.sh [key=value ...] [--load CKPT --param-budget N --output DIR ...]
# CONFIG is a search config (search/data/train/distill/parallel sections, no model section: docs/search.md).
# Extra arguments are passed through: overrides such as train.lr=1e-4 first (they must follow CONFIG
# directly), then flags. See launch/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require CONFIG "the YAML config of the search job (search/data/train sections, no model section; docs/search.md)"
[[ -f "${CONFIG}" ]] || die "CONFIG=${CONFIG} does not exist"
run_minitron search "${CONFIG}" "$@"
