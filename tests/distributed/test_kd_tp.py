"""TP2 (2 CPU ranks, gloo): vocab-parallel KD losses (torch + Triton interpreter) and sequence-parallel
hidden-state losses vs float64 full-vocabulary / full-sequence references. One launch for all checks."""
import os

from procs import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "kd_tp_worker.py")


def test_kd_losses_tp2():
    out = torchrun(WORKER, 2, env={"TRITON_INTERPRET": "1"}, timeout=300)
    assert "KD_TP_OK" in out, out[-3000:]
