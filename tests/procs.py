"""Launching real multi-rank processes on CPU/gloo for the tests (importable as ``procs``; not from ``conftest``,
which names a different module in each test folder that has one)."""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, nproc: int, *args, timeout: int = 600, env: dict | None = None) -> str:
    """Run ``script`` on ``nproc`` CPU ranks; fail the test with the output if any rank fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", "--master-addr=127.0.0.1", script, *map(str, args)]
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"torchrun {os.path.basename(script)} x{nproc} failed (rc={proc.returncode}):\n"
                    f"{out[-6000:]}")
    return out
