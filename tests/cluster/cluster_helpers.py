"""Shared by the cluster tests (their fixtures are in conftest.py): the environment the scripts run in, the
distillation overrides every comparable run gets, and readers of a run's metrics.jsonl."""
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
# constant LR without warm-up, so a run's first N iterations do not depend on train.train_iters.
TOKENS_PER_ITER = 8 * 32  # data.global_batch_size x model.seq_length below
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


# megatron's .idx header: 9 magic bytes, an 8-byte version, then one byte naming the token dtype of the .bin
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def indexed_dataset_tokens(prefix):
    """Tokens in a megatron indexed dataset (its .bin holds nothing else)."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(18)
    assert header[:9] == _INDEX_MAGIC, f"{prefix}.idx is not a megatron index"
    return os.path.getsize(prefix + ".bin") // _DTYPE_BYTES[header[17]]


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


def run_launcher(cmd, env, cwd, log_path, timeout):
    """Run a launch/*.sh command with its output in log_path; on timeout or error in the test, kill it and
    every process under it (torchrun's workers live in sessions of their own, out of its process group)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)


def kill_tree(pid):
    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def distill_args(tiny, save, iters):
    """The overrides every distillation run here gets (after the ones the scripts add)."""
    return [*DISTILL_OVERRIDES, f"train.train_iters={iters}", f"distill.teacher={tiny['teacher']}",
            f"distill.student={tiny['student']}", f"data.train_data=[{tiny['train']}]",
            f"data.valid_data=[{tiny['valid']}]", f"train.save={save}"]


def launch_distill(tiny, save, iters):
    """Single-node TP2 (+ sequence parallel) distillation via launch/distill.sh: two ranks, uninterrupted."""
    env = dict(BASE_ENV, GPUS="2", CONFIG=os.path.join(ROOT, "examples", "tiny_cpu_distill.yaml"))
    log = save + ".log"
    code = run_launcher(["bash", os.path.join(ROOT, "launch", "distill.sh"), "parallel.tensor_model_parallel_size=2",
                         "parallel.sequence_parallel=true", "data.micro_batch_size=4",
                         *distill_args(tiny, save, iters)], env, tiny["dir"], log, timeout=1800)
    if code != 0:
        with open(log, errors="replace") as f:
            pytest.fail(f"single-node distillation failed (exit {code}):\n{f.read()[-6000:]}")
    records = read_metrics(save)
    assert [r["iteration"] for r in records] == list(range(1, iters + 1))
    return records
