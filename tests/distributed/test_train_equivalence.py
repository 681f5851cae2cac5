import importlib.util
import os

from procs import torchrun

HERE = os.path.dirname(__file__)


def test_layouts_match_plain_torch_step(tmp_path):
    """TP1PP1 (DP4), TP2PP1 (DP2), TP1PP2 (DP2), TP2PP2, TP2PP2+SP: same logits, loss and stepped weights, for a
    model with Qwen3's q/k layernorms, whose grads are the TP-summed ones and whose weights stay equal on TP ranks.
    The same launch loads the tiny HF qwen3 at TP2 x PP2 (logits vs transformers, export, CLI round trip)."""
    out = torchrun(os.path.join(HERE, "train_equivalence_worker.py"), 4, tmp_path)
    assert "EQUIVALENCE OK" in out
    if importlib.util.find_spec("transformers") is not None:  # hf_convert_worker.check_tp2_pp2, run by the worker
        for rank in range(4):
            assert f"rank {rank} TP2 PP2 qwen3: read" in out, rank
        assert out.count("CLI qwen3 fp32 TP2PP2 -> TP2PP2 OK") == 4, out[-3000:]
