"""TP2 (2 CPU ranks, gloo): the KD loss fused with the output layer on vocabulary shards (torch and Triton
interpreter epilogues, with and without sequence parallelism) vs float64 full-vocabulary references. One launch."""
import os

from procs import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "kd_linear_tp_worker.py")


def test_kd_linear_tp2():
    out = torchrun(WORKER, 2, env={"TRITON_INTERPRET": "1"}, timeout=300)
    assert "KD_LINEAR_TP_OK" in out, out[-3000:]
