"""Checkpoint directory layout and the filesystem half of an atomic save. No torch.distributed here: every
function is plain file handling, called by rank 0 (saves) or by every rank (reads).

    ROOT/
      iter_0000100/          committed checkpoint: dist-ckpt files, minitron.yaml, COMMIT
      iter_0000200/
      latest                 text file naming the newest committed directory ("iter_0000200")
      .tmp.iter_0000300/     a save in progress, or one that crashed: never loaded, wiped by the next save
      .old.iter_0000200/     the previous copy while iter_0000200 is being replaced (crash window only)

An exact-directory save (``save_checkpoint_to(OUT)``) uses ``OUT.tmp`` and ``OUT.old`` the same way.
A directory is a checkpoint only once its COMMIT marker exists; COMMIT is written last, after everything
else in it has been fsynced, and the directory only gets its final name after that.

A root in Megatron-LM's layout (format="megatron-lm", see megatron_lm.py) is the same with Megatron-LM's
tracker file ``latest_checkpointed_iteration.txt`` ("200" or "release") in place of ``latest``, and a
``release`` directory for weights-only saves. Our saves into it still write COMMIT and minitron.yaml into
the iteration directory (Megatron-LM ignores files it does not know). A Megatron-LM-written directory has
no COMMIT: it counts as complete when metadata.json, torch's .metadata and the common state are all there
(common.pt; megatron-core >= 0.19 keeps it inside the shards instead, listed in .metadata).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from ..runtime.files import fsync_path, write_file_durably  # noqa: F401 (re-exported: layout's users)

ITER_PREFIX = "iter_"
STAGING_PREFIX = ".tmp."
ASIDE_PREFIX = ".old."
TRASH_PREFIX = ".trash."
COMMIT_FILE = "COMMIT"
LATEST_FILE = "latest"
METADATA_FILE = "minitron.yaml"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's pointer
RELEASE_DIR = "release"  # Megatron-LM's name for weights to start a run from (tracker "release")
COMMON_FILE = "common.pt"  # megatron-core dist checkpoint: the non-sharded part
DIST_CONFIG_FILE = "metadata.json"  # megatron-core dist checkpoint: its strategy record
DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of the shards
CRASH_ENV = "MINITRON_TEST_CRASH_AT"  # test hook: die at a named point of a save
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def crash_point(name: str) -> None:
    """Kill the process here when the test hook names this point (simulates a node dying mid-save)."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(86)


def iter_dir_name(iteration: int) -> str:
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return f"{ITER_PREFIX}{iteration:07d}"


def parse_iter_dir_name(name: str) -> Optional[int]:
    match = _ITER_RE.match(name)
    return int(match.group(1)) if match else None


def is_committed(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, COMMIT_FILE))


def has_inline_common_state(directory: str) -> bool:
    """megatron-core >= 0.19 writes no common.pt: the non-tensor state is the ``common_state`` object inside
    the torch_dist shards, listed in torch's .metadata index."""
    import pickle

    try:
        with open(os.path.join(directory, DCP_METADATA_FILE), "rb") as f:
            index = pickle.load(f)
    except Exception:  # absent, empty or foreign: no inline common state
        return False
    return any(str(key).startswith("common_state/") for key in (getattr(index, "state_dict_metadata", None) or {}))


def installed_megatron_core() -> Optional[str]:
    """The version of the megatron-core that imports (its package_info: right for a source tree on the path
    too); None when there is none."""
    try:
        from megatron.core import package_info
        return str(package_info.__version__)
    except ImportError:
        return None


def check_readable_by_installed_core(directory: str) -> None:
    """A checkpoint written by megatron-core >= 0.19 keeps its common state inside the shards (no common.pt),
    which older megatron-core cannot read (it fails on the missing file with an unrelated traceback)."""
    if os.path.exists(os.path.join(directory, COMMON_FILE)) or not has_inline_common_state(directory):
        return
    from packaging.version import Version

    installed = installed_megatron_core()
    if installed is not None and Version(installed) < Version("0.19"):
        raise ValueError(f"checkpoint {directory} was written by megatron-core >= 0.19 (its common state is "
                         f"inside the torch_dist shards; there is no {COMMON_FILE}), which megatron-core "
                         f"{installed} cannot read: install megatron-core >= 0.19 (Python >= 3.12) to load it")


def is_megatron_lm_dir(directory: str) -> bool:
    """A complete megatron-core dist checkpoint directory: metadata.json, torch's index and the common state
    (common.pt, or inside the shards as megatron-core >= 0.19 writes it); or a legacy ``--ckpt-format torch``
    one (megatron_lm_torch.py: an mp_rank_* file per model-parallel rank)."""
    from .megatron_lm_torch import is_torch_format_dir

    if is_torch_format_dir(directory):
        return True
    if not all(os.path.isfile(os.path.join(directory, name)) for name in (DIST_CONFIG_FILE, DCP_METADATA_FILE)):
        return False
    return os.path.isfile(os.path.join(directory, COMMON_FILE)) or has_inline_common_state(directory)


def is_loadable(directory: str) -> bool:
    """Ours committed, or a complete Megatron-LM-written directory (which has no COMMIT and no minitron.yaml;
    one of ours without COMMIT is a save that did not finish)."""
    if is_committed(directory):
        return True
    return is_megatron_lm_dir(directory) and not os.path.exists(os.path.join(directory, METADATA_FILE))


def tracker_path(root: str) -> str:
    return os.path.join(root, TRACKER_FILE)


def read_tracker(root: str) -> Optional[str]:
    """The directory ROOT's Megatron-LM tracker names ("iter_0000100" or "release"); None without one."""
    path = tracker_path(root)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if text == RELEASE_DIR:
        return RELEASE_DIR
    try:
        iteration = int(text)
    except ValueError:
        iteration = -1
    if iteration < 0:
        raise ValueError(f"{path} is corrupt: it holds {text[:80]!r}, not an iteration number or 'release'. "
                         f"Write the iteration of a complete iter_* directory into it (e.g. `echo 100 > {path}`)")
    return iter_dir_name(iteration)


def write_tracker(root: str, dir_name: str) -> None:
    """Point ROOT's tracker at ``dir_name`` atomically (temp + fsync + rename): the last step of a save."""
    iteration = parse_iter_dir_name(dir_name)
    assert dir_name == RELEASE_DIR or iteration is not None, dir_name
    write_file_durably(tracker_path(root), RELEASE_DIR if iteration is None else str(iteration))


def read_pointer(root: str) -> Optional[str]:
    """The directory name ROOT's pointer holds: our `latest`, else Megatron-LM's tracker."""
    name = read_latest(root)
    return name if name is not None else read_tracker(root)


@dataclass(frozen=True)
class SavePaths:
    final: str  # where the committed checkpoint ends up
    staging: str  # where all ranks write
    aside: str  # where an existing `final` waits while it is being replaced
    root: Optional[str]  # the checkpoint root (latest + purge); None for exact-directory saves
    pointer: str = LATEST_FILE  # the pointer file the save updates in `root`: LATEST_FILE or TRACKER_FILE
    retire: Optional[str] = None  # a directory a rewrite deletes once the pointer names `final` (prune --in-place)


def iteration_paths(root: str, iteration: int) -> SavePaths:
    root = os.path.abspath(root)
    name = iter_dir_name(iteration)
    return SavePaths(final=os.path.join(root, name), staging=os.path.join(root, STAGING_PREFIX + name),
                     aside=os.path.join(root, ASIDE_PREFIX + name), root=root)


def named_paths(root: str, name: str, pointer: str = LATEST_FILE, retire: Optional[str] = None) -> SavePaths:
    """Paths for ROOT/<name> (an iter_* or Megatron-LM's `release` directory)."""
    root = os.path.abspath(root)
    return SavePaths(final=os.path.join(root, name), staging=os.path.join(root, STAGING_PREFIX + name),
                     aside=os.path.join(root, ASIDE_PREFIX + name), root=root, pointer=pointer, retire=retire)


def write_pointer(paths: SavePaths) -> None:
    name = os.path.basename(paths.final)
    if paths.pointer == TRACKER_FILE:
        write_tracker(paths.root, name)
    else:
        write_latest(paths.root, name)


def exact_paths(directory: str) -> SavePaths:
    directory = os.path.abspath(directory.rstrip(os.sep) or directory)
    return SavePaths(final=directory, staging=directory + ".tmp", aside=directory + ".old", root=None)


def _aside_candidates(path: str) -> list:
    parent, name = os.path.split(os.path.abspath(path))
    return [os.path.join(parent, ASIDE_PREFIX + name), os.path.abspath(path) + ".old"]


# ------------------------------------------------------------------------------------------ durability
def fsync_tree(directory: str) -> None:
    """fsync every file and directory below ``directory`` (inclusive), children first."""
    for dirpath, _, filenames in os.walk(directory, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def remove_tree(path: str) -> None:
    """Delete a directory so that a crash midway never leaves a half-deleted one under a loadable name."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    trash = os.path.join(parent, TRASH_PREFIX + name.lstrip("."))
    if os.path.exists(trash):
        shutil.rmtree(trash)
    os.rename(path, trash)
    fsync_path(parent)
    shutil.rmtree(trash)


# ------------------------------------------------------------------------------------------ the `latest` pointer
def read_latest(root: str) -> Optional[str]:
    """The directory name in ROOT/latest, or None when there is no such file."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    if parse_iter_dir_name(name) is None:
        raise ValueError(f"{path} is corrupt: it holds {name[:80]!r}, not a name like iter_0000100. "
                         f"Write the name of a committed directory into it, e.g. "
                         f"`echo {_suggest(root)} > {path}`")
    return name


def write_latest(root: str, name: str) -> None:
    write_file_durably(os.path.join(root, LATEST_FILE), name + "\n")


def committed_iterations(root: str) -> list:
    """Iterations of the committed iter_* directories under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        iteration = parse_iter_dir_name(name)
        if iteration is not None and is_loadable(os.path.join(root, name)):
            found.append(iteration)
    return sorted(found)


def _suggest(root: str) -> str:
    committed = committed_iterations(root)
    return iter_dir_name(committed[-1]) if committed else "iter_0000100"


def _committed_or_aside(directory: str) -> Optional[str]:
    """``directory`` if committed; else its committed aside copy (a replace interrupted by a crash)."""
    if is_loadable(directory):
        return directory
    if not os.path.exists(directory):
        for aside in _aside_candidates(directory):
            if is_committed(aside):
                return aside
    return None


def latest_iteration(root: str) -> Optional[int]:
    """The iteration ROOT's pointer (`latest`, else Megatron-LM's tracker) names, or None when ``root`` or
    the pointer does not exist, or the tracker says "release" (weights to start from, never resumed).

    Raises ValueError when the pointer names a directory that is missing or not committed (starting over
    silently would overwrite the run's progress).
    """
    if not os.path.isdir(root):
        return None
    name = read_pointer(root)
    if name is None:
        return None
    _resolve_latest(root, name)
    return parse_iter_dir_name(name)


def _pointer_file(root: str) -> str:
    return os.path.join(root, LATEST_FILE if os.path.isfile(os.path.join(root, LATEST_FILE)) else TRACKER_FILE)


def _resolve_latest(root: str, name: str) -> str:
    found = _committed_or_aside(os.path.join(root, name))
    if found is None:
        committed = [iter_dir_name(i) for i in committed_iterations(root)]
        pointer = _pointer_file(root)
        raise ValueError(
            f"{pointer} names {name}, which is missing or incomplete (no {COMMIT_FILE} marker of ours, and not "
            f"a complete Megatron-LM directory with {DIST_CONFIG_FILE}, {DCP_METADATA_FILE} and its common state"
            f" ({COMMON_FILE}, or inside the shards since megatron-core 0.19)): "
            f"its save did not finish. Complete checkpoints here: {committed or 'none'}. Point the pointer at "
            f"one of them or pass that directory directly.")
    return found


def resolve_checkpoint_dir(path: str) -> str:
    """The loadable checkpoint directory that ``path`` means: a ROOT (follows ``latest``, or Megatron-LM's
    ``latest_checkpointed_iteration.txt``) or a checkpoint directory itself (ours: iter_* or an
    exact-directory save; Megatron-LM's: iter_* or release). Raises FileNotFoundError / ValueError with the fix."""
    if not path:
        raise ValueError("no checkpoint path given")
    path = os.path.abspath(path)
    if not os.path.exists(path):
        found = _committed_or_aside(path)
        if found is not None:
            return found
        raise FileNotFoundError(f"checkpoint path {path} does not exist; check the path (a checkpoint root "
                                f"with a `latest` or {TRACKER_FILE} file, or a checkpoint directory)")
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path} is a file; pass a checkpoint root or checkpoint directory")
    if is_loadable(path):
        return path
    name = read_pointer(path)
    if name is not None:
        return _resolve_latest(path, name)
    committed = committed_iterations(path)
    if committed:
        newest = iter_dir_name(committed[-1])
        raise FileNotFoundError(
            f"{path} has no `latest` file (nor Megatron-LM's {TRACKER_FILE}) but holds checkpoints "
            f"{[iter_dir_name(i) for i in committed]}; pass one directly (e.g. {os.path.join(path, newest)})")
    if os.path.exists(os.path.join(path, METADATA_FILE)):
        raise ValueError(f"{path} has no {COMMIT_FILE} marker: the megatron-minitron save that wrote it did not "
                         f"finish, so it is not loadable. Load the previous checkpoint (the root's pointer) "
                         f"instead and save again.")
    present = [n for n in (COMMON_FILE, DIST_CONFIG_FILE, DCP_METADATA_FILE) if os.path.exists(os.path.join(path, n))]
    if present:
        missing = [n for n in (COMMON_FILE, DIST_CONFIG_FILE, DCP_METADATA_FILE) if n not in present]
        raise ValueError(f"{path} looks like a megatron-core dist checkpoint but lacks {missing} (it has "
                         f"{present}): its save did not finish or files were lost; use another iteration")
    raise FileNotFoundError(
        f"{path} is not a checkpoint. Looked for megatron-minitron's ({COMMIT_FILE} marker and {METADATA_FILE} "
        f"in a checkpoint directory, or a `latest` file in a root) and Megatron-LM's ({TRACKER_FILE} in a "
        f"root; {COMMON_FILE} + {DIST_CONFIG_FILE} + {DCP_METADATA_FILE}, or --ckpt-format torch's "
        f"mp_rank_*/model_optim_rng.pt, in an iter_*/release directory); found none. Pass a checkpoint root "
        f"or a checkpoint directory.")


def looks_like_checkpoint(directory: str) -> bool:
    """Whether an existing directory may be replaced by an exact-directory save: a (possibly unfinished)
    checkpoint directory of ours. (A Megatron-LM root is written into, never replaced: is_megatron_lm_root.)"""
    return is_committed(directory) or os.path.exists(os.path.join(directory, METADATA_FILE))


def is_megatron_lm_root(directory: str) -> bool:
    return os.path.isfile(tracker_path(directory))


# ------------------------------------------------------------------------------------------ save steps
def prepare_staging(paths: SavePaths) -> None:
    """Rank 0, before any rank writes: finish an interrupted replace, wipe a stale staging dir, create it."""
    os.makedirs(os.path.dirname(paths.staging), exist_ok=True)
    if os.path.exists(paths.aside):
        if is_committed(paths.final):
            remove_tree(paths.aside)
        elif not os.path.exists(paths.final) and is_committed(paths.aside):
            os.rename(paths.aside, paths.final)  # put the previous copy back under its name
            fsync_path(os.path.dirname(paths.final))
    if os.path.exists(paths.staging):
        shutil.rmtree(paths.staging)
    os.makedirs(paths.staging)


def commit_staged(paths: SavePaths, commit_text: str) -> None:
    """Rank 0, after every rank finished writing into ``paths.staging`` (and the metadata is in it): fsync,
    mark COMMIT, and move it to ``paths.final``, replacing an existing checkpoint there without a window in
    which neither copy is loadable (the old one sits at ``paths.aside`` meanwhile)."""
    fsync_tree(paths.staging)
    with open(os.path.join(paths.staging, COMMIT_FILE), "w") as f:
        f.write(commit_text)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(paths.staging)
    crash_point("before_rename")
    parent = os.path.dirname(paths.final)
    if os.path.exists(paths.final):
        if os.path.exists(paths.aside):
            shutil.rmtree(paths.aside)
        os.rename(paths.final, paths.aside)
        fsync_path(parent)
        crash_point("after_aside")
        os.rename(paths.staging, paths.final)
        fsync_path(parent)
        shutil.rmtree(paths.aside)
    else:
        os.rename(paths.staging, paths.final)
        fsync_path(parent)


def purge(root: str, keep_last: Optional[int]) -> list:
    """Delete committed iter_* directories beyond the newest ``keep_last`` (the one `latest` names is always
    kept) and leftovers of crashed saves. Returns the removed paths. Call only after `latest` is updated."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), got {keep_last}")
    removed = []
    _recover_asides(root)
    latest = read_pointer(root)
    keep = set()
    # only directories we committed: a Megatron-LM-written iteration in the same root is never deleted
    committed = [i for i in committed_iterations(root) if is_committed(os.path.join(root, iter_dir_name(i)))]
    if keep_last is not None:
        keep.update(committed[-keep_last:])
    else:
        keep.update(committed)
    if latest is not None:
        keep.add(parse_iter_dir_name(latest))
    for iteration in committed:
        if iteration not in keep:
            path = os.path.join(root, iter_dir_name(iteration))
            remove_tree(path)
            removed.append(path)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        stale = name.startswith(TRASH_PREFIX) or name.startswith(STAGING_PREFIX)
        if stale and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _recover_asides(root: str) -> None:
    """Finish replaces interrupted by a crash: drop an aside copy whose replacement is committed, or move
    it back under its name when the replacement never arrived."""
    for name in os.listdir(root):
        if not name.startswith(ASIDE_PREFIX):
            continue
        aside = os.path.join(root, name)
        final = os.path.join(root, name[len(ASIDE_PREFIX):])
        if is_committed(final):
            shutil.rmtree(aside)
        elif not os.path.exists(final) and is_committed(aside):
            os.rename(aside, final)
            fsync_path(root)
