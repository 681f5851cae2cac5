"""Shared test fixtures. Multi-rank tests launch real processes under torchrun on CPU/gloo (tests/procs.py)."""
import os
import sys

# TRITON_INTERPRET is set for the whole session because it cannot be scoped to the kernel tests (triton 3.9):
# - `triton.jit` picks the interpreter when it *decorates* a function, not when the kernel is launched
#   (triton/runtime/jit.py:998, `if knobs.runtime.interpret:` inside jit's `decorator`);
# - triton's own device functions are decorated once, when `import triton` imports triton.language
#   (triton/language/standard.py:199-203, `@jit def max(...)`; likewise sum, ...);
# - inside an interpreted kernel a non-interpreted one of them raises "Cannot call @triton.jit'd outside of the
#   scope of a kernel" (triton/runtime/jit.py:923-924, JITFunction.__call__).
# megatron-core imports triton when it is imported, i.e. while pytest collects any test module that imports it;
# a fixture or marker setting `triton.knobs.runtime.interpret` later re-decorates nothing (tried: the kernel then
# fails on tl.max). So it must be in the environment before the first `import triton` of the process. It changes
# nothing for CPU tests that launch no Triton kernel. GPU runs of the kernel tests pass TRITON_INTERPRET=0
# explicitly (benchmarks/gpu_run.sh), and the sm_90 compile check sets 0 in its own subprocess.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import torchrun  # noqa: E402


@pytest.fixture
def run_distributed():
    return torchrun

