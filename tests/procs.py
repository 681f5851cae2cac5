"""Launching real multi-rank processes on CPU/gloo for the tests (importable as ``procs``; not from ``conftest``,
which names a different module in each test folder that has one)."""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, nproc: int, *args, timeout: int = 600, env: dict | None = None,
             real_torchrun: bool = False) -> str:
    """Run ``script`` on ``nproc`` CPU ranks; fail the test with the output if any rank fails. The ranks are
    forks of one process that imported torch and megatron-core once (tests/fork_ranks.py: the environment
    torchrun gives its workers, the first failure stops the others), ~8 s of imports per rank saved on 2 cores;
    ``real_torchrun=True`` (or MINITRON_TESTS_REAL_TORCHRUN=1 in the environment) launches them with
    ``python -m torch.distributed.run`` instead."""
    if real_torchrun or os.environ.get("MINITRON_TESTS_REAL_TORCHRUN") == "1":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", "--master-addr=127.0.0.1", script, *map(str, args)]
    else:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fork_ranks.py"),
               str(nproc), script, *map(str, args)]
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    full_env.update(env or {})
    # its own session: on a timeout the launcher and every rank under it are killed (a process group)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            import signal
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    out = stdout + stderr
    if proc.returncode != 0:
        pytest.fail(f"torchrun {os.path.basename(script)} x{nproc} failed (rc={proc.returncode}):\n"
                    f"{out[-6000:]}")
    return out


class PreloadedMinitron:
    """`minitron` commands run by tests/cli_server.py: each in a fork of one process that imported torch,
    megatron-core and our modules once, instead of a fresh interpreter that spends ~8 s importing them (see
    that file for what is and is not the same as `python -m megatron_minitron.cli`). `run` returns what
    subprocess.run(..., capture_output=True, text=True, env=env) would; env is the command's whole environment
    (default: the server's). tests/e2e/conftest.py holds one for the session; `close()` stops it."""

    def __init__(self, env: dict, workdir: str):
        self.env = dict(env)
        self.workdir = workdir
        self._count = 0
        self._log = open(os.path.join(workdir, "cli_server.log"), "w")
        self._proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "cli_server.py")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                      env=self.env, cwd=ROOT, start_new_session=True)

    def run(self, *args, env: dict | None = None, cwd: str = ROOT, timeout: float = 600):
        import json
        import select
        import signal

        self._count += 1
        out, err = (os.path.join(self.workdir, f"cmd{self._count}.{k}") for k in ("out", "err"))
        self._proc.stdin.write(json.dumps({"argv": list(args), "env": dict(self.env if env is None else env),
                                           "cwd": str(cwd), "stdout": out, "stderr": err}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:  # timed out, or the server died: stop it and every command it runs (one session)
            alive = self._proc.poll() is None
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
            if alive:
                raise subprocess.TimeoutExpired(["minitron", *args], timeout)
            self._log.flush()
            with open(self._log.name) as f:
                raise RuntimeError(f"tests/cli_server.py exited ({self._proc.returncode}):\n{f.read()[-3000:]}")
        with open(out) as f, open(err) as g:
            stdout, stderr = f.read(), g.read()
        return subprocess.CompletedProcess(["minitron", *args], json.loads(line)["returncode"], stdout, stderr)

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                import signal
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._log.close()
