"""slurm/*.sh under a real SLURM (the local cluster of slurm_harness.py), IMAGE=none, tiny CPU configs.

- teacher_correction.sh and prune.sh run to completion; logs land where docs/launch.md says.
- distill_8b.sh: SLURM's own `--signal=B:USR1@300` (the script's header) fires once the job's time limit is
  near; every rank saves, the batch script requeues the job, the next run resumes from the saved iteration
  and finishes, and the loss sequence equals an uninterrupted run's.
- MAX_RESTARTS: a job at its limit saves and is not requeued.
"""
import json
import os
import re

import pytest

from cluster_helpers import BASE_ENV, ROOT, distill_args, losses, read_metrics, wait_for

SUBMIT = ["--nodes=1", "--gpus-per-node=0"]  # the scripts ask for 32 nodes x 8 GPUs: this cluster has 1 x 0


def job_env(tmp_path, **extra):
    """What a user exports before sbatch (sbatch --export=ALL hands it to the job)."""
    return dict(BASE_ENV, REPO_DIR=ROOT, IMAGE="none", LOG_DIR=str(tmp_path / "logs"), **extra)


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def seconds(runtime: str) -> int:
    """scontrol's RunTime, [D-]HH:MM:SS."""
    days, _, clock = runtime.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def job_failure(slurm, job_id, submit_dir, log_dir):
    """Everything that explains a job's outcome, for an assertion message."""
    parts = [str(slurm.job(job_id))]
    for path in sorted(p for p in os.listdir(submit_dir) if p.endswith(f"_{job_id}.out")):
        parts.append(f"--- {path}\n{read(os.path.join(submit_dir, path))[-4000:]}")
    step_dir = os.path.join(log_dir, str(job_id))
    if os.path.isdir(step_dir):
        for name in sorted(os.listdir(step_dir)):
            parts.append(f"--- {name}\n{read(os.path.join(step_dir, name))[-4000:]}")
    return "\n".join(parts) + "\n" + slurm.logs()


def test_teacher_correction_and_prune_run_to_completion(slurm, tiny, tmp_path):
    corrected, pruned = str(tmp_path / "corrected"), str(tmp_path / "pruned")
    env = job_env(tmp_path, GPUS_PER_NODE="2", TEACHER=tiny["teacher"], DATA=tiny["train"],
                  SAVE_DIR=corrected, CONFIG=os.path.join(ROOT, "examples", "tiny_cpu.yaml"))
    correction = slurm.sbatch(*SUBMIT, os.path.join(ROOT, "slurm", "teacher_correction.sh"),
                              "train.train_iters=4", f"data.valid_data=[{tiny['valid']}]", "train.eval_interval=0",
                              "model.seq_length=32", "data.global_batch_size=8", "train.progress_bar=false",
                              env=env, cwd=str(tmp_path))
    # one process (GPUS_PER_NODE=1): the same calibration as the fixture's direct `minitron prune`
    env = job_env(tmp_path, GPUS_PER_NODE="1", LOAD=tiny["teacher"], SAVE=pruned, DATA=tiny["train"])
    prune = slurm.sbatch(*SUBMIT, os.path.join(ROOT, "slurm", "prune.sh"), "--num-samples", "16",
                         "--target", "hidden_size=48", "ffn_hidden_size=128", env=env, cwd=str(tmp_path))
    log_dir = str(tmp_path / "logs")
    for job_id in (correction, prune):  # --exclusive: the node runs them one after the other
        state = slurm.wait_done(job_id, timeout=900)
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", \
            job_failure(slurm, job_id, str(tmp_path), log_dir)
    # teacher correction: 4 iterations on from the teacher's weights, on 2 ranks (DP2)
    assert [r["iteration"] for r in read_metrics(corrected)] == [1, 2, 3, 4]
    assert read(os.path.join(corrected, "latest")).strip() == "iter_0000004"
    step_log = read(os.path.join(log_dir, str(correction), "minitron-teacher-correction_r0_node0.log"))
    assert "torchrun --nproc-per-node=2 --standalone --nnodes=1" in step_log
    batch_out = read(tmp_path / f"minitron-teacher-correction_{correction}.out")
    assert f"job {correction} (restart 0): 1 nodes x 2 GPUs" in batch_out and "image none" in batch_out
    # prune under SLURM keeps exactly what the direct prune kept
    with open(os.path.join(pruned, "prune_plan.json")) as f, \
            open(os.path.join(tiny["student"], "prune_plan.json")) as g:
        assert json.load(f) == json.load(g)
    assert os.path.exists(os.path.join(log_dir, str(prune), "minitron-prune_r0_node0.log"))


def test_time_limit_signal_saves_requeues_resumes_and_matches(slurm, tiny, reference_distill, tmp_path):
    iters = len(reference_distill)
    save, log_dir = str(tmp_path / "distilled"), str(tmp_path / "logs")
    env = job_env(tmp_path, GPUS_PER_NODE="2", TP="2", MICRO_BATCH="4", TRAIN_ITERS=str(iters),
                  TEACHER=tiny["teacher"], STUDENT=tiny["student"], DATA=tiny["train"], SAVE_DIR=save,
                  CONFIG=os.path.join(ROOT, "examples", "tiny_cpu_distill.yaml"))
    job_id = slurm.sbatch(*SUBMIT, "--time=30", os.path.join(ROOT, "slurm", "distill_8b.sh"),
                          *distill_args(tiny, save, iters), env=env, cwd=str(tmp_path))
    why = lambda: job_failure(slurm, job_id, str(tmp_path), log_dir)  # noqa: E731

    # Once training runs (every rank has its signal handler), shorten the limit so that it ends in 270-330 s:
    # the script's `--signal=B:USR1@300` is then due and slurmctld sends it at its next 30-second check.
    # (Waiting for a short --time set at submission would race the job's start-up on a slow machine.)
    wait_for(lambda: read_metrics(save) or slurm.job(job_id).get("JobState") not in ("PENDING", "RUNNING"),
             900, "the first training iteration")
    assert read_metrics(save), why()
    elapsed = seconds(slurm.job(job_id)["RunTime"])
    limit_minutes = (elapsed + 330) // 60
    assert slurm._run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit_minutes}").returncode == 0
    # the batch script requeues the job after the steps saved; give the next run a long limit before it starts
    # (requeued jobs wait for the previous credential to expire, 10 s here)
    slurm.wait_job(job_id, lambda f: f.get("Restarts") == "1" or f.get("JobState") not in ("PENDING", "RUNNING"),
                   timeout=600, what="the requeue")
    assert slurm._run("scontrol", "update", f"JobId={job_id}", "TimeLimit=30").returncode == 0
    state = slurm.wait_done(job_id, timeout=900)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0" and state["Restarts"] == "1", why()

    batch_out = read(tmp_path / f"minitron-distill-8b_{job_id}.out")  # both runs (--open-mode=append)
    assert "SIGUSR1: the time limit is near" in batch_out, why()
    assert f"requeueing job {job_id}" in batch_out and f"job {job_id} (restart 1)" in batch_out, why()
    first = read(os.path.join(log_dir, str(job_id), "minitron-distill-8b_r0_node0.log"))
    second = read(os.path.join(log_dir, str(job_id), "minitron-distill-8b_r1_node0.log"))
    saved = re.search(r"exit signal received: saved at iteration (\d+)", first)
    assert saved, first[-4000:]
    stopped = int(saved.group(1))
    assert 1 <= stopped < iters
    assert f"resumed from {save} at iteration {stopped}" in second, second[-4000:]
    # every rank wrote its shards of the signal checkpoint
    shards = os.listdir(os.path.join(save, f"iter_{stopped:07d}"))
    assert any(s.startswith("__0_") for s in shards) and any(s.startswith("__1_") for s in shards), shards
    assert read(os.path.join(save, "latest")).strip() == f"iter_{iters:07d}"
    got = losses(save)
    assert [i for i, _ in got] == list(range(1, iters + 1))  # nothing lost, nothing repeated
    assert got == reference_distill  # bit-identical to the uninterrupted run


def test_max_restarts_stops_the_requeue_chain(slurm, tiny, tmp_path):
    save, log_dir = str(tmp_path / "corrected"), str(tmp_path / "logs")
    env = job_env(tmp_path, GPUS_PER_NODE="1", TEACHER=tiny["teacher"], DATA=tiny["train"], SAVE_DIR=save,
                  MAX_RESTARTS="0", CONFIG=os.path.join(ROOT, "examples", "tiny_cpu.yaml"))
    job_id = slurm.sbatch(*SUBMIT, os.path.join(ROOT, "slurm", "teacher_correction.sh"),
                          "train.train_iters=100000", f"data.valid_data=[{tiny['valid']}]", "train.eval_interval=0",
                          "model.seq_length=32", "data.global_batch_size=8", "train.progress_bar=false",
                          env=env, cwd=str(tmp_path))
    why = lambda: job_failure(slurm, job_id, str(tmp_path), log_dir)  # noqa: E731
    wait_for(lambda: read_metrics(save) or slurm.job(job_id).get("JobState") not in ("PENDING", "RUNNING"),
             900, "the first training iteration")
    assert read_metrics(save), why()
    # what `--signal=B:USR1@N` does at the limit (slurmctld signals the batch step), without waiting for it
    assert slurm._run("scancel", "--batch", "--signal=USR1", str(job_id)).returncode == 0
    state = slurm.wait_done(job_id, timeout=600)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0" and state["Restarts"] == "0", why()
    batch_out = read(tmp_path / f"minitron-teacher-correction_{job_id}.out")
    assert "not requeueing: 0 restarts reached MAX_RESTARTS=0" in batch_out, why()
    step_log = read(os.path.join(log_dir, str(job_id), "minitron-teacher-correction_r0_node0.log"))
    saved = re.search(r"exit signal received: saved at iteration (\d+)", step_log)
    assert saved, why()  # the steps still saved: a resubmission resumes from there
    assert read(os.path.join(save, "latest")).strip() == f"iter_{int(saved.group(1)):07d}"
