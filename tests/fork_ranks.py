"""`python tests/fork_ranks.py NPROC SCRIPT [ARGS...]` (or `NPROC -m MODULE [ARGS...]`): run SCRIPT (MODULE) on
NPROC CPU ranks as torchrun would for the
tests' worker scripts, but each rank a fork of this process after it imported torch and megatron-core once
(tests/procs.py's torchrun uses it; on 2 CPU cores every rank otherwise spends ~8 s importing them, and the
torchrun agent ~3 s more).

Each rank is a process of its own with the environment torchrun gives a single-node worker (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK, ROLE_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_RESTART_COUNT / MAX_RESTARTS / RUN_ID); rank 0 hosts the env:// rendezvous store, as it does without
torchrun's agent store. SCRIPT runs as `__main__` with sys.argv and sys.path[0] as `python SCRIPT ARGS` sets them;
the ranks write to this process's stdout and stderr. As with torchrun, the first rank to fail makes the others
stop (SIGTERM, then SIGKILL after 30 s) and the exit status is non-zero.
Not for tests of torchrun itself (signals through its agent, rendezvous): those launch torchrun.
"""
import atexit
import os
import runpy
import signal
import socket
import sys
import time
import traceback

PRELOAD = ("torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
           "megatron.core.dist_checkpointing", "megatron.core.optimizer", "megatron.core.pipeline_parallel",
           "megatron.core.tensor_parallel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, nproc: int, port: int, script: str, args: list) -> int:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
                      ROLE_NAME="default", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID="none")
    try:
        if script == "-m":  # as `python -m MODULE ARGS`: sys.argv[0] becomes the module's file, sys.path[0] the cwd
            sys.argv = [script, *args[1:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(args[0], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [script, *args]
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


def main() -> int:
    nproc, script, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    ranks = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            code = run_rank(rank, nproc, port, script, args)
            # the interpreter's exit minus tearing down every module (~2 s of copy-on-write faults): atexit
            # handlers (weakref.finalize's included), then flushed output
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        ranks[pid] = rank
    failed = None
    while ranks:
        pid, status = os.wait()
        rank = ranks.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and failed is None:
            failed = (rank, code)
            print(f"fork_ranks: rank {rank} exited with {code}; stopping the others", file=sys.stderr, flush=True)
            for other in ranks:
                os.kill(other, signal.SIGTERM)
            deadline = time.time() + 30
            while ranks and time.time() < deadline:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid:
                    ranks.pop(pid, None)
                else:
                    time.sleep(0.1)
            for other in ranks:
                os.kill(other, signal.SIGKILL)
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
