"""Checkpoints in Megatron-LM's layout with real processes on CPU (see checkpoint_megatron_lm_worker.py):
crash safety of format="megatron-lm" saves and of `prune --in-place` on a Megatron-LM-written root (one
plain process, crashes in forked children), and a TP2 save resumed at TP1 and TP2 (2 ranks)."""
import os
import subprocess
import sys

import pytest

from procs import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "checkpoint_megatron_lm_worker.py")


def test_megatron_lm_format_saves_and_in_place_prune_survive_crashes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for name in ("MINITRON_TEST_CRASH_AT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)  # set by an in-process init_distributed of an earlier test
    proc = subprocess.run([sys.executable, WORKER, "crash", str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "MEGATRON-LM CRASH OK" not in out:
        pytest.fail(f"crash worker failed (rc={proc.returncode}):\n{out[-6000:]}")
    assert out.count("settled to release") == 5, out[-3000:]


def test_megatron_lm_format_tp2_resumes_at_tp1_and_tp2(tmp_path):
    out = torchrun(WORKER, 2, "reshard", str(tmp_path), timeout=900)
    assert "MEGATRON-LM RESHARD OK" in out
    assert "TP1: resumed" in out and "TP2: resumed" in out
