"""Shared test fixtures. Multi-rank tests launch real processes under torchrun on CPU/gloo (tests/procs.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import torchrun  # noqa: E402


@pytest.fixture
def run_distributed():
    return torchrun
