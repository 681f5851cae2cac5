"""4 CPU ranks, one launch: the same checkpoint gives the same LM loss and per-item log-likelihoods at
TP1 x DP4, TP2 x DP2 and through `minitron eval` at TP2 x PP2 (see eval_layouts_worker.py)."""
import os

from procs import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "eval_layouts_worker.py")


def test_eval_same_at_every_layout(tmp_path):
    out = torchrun(WORKER, 4, str(tmp_path), timeout=600)
    assert "EVAL LAYOUTS OK" in out, out[-3000:]
