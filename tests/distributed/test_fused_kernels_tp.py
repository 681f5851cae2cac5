import os

from procs import torchrun

HERE = os.path.dirname(__file__)


def test_fused_layer_modules_match_the_plain_ones_at_tp2_with_and_without_sp(tmp_path):
    out = torchrun(os.path.join(HERE, "fused_kernels_tp_worker.py"), 2, tmp_path)
    assert "FUSED TP OK" in out
