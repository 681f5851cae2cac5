#!/usr/bin/env bash
# Run (a part of) the test suite against another megatron-core's sources, on this machine's Python.
#
#   bash tests/compat/run_with_core.sh CORE_SRC [pytest args...]      (default: tests/unit tests/e2e)
#
# CORE_SRC is a directory holding megatron/core: an unpacked wheel (`pip download --no-deps
# --python-version 3.12 --only-binary=:all: megatron-core==0.19.2`, then unzip) or a Megatron-LM checkout at
# a core_v* tag. megatron-core >= 0.17 requires Python >= 3.12 to install, but its sources run under 3.11,
# which is how the CPU machines check 0.17-0.19 (CI keeps the installed 0.16.1). The tests' subprocesses put
# the repository root first on PYTHONPATH, so the other core goes into a copy of the repository (HEAD plus
# the working tree's changes), where `megatron` (a namespace package) finds it before the installed one.
set -euo pipefail
src=${1:?usage: run_with_core.sh CORE_SRC [pytest args...]}; shift
[ -f "$src/megatron/core/__init__.py" ] || { echo "$src/megatron/core/__init__.py not found" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/minitron-core-XXXXXX)
trap 'rm -rf "$work"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard | (cd "$repo" && xargs -0 cp --parents -t "$work" 2>/dev/null || true)
mkdir -p "$work/megatron" && cp -r "$src/megatron/core" "$work/megatron/core"
find "$work/megatron/core" -name '*.so' -delete  # built for another Python
# the dataset index helpers (C++) for this Python: the installed core's build when the source is the same
# (0.16.1-0.19.0: it is), else built here (needs pybind11 and a compiler)
installed=$(python -c "import megatron.core, os; print(os.path.dirname(megatron.core.__file__))")
if cmp -s "$installed/datasets/helpers.cpp" "$work/megatron/core/datasets/helpers.cpp"; then
    cp "$installed"/datasets/helpers_cpp*.so "$work/megatron/core/datasets/"
else
    make -s -C "$work/megatron/core/datasets" >/dev/null
fi
cd "$work"
version=$(PYTHONPATH="$work" python -c "from megatron.core.package_info import __version__; print(__version__)")
echo "megatron-core $version from $src, tests in $work"
PYTHONPATH="$work" python -m pytest -q -p no:cacheprovider "${@:-tests/unit tests/e2e}"
