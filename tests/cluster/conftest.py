"""Fixtures of the cluster tests: a local SLURM cluster (tests/cluster/slurm_harness.py), tiny data, a tiny
teacher and its pruned student, and the single-node TP2 distillation that the SLURM and multi-node runs must
reproduce exactly."""
import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from slurm_harness import LocalSlurm, unavailable_reason  # noqa: E402

# the scripts find python / torchrun / minitron on PATH: the interpreter running the tests comes first
PATH = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_", "MASTER_", "TORCH_ELASTIC"))}
for _k in ("GPUS", "NNODES", "NODE_RANK", "CONFIG", "TP", "PP", "IMAGE", "DATA", "SAVE", "LOAD", "SCORES",
           "SCORES_ONLY", "TEACHER", "STUDENT", "SAVE_DIR", "REPO_DIR", "LOG_DIR", "DRY_RUN", "MAX_RESTARTS",
           "GPUS_PER_NODE", "MICRO_BATCH", "TRAIN_ITERS", "RDZV_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
    BASE_ENV.pop(_k, None)
BASE_ENV.update(PATH=PATH, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

# Teacher and student follow examples/tiny_cpu.yaml and examples/tiny_cpu_distill.yaml (4 layers, hidden 64 ->
# 48, seq 32, vocab 512). Distillation overrides shared by every run that must give the same losses: a
# constant LR without warm-up, so any run's first N iterations are comparable with the reference's.
TOKENS_PER_ITER = 8 * 32  # global batch x seq_length below
TRAIN_SECONDS = 45  # wall time of the long reference (see reference_distill)
DISTILL_OVERRIDES = ["train.lr=1e-3", "train.min_lr=1e-3", "train.lr_warmup_iters=0",
                     "train.lr_decay_style=constant", "data.global_batch_size=8", "model.seq_length=32",
                     "train.eval_interval=0", "train.log_interval=100", "train.save_interval=0",
                     "train.progress_bar=false"]


def minitron(*args, timeout=600, cwd=ROOT):
    proc = subprocess.run([sys.executable, "-m", "megatron_minitron.cli", *args], capture_output=True, text=True,
                          env=BASE_ENV, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"minitron {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(save):
    path = os.path.join(save, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(save, key="kd_loss"):
    """[(iteration, loss)] in the order metrics.jsonl holds them (a resumed run appends to the same file)."""
    return [(r["iteration"], r[key]) for r in read_metrics(save) if key in r]


def wait_for(predicate, timeout, what, poll=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout} s")


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


def distill_args(tiny, save, iters):
    """The overrides every distillation run here gets (after the ones the scripts add)."""
    return [*DISTILL_OVERRIDES, f"train.train_iters={iters}", f"distill.teacher={tiny['teacher']}",
            f"distill.student={tiny['student']}", f"data.train_data=[{tiny['train']}]",
            f"data.valid_data=[{tiny['valid']}]", f"train.save={save}"]


def launch_distill(tiny, save, iters):
    """Single-node TP2 (+ sequence parallel) distillation via launch/distill.sh: two ranks, uninterrupted."""
    env = dict(BASE_ENV, GPUS="2", CONFIG=os.path.join(ROOT, "examples", "tiny_cpu_distill.yaml"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "distill.sh"),
                           "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                           "data.micro_batch_size=4", *distill_args(tiny, save, iters)],
                          env=env, cwd=tiny["dir"], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"single-node distillation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = read_metrics(save)
    assert [r["iteration"] for r in records] == list(range(1, iters + 1))
    return records


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
