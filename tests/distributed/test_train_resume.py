import os

from procs import torchrun

HERE = os.path.dirname(__file__)


def test_stop_and_resume_reproduces_loss_sequence(tmp_path):
    out = torchrun(os.path.join(HERE, "train_resume_worker.py"), 4, tmp_path)
    assert "RESUME OK" in out
