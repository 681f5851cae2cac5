import os

from procs import torchrun

HERE = os.path.dirname(__file__)


def test_layouts_match_plain_torch_step(tmp_path):
    """TP1PP1 (DP4), TP2PP1 (DP2), TP1PP2 (DP2), TP2PP2, TP2PP2+SP: same logits, loss and stepped weights."""
    out = torchrun(os.path.join(HERE, "train_equivalence_worker.py"), 4, tmp_path)
    assert "EQUIVALENCE OK" in out
