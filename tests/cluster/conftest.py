"""Fixtures of the cluster tests: a local SLURM cluster (slurm_harness.py), tiny data, a tiny teacher and its
pruned student, and a single-node TP2 distillation that the two-node run must reproduce."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_helpers import (BASE_ENV, ROOT, TOKENS_PER_ITER, indexed_dataset_tokens,  # noqa: E402
                             launch_distill, minitron)
from procs import PreloadedMinitron  # noqa: E402
from slurm_harness import LocalSlurm, unavailable_reason  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Data, a teacher trained briefly from examples/tiny_cpu.yaml, and its width-pruned student."""
    d = tmp_path_factory.mktemp("tiny")
    # train and prune below run in forks of one process that imported everything once (tests/procs.py), not in
    # two more fresh interpreters; it imports while preprocess (a plain process) runs
    server = PreloadedMinitron(BASE_ENV, str(tmp_path_factory.mktemp("cli_server")))
    prefix = str(d / "stdlib")
    # 600 kB: one epoch holds ~1200 iterations of 8 x 32 tokens. Runs compared with each other must stay
    # within one epoch: megatron's GPTDataset shuffles all epochs it builds together, so the sample order of a
    # multi-epoch run depends on its length.
    try:
        minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", "600000", "--train-tokenizer",
                 "--vocab-size", "512", "--output-prefix", prefix)
    except BaseException:
        server.close()
        raise
    train, valid = prefix + "_train", prefix + "_valid"
    train_tokens = indexed_dataset_tokens(train)
    teacher, student = str(d / "teacher"), str(d / "student")
    try:
        for args in (["train", os.path.join(ROOT, "examples", "tiny_cpu.yaml"), f"data.train_data=[{train}]",
                      f"data.valid_data=[{valid}]", "train.train_iters=10", "train.eval_interval=0",
                      f"train.save={teacher}", "train.progress_bar=false"],
                     ["prune", "--load", teacher, "--save", student, "--data", train, "--num-samples", "16",
                      "--target", "hidden_size=48", "ffn_hidden_size=128"]):
            proc = server.run(*args)
            if proc.returncode != 0:
                pytest.fail(f"minitron {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    finally:
        server.close()
    return {"dir": str(d), "train": train, "valid": valid, "teacher": teacher, "student": student,
            "iters_per_epoch": train_tokens // TOKENS_PER_ITER}


@pytest.fixture(scope="session")
def uninterrupted(tiny):
    """`uninterrupted(n)`: the metrics records of the first n iterations of a single-node TP2 distillation
    (launch_distill). One run serves every length up to its own: with the constant LR of DISTILL_OVERRIDES and
    within one epoch, a run's first n iterations do not depend on its train.train_iters (the SLURM time-limit
    test relies on the same). A longer request launches a run of that length."""
    runs = []

    def records(n):
        if not runs or len(runs[-1]) < n:
            runs.append(launch_distill(tiny, os.path.join(tiny["dir"], f"uninterrupted_{len(runs)}"), n))
        return runs[-1][:n]
    return records


def pytest_collection_modifyitems(items):
    """The two-node test runs after the SLURM time-limit test: that one needs an uninterrupted run whose length
    is known only once its job has run; the two-node test's reference is the first 20 iterations of that same
    run (`uninterrupted`), one launch instead of two. Nothing else moves."""
    here = os.path.dirname(os.path.abspath(__file__))
    index = {(item.path.name, item.name): i for i, item in enumerate(items) if str(item.path.parent) == here}
    two_nodes = index.get(("test_multinode_launch.py", "test_two_nodes_on_localhost_equal_one_node"))
    time_limit = index.get(("test_slurm_jobs.py", "test_time_limit_signal_saves_requeues_resumes_and_matches"))
    if two_nodes is not None and time_limit is not None and two_nodes < time_limit:
        items.insert(time_limit, items.pop(two_nodes))


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
