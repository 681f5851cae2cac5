"""Fixtures shared by the end-to-end tests."""
import os

import pytest

from procs import ROOT, PreloadedMinitron

# what every e2e test runs `minitron` with (MINITRON_DEBUG off: the tests read the one-line user errors)
CLI_ENV = {k: v for k, v in dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="").items()
           if k != "MINITRON_DEBUG"}


@pytest.fixture(scope="session")
def preloaded_cli(tmp_path_factory):
    """`minitron` commands in forks of one process that imported everything once (tests/procs.py): for the
    commands after a test's first (which stays a plain `python -m megatron_minitron.cli` process)."""
    server = PreloadedMinitron(CLI_ENV, str(tmp_path_factory.mktemp("cli_server")))
    yield server
    server.close()
