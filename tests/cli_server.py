"""Runs `minitron` commands for the tests in forked children of one process that has imported torch,
megatron-core and every subcommand's modules once (tests/procs.py's PreloadedMinitron drives it).

Why: on a 2-core CI machine each `python -m megatron_minitron.cli ...` spends ~8 s importing before it does
anything; a test that runs ten commands spends most of its time there. Each command still runs in a process
of its own (a fork: its own memory, process group membership, torch.distributed state, exit status), through
the same `megatron_minitron.cli.main(argv)` that `python -m megatron_minitron.cli` runs, with the environment,
working directory, stdin (/dev/null), stdout and stderr files the client asks for; the exit status is what
`sys.exit(main())` gives (argparse's SystemExit codes, 1 and a traceback for an uncaught exception).
What differs from a fresh interpreter: output printed while *importing* (import-time library warnings) went
to this server's log, and environment variables read at import time were read from the server's environment.
Tests that check either use real processes.

Protocol: one JSON request per line on stdin ({"argv", "env", "cwd", "stdout", "stderr"}), one JSON reply per
line on stdout ({"returncode"}). Not a test module (pytest collects test_*.py only)."""
import atexit
import importlib
import json
import os
import sys
import traceback

# what `minitron <subcommand>` imports on its way to work (cli.build_parser imports the subcommand modules;
# these are what their handlers import when they run)
PRELOAD = ("torch", "megatron.core", "megatron.core.models.gpt", "megatron.core.dist_checkpointing",
           "megatron.core.optimizer", "megatron.core.pipeline_parallel", "megatron.core.datasets.gpt_dataset",
           "megatron_minitron.cli", "megatron_minitron.train.loop", "megatron_minitron.distill.job",
           "megatron_minitron.prune", "megatron_minitron.eval.job", "megatron_minitron.checkpoint",
           "megatron_minitron.data", "megatron_minitron.model.builder")


def exit_code(exc: SystemExit) -> int:
    """What the interpreter exits with for an uncaught SystemExit (it prints a non-int, non-None code)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_child(request: dict) -> int:
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(path, flags, 0o644)
        os.dup2(new, fd)
        os.close(new)
    from megatron_minitron import cli

    sys.argv = [cli.__file__, *request["argv"]]
    try:
        return exit_code(SystemExit(cli.main(request["argv"])))
    except SystemExit as exc:
        return exit_code(exc)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


def serve() -> None:
    for module in PRELOAD:
        importlib.import_module(module)
    from megatron_minitron import cli

    cli.build_parser()
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        reply.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = run_child(request)
            # the interpreter's exit minus tearing down every module (~2 s of copy-on-write faults here):
            # atexit handlers (weakref.finalize's included), then flushed output
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()
    os._exit(0)  # stdin closed: done (skipping ~2 s of module teardown; nothing here needs it)


if __name__ == "__main__":
    serve()
