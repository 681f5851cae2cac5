"""The one durable small-file write: temporary file + fsync + rename + fsync of the directory, so a reader
(or a crash) sees the old file or the new one, never half of either. Every plan, summary, scores file,
report and results file goes through here; checkpoint directories use checkpoint/layout.py on top of it."""
from __future__ import annotations

import json
import os
from typing import IO, Callable


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, write: Callable[[IO], None], binary: bool = False,
                  make_parents: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path``, then fsync, rename onto ``path`` and fsync the
    directory: a reader, or a crash, sees the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    if make_parents:
        os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.writing-{os.getpid()}"  # per process: two writers never share a temporary file
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(directory)


def write_file_durably(path: str, text: str, make_parents: bool = False) -> None:
    """Write ``text`` to ``path`` atomically and durably (see the module docstring)."""
    write_durably(path, lambda f: f.write(text), make_parents=make_parents)


def write_json_durably(path: str, obj, make_parents: bool = False, indent: int = 2) -> None:
    write_file_durably(path, json.dumps(obj, indent=indent) + "\n", make_parents)


def write_yaml_durably(path: str, obj, make_parents: bool = False) -> None:
    import yaml

    write_file_durably(path, yaml.safe_dump(obj, sort_keys=False), make_parents)
