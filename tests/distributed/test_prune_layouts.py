"""4 CPU ranks, one launch: importance scores, plans, pruned tensors and pruned logits are identical at
TP1PP1, TP2PP1, TP1PP2 and TP2PP2 (see prune_layouts_worker.py)."""
import os

from procs import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "prune_layouts_worker.py")


def test_prune_same_at_every_layout(tmp_path):
    out = torchrun(WORKER, 4, str(tmp_path), timeout=600)
    assert "PRUNE LAYOUTS OK" in out, out[-3000:]
