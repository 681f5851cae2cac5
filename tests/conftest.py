"""Shared test fixtures. Multi-rank tests launch real processes under torchrun on CPU/gloo (tests/procs.py)."""
import os
import sys

# Triton decides at import time whether its own @jit functions (tl.max, ...) run under the interpreter: it must
# be set before anything imports triton, and megatron-core does at import (collection of any test importing it).
# GPU runs of the kernel tests pass TRITON_INTERPRET=0 explicitly (benchmarks/gpu_run.sh).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import torchrun  # noqa: E402


@pytest.fixture
def run_distributed():
    return torchrun

