import os

from procs import torchrun

HERE = os.path.dirname(__file__)


def test_distillation_step_matches_reference_at_every_layout(tmp_path):
    """KD + intermediate loss step == float64 plain torch at TP1PP1/TP2PP1/TP1PP2/TP2PP2; teacher frozen;
    self-distillation KL is zero."""
    out = torchrun(os.path.join(HERE, "distill_worker.py"), 4, tmp_path)
    assert "DISTILL OK" in out
