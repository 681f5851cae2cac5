"""slurm/*.sh under a real SLURM (the local cluster of slurm_harness.py), IMAGE=none, tiny CPU configs.

- teacher_correction.sh and prune.sh run to completion; logs land where docs/launch.md says.
- distill_8b.sh: SLURM's own `--signal=B:USR1@300` (the script's header) fires once the job's time limit is
  near; every rank saves, the batch script requeues the job, the next run resumes from the saved iteration
  and finishes (exit 0), and the loss sequence equals an uninterrupted run's.
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


RESUMED_ITERS = 10  # the requeued run's share (train.exit_interval, see below)


def test_time_limit_signal_saves_requeues_resumes_and_matches(slurm, tiny, uninterrupted, tmp_path):
    save, log_dir = str(tmp_path / "distilled"), str(tmp_path / "logs")
    # the job's own copy of the config: the test adds train.exit_interval to it before the requeued run starts
    config = str(tmp_path / "distill.yaml")
    with open(os.path.join(ROOT, "examples", "tiny_cpu_distill.yaml")) as f, open(config, "w") as g:
        g.write(f.read())
    # the first run must still be training when the signal comes (up to ~30 s after the limit changes), on a
    # machine of any speed: it is given all the iterations one epoch holds (see the tiny fixture)
    endless = tiny["iters_per_epoch"] - 2
    assert endless >= 1000
    env = job_env(tmp_path, GPUS_PER_NODE="2", TP="2", MICRO_BATCH="4", TRAIN_ITERS=str(endless),
                  TEACHER=tiny["teacher"], STUDENT=tiny["student"], DATA=tiny["train"], SAVE_DIR=save,
                  CONFIG=config)
    job_id = slurm.sbatch(*SUBMIT, "--time=30", os.path.join(ROOT, "slurm", "distill_8b.sh"),
                          *distill_args(tiny, save, endless), env=env, cwd=str(tmp_path))
    why = lambda: job_failure(slurm, job_id, str(tmp_path), log_dir)  # noqa: E731

    # Once training runs (every rank has its signal handler), shorten the limit so that it ends in 270-330 s:
    # the script's `--signal=B:USR1@300` is then due and slurmctld sends it at its next 30-second check.
    # (Waiting for a short --time set at submission would race the job's start-up on a slow machine.)
    wait_for(lambda: read_metrics(save) or slurm.job(job_id).get("JobState") not in ("PENDING", "RUNNING"),
             900, "the first training iteration")
    assert read_metrics(save), why()
    elapsed = seconds(slurm.job(job_id)["RunTime"])
    assert slurm.scontrol("update", f"JobId={job_id}", f"TimeLimit={(elapsed + 330) // 60}")
    # The batch script requeues the job once the steps have saved. While it waits to start again (until the
    # previous run's credential expires, 10 s here), give it a long limit (or the next run would be signalled
    # at once) and a short remainder: the run stops RESUMED_ITERS iterations after resuming, and exits 0.
    slurm.wait_job(job_id, lambda f: f.get("Restarts") == "1" or f.get("JobState") not in ("PENDING", "RUNNING"),
                   timeout=600, what="the requeue")
    assert slurm.scontrol("update", f"JobId={job_id}", "TimeLimit=30")
    with open(config) as f:
        text = f.read()
    assert "\ntrain:\n" in text
    with open(config, "w") as f:
        f.write(text.replace("\ntrain:\n", f"\ntrain:\n  exit_interval: {RESUMED_ITERS}  # added by the test\n", 1))
    state = slurm.wait_done(job_id, timeout=900)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0" and state["Restarts"] == "1", why()

    batch_out = read(tmp_path / f"minitron-distill-8b_{job_id}.out")  # both runs (--open-mode=append)
    assert batch_out.count("SIGUSR1: the time limit is near") == 1, why()  # scancel spared the batch shell
    assert f"requeueing job {job_id}" in batch_out and f"job {job_id} (restart 1)" in batch_out, why()
    first = read(os.path.join(log_dir, str(job_id), "minitron-distill-8b_r0_node0.log"))
    second = read(os.path.join(log_dir, str(job_id), "minitron-distill-8b_r1_node0.log"))
    saved = re.search(r"exit signal received: saved at iteration (\d+)", first)
    assert saved, first[-4000:]
    stopped = int(saved.group(1))
    assert f"resumed from {save} at iteration {stopped}" in second, second[-4000:]
    final = stopped + RESUMED_ITERS
    assert f"exit_interval={RESUMED_ITERS} reached at iteration {final}" in second, second[-4000:]
    # every rank wrote its shards of the signal checkpoint
    shards = os.listdir(os.path.join(save, f"iter_{stopped:07d}"))
    assert any(s.startswith("__0_") for s in shards) and any(s.startswith("__1_") for s in shards), shards
    assert read(os.path.join(save, "latest")).strip() == f"iter_{final:07d}"
    got = losses(save)
    assert [i for i, _ in got] == list(range(1, final + 1))  # nothing lost, nothing repeated
    # bit-identical to an uninterrupted single-node run's first `final` iterations (constant LR: train_iters
    # is moot); at least 20 of them, which the two-node test (run after this one) compares with
    reference = uninterrupted(max(final, 20))[:final]
    assert got == [(r["iteration"], r["kd_loss"]) for r in reference]


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
    assert slurm.scancel("--batch", "--signal=USR1", str(job_id))
    state = slurm.wait_done(job_id, timeout=600)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0" and state["Restarts"] == "0", why()
    batch_out = read(tmp_path / f"minitron-teacher-correction_{job_id}.out")
    assert "not requeueing: 0 restarts reached MAX_RESTARTS=0" in batch_out, why()
    step_log = read(os.path.join(log_dir, str(job_id), "minitron-teacher-correction_r0_node0.log"))
    saved = re.search(r"exit signal received: saved at iteration (\d+)", step_log)
    assert saved, why()  # the steps still saved: a resubmission resumes from there
    assert read(os.path.join(save, "latest")).strip() == f"iter_{int(saved.group(1)):07d}"
