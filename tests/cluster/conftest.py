"""Fixtures of the cluster tests: a local SLURM cluster (slurm_harness.py), tiny data, a tiny teacher and its
pruned student, and the single-node TP2 distillations that the SLURM and multi-node runs must reproduce."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_helpers import (ROOT, TOKENS_PER_ITER, TRAIN_SECONDS, launch_distill,  # noqa: E402
                             minitron)
from slurm_harness import LocalSlurm, unavailable_reason  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Data, a teacher trained briefly from examples/tiny_cpu.yaml, and its width-pruned student."""
    d = tmp_path_factory.mktemp("tiny")
    prefix = str(d / "stdlib")
    minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", "300000", "--train-tokenizer",
             "--vocab-size", "512", "--output-prefix", prefix)
    train, valid = prefix + "_train", prefix + "_valid"
    teacher, student = str(d / "teacher"), str(d / "student")
    minitron("train", os.path.join(ROOT, "examples", "tiny_cpu.yaml"), f"data.train_data=[{train}]",
             f"data.valid_data=[{valid}]", "train.train_iters=10", "train.eval_interval=0",
             f"train.save={teacher}", "train.progress_bar=false")
    minitron("prune", "--load", teacher, "--save", student, "--data", train, "--num-samples", "16",
             "--target", "hidden_size=48", "ffn_hidden_size=128")
    return {"dir": str(d), "train": train, "valid": valid, "teacher": teacher, "student": student}


@pytest.fixture(scope="session")
def short_reference(tiny):
    """20 iterations: the multi-node test's reference, and the measure of this machine's iteration time."""
    return launch_distill(tiny, os.path.join(tiny["dir"], "short_reference"), 20)


@pytest.fixture(scope="session")
def reference_distill(tiny, short_reference):
    """[(iteration, kd_loss)] of an uninterrupted run long enough (in wall time) for a SLURM time-limit signal
    to land mid-training: slurmctld checks limits every 30 s, so the run must outlast one check comfortably."""
    seconds = sorted(TOKENS_PER_ITER / r["tokens_per_s"] for r in short_reference[2:])
    iters = min(max(int(TRAIN_SECONDS / seconds[len(seconds) // 2]), 40), 3000)
    records = launch_distill(tiny, os.path.join(tiny["dir"], "reference_distill"), iters)
    # constant LR: a run's first iterations do not depend on its length
    assert [r["kd_loss"] for r in records[:20]] == [r["kd_loss"] for r in short_reference]
    return [(r["iteration"], r["kd_loss"]) for r in records]


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
