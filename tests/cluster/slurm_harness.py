"""A throwaway one-node SLURM cluster on this machine: munged, slurmctld and slurmd started by the tests, with
their own key, socket, ports, state and spool under one temporary directory, and stopped again (only the
processes started here are killed). Needs Debian 12's slurmd, slurmctld, slurm-client (22.05; munge) and root.

Choices a real site would not make, each because of this sandbox (no systemd, no cgroups, 2 CPUs):
- ProctrackType=proctrack/linuxproc (a step's processes are found by parentage; sites use proctrack/cgroup,
  which also reaches every process of the step) and TaskPlugin=task/none.
- AuthInfo cred_expire=10: a requeued job may start only after the previous run's credential has expired
  (120 s by default), so requeue round trips take ~10 s here instead of ~2 min.
- SchedulerParameters=sched_interval=1: pending jobs are looked at every second instead of every minute.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
DEBIAN_PACKAGES = "slurmd slurmctld slurm-client"  # what .ci/run installs (munge comes with them)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def unavailable_reason() -> str | None:
    """Why a local cluster cannot be started here (None if it can)."""
    missing = missing_binaries()
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found): "
                f"`apt-get install {DEBIAN_PACKAGES}` as root (Debian 12: SLURM 22.05 and munge)")
    if os.geteuid() != 0:
        return "a local slurmd must run as root to launch jobs (run the cluster tests as root)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie, which nobody may reap here, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def node_line() -> str:
    """This host as slurmd sees it (`slurmd -C`): NodeName, CPUs, sockets, cores, threads, RealMemory."""
    out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True, timeout=60).stdout
    line = next(l for l in out.splitlines() if l.startswith("NodeName="))
    # the configured memory may be lower than the real one, never higher (the node would be drained)
    return re.sub(r"RealMemory=(\d+)", lambda m: f"RealMemory={int(m.group(1)) * 9 // 10}", line)


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env()` is the environment for sbatch/scontrol calls."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_dir: str | None = None
        self.munge_socket = ""
        self._procs: dict[str, subprocess.Popen] = {}
        self._munged_pid: int | None = None
        self.node_name: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60) -> "LocalSlurm":
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        # munged insists that every directory above its socket is searchable by all, which pytest's
        # private temporary directories are not: the key, socket and seed live in their own /tmp directory
        self.munge_dir = tempfile.mkdtemp(prefix="minitron-munge-", dir="/tmp")
        os.chmod(self.munge_dir, 0o755)
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
        self._start_munged()
        line = node_line()
        self.node_name = line.split()[0].split("=", 1)[1]
        with open(self.conf, "w") as f:
            f.write(self._config(line))
        log = os.path.join(self.root, "log")
        self._procs["slurmctld"] = subprocess.Popen(
            [_binary("slurmctld"), "-D", "-i", "-f", self.conf], env=self.env(),
            stdout=open(os.path.join(log, "slurmctld.out"), "w"), stderr=subprocess.STDOUT)
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld to answer")
        self._procs["slurmd"] = subprocess.Popen(
            [_binary("slurmd"), "-D", "-f", self.conf], env=self.env(),
            stdout=open(os.path.join(log, "slurmd.out"), "w"), stderr=subprocess.STDOUT)
        self._wait(lambda: self.node_state().startswith("IDLE"), timeout, f"node {self.node_name} to be IDLE")
        return self

    def stop(self) -> None:
        """Cancel this cluster's jobs, let their steps end, then stop the daemons started here."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._run("scancel", "--full", "--user=root")
            deadline = time.time() + 30
            while time.time() < deadline and self._run("squeue", "-h").stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld"):
            proc = self._procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=20)
        if self._munged_pid is not None:
            try:
                os.kill(self._munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            # munged writes its seed file on the way out: wait, or it recreates what rmtree removes
            deadline = time.time() + 20
            while time.time() < deadline and _alive(self._munged_pid):
                time.sleep(0.1)
            self._munged_pid = None
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    def logs(self) -> str:
        """The daemons' own logs (for a failing test's message)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {name}\n" + f.read()[-4000:])
        return "\n".join(parts)

    # ------------------------------------------------------------------ client side
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":
                env.pop(key)  # a test run inside a real allocation must not leak it into ours
        return env

    def _run(self, *cmd, env=None, cwd=None, timeout=60):
        return subprocess.run([_binary(cmd[0]), *cmd[1:]], env=self.env(env), cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)

    def sbatch(self, *args, env: dict | None = None, cwd: str | None = None) -> int:
        proc = self._run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def scontrol(self, *args) -> bool:
        return self._run("scontrol", *args).returncode == 0

    def scancel(self, *args) -> bool:
        return self._run("scancel", *args).returncode == 0

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        proc = self._run("scontrol", "show", "job", "-o", str(job_id))
        if proc.returncode != 0:
            return {}
        fields = {}
        for token in proc.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: int, until, timeout: float, what: str) -> dict:
        """Poll the job until `until(fields)` holds; raise with the job's fields and daemon logs otherwise."""
        deadline = time.time() + timeout
        fields = {}
        while time.time() < deadline:
            fields = self.job(job_id)
            if until(fields):
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id}: {what} not reached in {timeout:.0f} s; last state {fields}\n"
                           + self.logs())

    def wait_done(self, job_id: int, timeout: float) -> dict:
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED")
        return self.wait_job(job_id, lambda f: f.get("JobState") in final, timeout, "a final state")

    def node_state(self) -> str:
        proc = self._run("scontrol", "show", "node", "-o", self.node_name or "")
        match = re.search(r"State=(\S+)", proc.stdout)
        return match.group(1) if match else ""

    # ------------------------------------------------------------------ internals
    def _start_munged(self) -> None:
        key = os.path.join(self.munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        pid_file = os.path.join(self.munge_dir, "munged.pid")
        proc = subprocess.run([_binary("munged"), f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={pid_file}", f"--seed-file={os.path.join(self.munge_dir, 'seed')}",
                               f"--log-file={os.path.join(self.root, 'log', 'munged.log')}"],
                              capture_output=True, text=True, timeout=30)  # daemonizes once its socket is up
        if proc.returncode != 0:
            raise RuntimeError(f"munged failed (exit {proc.returncode}): {proc.stderr.strip()}")
        with open(pid_file) as f:
            self._munged_pid = int(f.read().strip())

    def _config(self, node_line: str) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=minitrontest",
            f"SlurmctldHost={node_line.split()[0].split('=', 1)[1]}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=1",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "MailProg=/bin/true",
            "ReturnToService=2", "KillWait=30", "SlurmctldDebug=info", "SlurmdDebug=info",
            f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _wait(self, ready, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"waited {timeout} s for {what}\n" + self.logs())
