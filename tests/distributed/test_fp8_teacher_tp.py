"""TP2 (2 CPU ranks, gloo): the spec-built FP8 teacher equals the previously patched construction, with and
without sequence parallelism, its weights loaded from a TP2 checkpoint."""
import os

from procs import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "fp8_teacher_tp_worker.py")


def test_spec_built_fp8_teacher_tp2(tmp_path):
    out = torchrun(WORKER, 2, str(tmp_path), env={"TRITON_INTERPRET": "1"}, timeout=600)
    assert "FP8_TEACHER_TP_OK 4 checks" in out, out[-3000:]
