"""`prune --in-place` is crash-safe (a killed run leaves the source or the pruned checkpoint loadable under
the source's name, and a re-run settles it), refuses a staged copy that does not read back equal to the pruned
model (the source stays as it was), and works on a checkpoint root at TP2."""
import os
import subprocess
import sys

import pytest

from procs import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "prune_inplace_worker.py")


def test_in_place_survives_crashes_at_every_step(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for name in ("MINITRON_TEST_CRASH_AT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)  # set by an in-process init_distributed of an earlier test
    proc = subprocess.run([sys.executable, WORKER, "crash", str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"crash worker failed (rc={proc.returncode}):\n{out[-6000:]}")
    assert out.count("settled to the pruned one") == 5, out[-3000:]
    assert "read-back mismatch: SRC untouched" in out, out[-3000:]


def test_in_place_on_a_root_at_tp2(tmp_path):
    out = torchrun(WORKER, 2, "tp2", str(tmp_path))
    assert out.count("holds the trimmed shards") == 2, out[-3000:]
