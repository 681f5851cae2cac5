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



def pytest_sessionstart(session):
    """Triton's interpreter up to 3.6 turns a kernel's scalar argument into a 1-element array and calls int() on
    it, which NumPy >= 2.4 refuses (triton-lang/triton#9171): every kernel test with a loop over a scalar bound
    would fail with "only 0-dimensional arrays can be converted to Python scalars". Say so once, up front."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError:
        return

    @triton.jit
    def _count_to(out_ptr, n):
        for i in range(0, n):
            tl.store(out_ptr + i, i)

    out = torch.zeros(2, dtype=torch.int32)
    try:
        _count_to[(1,)](out, 2)
    except Exception as e:
        import numpy

        pytest.exit(f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, which the kernel tests run "
                    f"under on CPU) cannot run a loop over a scalar argument with NumPy {numpy.__version__}: {e}. "
                    "Fix: pip install 'numpy<2.4', or a newer Triton (3.9 works; torch pins its own, e.g. "
                    "torch 2.11 -> Triton 3.6)", returncode=4)
