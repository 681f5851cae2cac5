"""launch/*.sh and slurm/*.sh: the commands they assemble, under fake srun / scontrol / scancel / torchrun.

The fakes, first on PATH, write their argv (one argument per line) to $FAKE_LOG/<name>.argv; fake srun then
runs the per-node command it was given (as node 0), like srun does on every node.
"""
import glob
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) + glob.glob(os.path.join(ROOT, "slurm", "*.sh")))

RECORD = 'printf "%s\\n" "$@" > "$FAKE_LOG/$(basename "$0").argv"\n'
FAKES = {
    "torchrun": RECORD + 'env | grep -E "^(PET_SIGNALS_TO_HANDLE|TORCH_ELASTIC_SHUTDOWN_TIMEOUT)=" '
                         '> "$FAKE_LOG/torchrun.env"\n',
    "scontrol": RECORD + 'if [ "$1" = show ]; then printf "node001\\nnode002\\n"; fi\n',
    "scancel": RECORD + 'touch "$FAKE_LOG/signalled"\n',
    # srun: drop its own --options, run the command as node 0; with FAKE_SRUN_WAIT, keep "running" until
    # scancel has signalled the step (as a real step would, after saving)
    "srun": RECORD + 'while [ "${1#-}" != "$1" ]; do shift; done\n'
                     'SLURM_NODEID=0 SLURM_PROCID=0 "$@"\n'
                     'if [ -n "${FAKE_SRUN_WAIT:-}" ]; then\n'
                     '  for i in $(seq 200); do [ -e "$FAKE_LOG/signalled" ] && exit 0; sleep 0.05; done; exit 9\n'
                     'fi\n',
}


@pytest.fixture
def fake_env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in FAKES.items():
        path = bindir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "MASTER_", "TORCH_ELASTIC"))}
    for k in ("GPUS", "NNODES", "NODE_RANK", "CONFIG", "TP", "PP", "IMAGE", "DATA", "SAVE", "LOAD", "SCORES",
              "SCORES_ONLY", "TEACHER", "STUDENT", "SAVE_DIR", "REPO_DIR", "LOG_DIR", "DRY_RUN"):
        keep.pop(k, None)
    keep.update(PATH=f"{bindir}:{os.environ['PATH']}", FAKE_LOG=str(log))
    return keep, log


def slurm_env(env, tmp_path, nodes=2, **extra):
    env = dict(env, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[001-002]", SLURM_NNODES=str(nodes),
               SLURM_SUBMIT_DIR=ROOT, SLURM_GPUS_ON_NODE="8", IMAGE="/images/minitron.sqsh",
               LOG_DIR=str(tmp_path / "logs"))
    env.update(extra)
    return env


def run(script, env, *args, **kw):
    return subprocess.run(["bash", os.path.join(ROOT, script), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, **kw)


def argv(log, name):
    return (log / f"{name}.argv").read_text().splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_scripts_parse_and_are_strict(script):
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    assert "set -euo pipefail" in text
    assert "/home/" not in text and "/lustre" not in text  # no hard-coded site paths
    if "/slurm/" in script and not script.endswith("common.sh"):
        headers = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
        # save-and-requeue needs all three; without append SLURM truncates the .out at every restart
        # (seen under SLURM 22.05, tests/cluster)
        assert "--requeue" in headers and "--open-mode=append" in headers
        assert any(h.startswith("--signal=B:USR1@") for h in headers)


def test_single_node_train_passes_overrides_through(fake_env):
    env, log = fake_env
    proc = run("launch/train.sh", dict(env, GPUS="2", CONFIG="examples/tiny_cpu.yaml"), "train.lr=1e-4", "a.b=c")
    assert proc.returncode == 0, proc.stderr
    cmd = argv(log, "torchrun")
    assert cmd[:3] == ["--nproc-per-node=2", "--standalone", "--nnodes=1"]
    assert cmd[3:] == ["-m", "megatron_minitron.cli", "train", "examples/tiny_cpu.yaml", "train.lr=1e-4", "a.b=c"]
    assert "torchrun" in proc.stderr and "train.lr=1e-4" in proc.stderr  # the command is printed
    assert "SIGUSR1" in (log / "torchrun.env").read_text()


@pytest.mark.parametrize("script,env_extra,needle", [
    ("launch/train.sh", {"CONFIG": "examples/tiny_cpu.yaml"}, "GPUS is not set"),
    ("launch/distill.sh", {"GPUS": "1"}, "CONFIG is not set"),
    ("launch/distill.sh", {"GPUS": "1", "CONFIG": "nope.yaml"}, "does not exist"),
    ("launch/train.sh", {"GPUS": "two", "CONFIG": "examples/tiny_cpu.yaml"}, "positive integer"),
    ("launch/train.sh", {"GPUS": "8", "NNODES": "2", "CONFIG": "examples/tiny_cpu.yaml"}, "MASTER_ADDR is not set"),
    ("launch/convert.sh", {"DIRECTION": "hf-to-mcore", "INPUT": "a"}, "OUTPUT is not set"),
    ("launch/convert.sh", {"DIRECTION": "sideways", "INPUT": "a", "OUTPUT": "b"}, "hf-to-mcore or mcore-to-hf"),
    ("launch/convert.sh", {"DIRECTION": "hf-to-mcore", "INPUT": "a", "OUTPUT": "b", "TP": "2", "GPUS": "4"},
     "exactly TP x PP = 2"),
    ("launch/prune.sh", {"GPUS": "8", "LOAD": "ck", "DATA": "d"}, "SAVE is not set"),
    ("launch/prune.sh", {"GPUS": "8", "LOAD": "ck", "SAVE": "out"}, "DATA (calibration prefix) or SCORES"),
    ("launch/search.sh", {"GPUS": "8"}, "CONFIG is not set"),
    ("launch/eval.sh", {"GPUS": "8"}, "nothing to evaluate"),
])
def test_missing_variables_fail_with_a_message(fake_env, script, env_extra, needle):
    env, log = fake_env
    proc = run(script, dict(env, **env_extra))
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not (log / "torchrun.argv").exists()


def test_convert_and_prune_commands(fake_env):
    env, log = fake_env
    proc = run("launch/convert.sh", dict(env, DIRECTION="mcore-to-hf", INPUT="ck", OUTPUT="hf", TP="2", PP="2"),
               "--family", "llama")
    assert proc.returncode == 0, proc.stderr
    cmd = argv(log, "torchrun")
    assert "--nproc-per-node=4" in cmd
    i = cmd.index("-m")
    assert cmd[i + 2:] == ["convert", "mcore-to-hf", "--input", "ck", "--output", "hf", "--tp", "2", "--pp", "2",
                           "--family", "llama"]
    proc = run("launch/prune.sh", dict(env, GPUS="8", LOAD="ck", DATA="calib", SCORES="s.pt", SAVE="out", TP="2"),
               "--target", "hidden_size=3072")
    assert proc.returncode == 0, proc.stderr
    cmd = argv(log, "torchrun")
    i = cmd.index("-m")
    assert cmd[i + 2:] == ["prune", "--load", "ck", "--tp", "2", "--pp", "1", "--data", "calib", "--scores", "s.pt",
                           "--save", "out", "--target", "hidden_size=3072"]


def test_slurm_distill_8b_assembles_multi_node_torchrun(fake_env, tmp_path):
    env, log = fake_env
    env = slurm_env(env, tmp_path, TEACHER="/ck/teacher", STUDENT="/ck/student", DATA="/data/mix",
                    SAVE_DIR="/ck/out", CONTAINER_MOUNTS="/data:/data")
    proc = run("slurm/distill_8b.sh", env, "train.log_interval=5")
    assert proc.returncode == 0, proc.stderr
    srun = argv(log, "srun")
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    assert "--container-image=/images/minitron.sqsh" in srun
    assert f"--container-mounts={ROOT}:{ROOT},/data:/data" in srun
    assert any(a.startswith(f"--output={tmp_path}/logs/4242/") for a in srun)
    assert srun[-1] == "train.log_interval=5" and os.path.join(ROOT, "launch", "distill.sh") in srun
    cmd = argv(log, "torchrun")
    for expected in ("--nproc-per-node=8", "--nnodes=2", "--node-rank=0", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=node001:29500", "--rdzv-id=4242"):
        assert expected in cmd
    i = cmd.index("-m")
    assert cmd[i + 1:i + 4] == ["megatron_minitron.cli", "distill", os.path.join(ROOT, "examples",
                                                                                   "mn_minitron_8b_distill.yaml")]
    overrides = cmd[i + 4:]
    for expected in ("train.lr=1e-4", "train.min_lr=4.5e-7", "train.lr_warmup_iters=60", "data.global_batch_size=768",
                     "model.seq_length=8192", "parallel.tensor_model_parallel_size=4",
                     "distill.teacher=/ck/teacher", "distill.student=/ck/student", "data.train_data=[/data/mix]",
                     "train.save=/ck/out"):
        assert expected in overrides
    assert overrides[-1] == "train.log_interval=5"  # the user's overrides come last and win
    assert not (log / "scontrol.argv").read_text().startswith("requeue")  # finished: no requeue


def test_slurm_4b_and_teacher_correction(fake_env, tmp_path):
    env, log = fake_env
    env = slurm_env(env, tmp_path, TEACHER="/t", STUDENT="/s", DATA="[0.5,/a,0.5,/b]", SAVE_DIR="/o", TP="4")
    assert run("slurm/distill_4b.sh", env).returncode == 0
    cmd = argv(log, "torchrun")
    for expected in ("train.min_lr=1e-5", "train.lr_warmup_iters=40", "data.global_batch_size=1152",
                     "data.train_data=[0.5,/a,0.5,/b]", "parallel.tensor_model_parallel_size=4"):
        assert expected in cmd
    proc = run("slurm/teacher_correction.sh", env)
    assert proc.returncode == 0, proc.stderr
    cmd = argv(log, "torchrun")
    i = cmd.index("-m")
    assert cmd[i + 2] == "train" and "train.load=/t" in cmd and "train.save=/o" in cmd
    assert "parallel.tensor_model_parallel_size=4" in cmd


@pytest.mark.parametrize("script,missing", [("slurm/distill_8b.sh", "TEACHER"), ("slurm/distill_4b.sh", "STUDENT"),
                                            ("slurm/teacher_correction.sh", "DATA"), ("slurm/prune.sh", "SAVE")])
def test_slurm_missing_variables(fake_env, tmp_path, script, missing):
    env, log = fake_env
    full = dict(TEACHER="/t", STUDENT="/s", DATA="/d", SAVE_DIR="/o", LOAD="/l", SAVE="/p")
    full.pop(missing)
    proc = run(script, slurm_env(env, tmp_path, **full))
    assert proc.returncode != 0 and f"{missing} is not set" in proc.stderr
    assert not (log / "srun.argv").exists()
    proc = run(script, dict(env, TEACHER="/t", STUDENT="/s", DATA="/d", SAVE_DIR="/o", LOAD="/l", SAVE="/p"))
    assert proc.returncode != 0 and "sbatch" in proc.stderr  # not inside a SLURM job


def test_slurm_prune_without_container(fake_env, tmp_path):
    env, log = fake_env
    env = slurm_env(env, tmp_path, nodes=1, IMAGE="none", LOAD="/l", SAVE="/p", DATA="/calib")
    proc = run("slurm/prune.sh", env, "--target", "num_layers=16")
    assert proc.returncode == 0, proc.stderr
    assert not any(a.startswith("--container") for a in argv(log, "srun"))
    cmd = argv(log, "torchrun")
    assert "--standalone" in cmd  # one node
    i = cmd.index("-m")
    assert cmd[i + 2:] == ["prune", "--load", "/l", "--tp", "1", "--pp", "1", "--data", "/calib", "--save", "/p",
                           "--target", "num_layers=16"]


def test_usr1_saves_then_requeues(fake_env, tmp_path):
    env, log = fake_env
    env = slurm_env(env, tmp_path, TEACHER="/t", STUDENT="/s", DATA="/d", SAVE_DIR="/o", FAKE_SRUN_WAIT="1")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "slurm/distill_8b.sh")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log / "torchrun.argv").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (log / "torchrun.argv").exists(), "the step never started"
    proc.send_signal(signal.SIGUSR1)  # what sbatch --signal=B:USR1@300 does
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert argv(log, "scancel") == ["--signal=USR1", "4242"]
    assert argv(log, "scontrol") == ["requeue", "4242"]
    # and not past MAX_RESTARTS
    for f in ("signalled", "torchrun.argv", "scontrol.argv"):
        (log / f).unlink()
    env["SLURM_RESTART_COUNT"], env["MAX_RESTARTS"] = "3", "3"
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "slurm/distill_8b.sh")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (log / "torchrun.argv").exists() and time.time() < deadline + 30:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "MAX_RESTARTS" in err
    assert argv(log, "scontrol")[0] == "show"
