"""One writer per output: an OS advisory lock (``flock``) that dies with its process.

A training root is locked for the whole run (``ROOT/.minitron.lock``); an exact-directory output such as
``prune --save OUT`` is locked through a sibling file (``OUT.lock``), because OUT itself is replaced by a
rename. A second writer (another process) fails at once with a message naming the holder (host, pid, command, start
time); jobs within one process share the lock.
The lock is released by the kernel when its process exits, however it exits, so a crash never leaves a
stale lock and resuming after one is unaffected. Taken on rank 0 only: the other ranks write shards into
directories rank 0 prepared under it.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
import sys
from typing import Optional

ROOT_LOCK_NAME = ".minitron.lock"
# Locks this process holds: path -> (fd, holders). flock conflicts between open files even within one
# process; jobs of one process (demo, search, tests that resume in-process) share theirs instead.
_HELD: dict = {}


def is_lock_file(name: str) -> bool:
    """Whether a directory entry is one of these lock files (left behind by design; never a checkpoint)."""
    return name == ROOT_LOCK_NAME or name.endswith(".lock")


def lock_path_for(target: str, is_root: bool) -> str:
    target = os.path.abspath(target.rstrip(os.sep) or target)
    return os.path.join(target, ROOT_LOCK_NAME) if is_root else target + ".lock"


class OutputLock:
    """``with OutputLock(path, is_root=True): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, target: str, is_root: bool, what: str = "output"):
        self.path = lock_path_for(target, is_root)
        self.target = target
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        if self._fd is not None:
            return self
        if self.path in _HELD:  # this process holds it already (e.g. a resume built while a run object lives)
            fd, count = _HELD[self.path]
            _HELD[self.path] = (fd, count + 1)
            self._fd = fd
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "holder unknown"
            os.close(fd)
            raise ValueError(f"{self.what} {self.target} is being written by another job ({holder}); two "
                             f"writers would overwrite each other's checkpoints. Wait for it to finish, stop it, "
                             f"or choose another {self.what}") from None
        os.ftruncate(fd, 0)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {stamp}: {command}\n".encode())
        os.fsync(fd)
        self._fd = fd
        _HELD[self.path] = (fd, 1)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, count = _HELD.pop(self.path, (self._fd, 1))
        if count > 1:
            _HELD[self.path] = (fd, count - 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._fd = None

    def __del__(self) -> None:  # a job object dropped in a long-lived process (demo, search, tests)
        self.release()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 1000).decode(errors="replace").strip()
    except OSError:
        return ""


def lock_output_on_rank0(target: str, is_root: bool, what: str) -> Optional[OutputLock]:
    """Rank 0 takes the lock; every rank returns, or raises the holder's message, together. Keep the returned
    object alive for as long as the job writes (the lock is released when it is collected or the process ends).
    Only rank 0 holds a lock object (other ranks get None): a lock is a file descriptor of this process, so
    only the outcome is shared."""
    from ..runtime.collectives import run_on_rank0

    held = []  # rank 0's lock, kept here: it never leaves this process

    def take():
        try:
            held.append(OutputLock(target, is_root, what).acquire())
        except ValueError as e:  # another job writes there: every rank raises its message as it is
            return str(e)
        return None

    refusal = run_on_rank0(take, f"locking {what} {target}", error=OSError)
    if refusal is not None:
        raise ValueError(refusal)
    return held[0] if held else None
