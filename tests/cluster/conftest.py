"""Fixtures of the cluster tests: a local SLURM cluster (slurm_harness.py), tiny data, a tiny teacher and its
pruned student, and a single-node TP2 distillation that the two-node run must reproduce."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_helpers import (ROOT, TOKENS_PER_ITER, indexed_dataset_tokens, launch_distill,  # noqa: E402
                             minitron)
from slurm_harness import LocalSlurm, unavailable_reason  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Data, a teacher trained briefly from examples/tiny_cpu.yaml, and its width-pruned student."""
    d = tmp_path_factory.mktemp("tiny")
    prefix = str(d / "stdlib")
    # 600 kB: one epoch holds ~1200 iterations of 8 x 32 tokens. Runs compared with each other must stay
    # within one epoch: megatron's GPTDataset shuffles all epochs it builds together, so the sample order of a
    # multi-epoch run depends on its length.
    minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", "600000", "--train-tokenizer",
             "--vocab-size", "512", "--output-prefix", prefix)
    train, valid = prefix + "_train", prefix + "_valid"
    train_tokens = indexed_dataset_tokens(train)
    teacher, student = str(d / "teacher"), str(d / "student")
    minitron("train", os.path.join(ROOT, "examples", "tiny_cpu.yaml"), f"data.train_data=[{train}]",
             f"data.valid_data=[{valid}]", "train.train_iters=10", "train.eval_interval=0",
             f"train.save={teacher}", "train.progress_bar=false")
    minitron("prune", "--load", teacher, "--save", student, "--data", train, "--num-samples", "16",
             "--target", "hidden_size=48", "ffn_hidden_size=128")
    return {"dir": str(d), "train": train, "valid": valid, "teacher": teacher, "student": student,
            "iters_per_epoch": train_tokens // TOKENS_PER_ITER}


@pytest.fixture(scope="session")
def short_reference(tiny):
    """20 iterations: the multi-node test's reference."""
    return launch_distill(tiny, os.path.join(tiny["dir"], "short_reference"), 20)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
