"""Multi-rank HF conversion: TP2 and PP2 lazy loading, logits vs transformers, export round trip (qwen3 at
TP2 x PP2 is in test_train_equivalence.py's 4-rank launch)."""
import os

import pytest

from tests.hf_tiny_models import CASES

pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_tp2_pp2_lazy_load_logits_export_and_cli_round_trip(run_distributed, tmp_path):
    out = run_distributed(os.path.join(HERE, "hf_convert_worker.py"), 2, tmp_path)
    for layout in ("TP2 PP1", "TP1 PP2"):
        for case in CASES:
            for rank in (0, 1):
                assert f"rank {rank} {layout} {case}: read" in out, (layout, case, rank)
    for case in ("nemotron fp32", "qwen2 fp32", "qwen3 fp32", "llama bf16"):
        assert out.count(f"CLI {case}") == 2, case
