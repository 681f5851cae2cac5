"""One error path for users: a mistake of theirs or a failure of their environment becomes one line that
names the problem and the fix (exit code 2); a bug of ours keeps its traceback.

What counts as the user's side: ValueError / FileNotFoundError (our own validation raises these with the
fix in the message), malformed YAML, and operating-system failures (disk full, permission denied, a path
that is a file, a read-only filesystem), also when a library wrapped them (torch.distributed.checkpoint
folds a writer's OSError into a CheckpointException's text). ``MINITRON_DEBUG=1`` shows the traceback
anyway.
"""
from __future__ import annotations

import errno
import os
import re
from typing import Optional

DEBUG_ENV = "MINITRON_DEBUG"

# errno -> what the user can do about it
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or point the output at a filesystem with room",
    errno.EDQUOT: "the disk quota is exhausted: free space or point the output elsewhere",
    errno.EACCES: "permission denied: fix the permissions or choose a path you can write",
    errno.EPERM: "operation not permitted: fix the permissions or choose another path",
    errno.EROFS: "the filesystem is read-only: choose a writable path",
    errno.EISDIR: "a directory is in the way where a file is expected: pass the file's path",
    errno.ENOTDIR: "a file is in the way where a directory is expected: choose another path or remove it",
    errno.EEXIST: "the path already exists: choose a new path or remove it first",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`)",
}
# An OSError folded into another exception's text, e.g. "[Errno 28] No space left on device: '/x'".
_WRAPPED_ERRNO = re.compile(r"\[Errno (\d+)\] ([^\n:'\"]+)(?::\s*'([^']*)')?")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False")


def _os_message(code: int, strerror: str, filename: Optional[str]) -> str:
    where = f" ({filename})" if filename else ""
    hint = _OS_HINTS.get(code)
    return f"{strerror}{where}" + (f"; {hint}" if hint else "")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def user_error_message(exc: BaseException) -> Optional[str]:
    """The one-line message for an error on the user's side, or None for an internal bug."""
    try:
        import yaml
        yaml_error = yaml.YAMLError
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        yaml_error = ()
    for e in _chain(exc):
        if isinstance(e, (ValueError, FileNotFoundError)) and not isinstance(e, UnicodeError):
            return str(e)
        if yaml_error and isinstance(e, yaml_error):
            detail = " ".join(str(e).split())
            return f"a YAML file is malformed: {detail}. Fix the syntax at the line shown"
        if isinstance(e, OSError) and e.errno in _OS_HINTS:
            return _os_message(e.errno, e.strerror or str(e), e.filename)
    wrapped = _WRAPPED_ERRNO.search(str(exc))
    if wrapped and int(wrapped.group(1)) in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
        return _os_message(int(wrapped.group(1)), wrapped.group(2).strip(), wrapped.group(3))
    if isinstance(exc, OSError):  # our own wrappers (e.g. a failed checkpoint save) say what happened
        return str(exc)
    return None
