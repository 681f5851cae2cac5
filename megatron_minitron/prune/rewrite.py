"""`prune --in-place`: replace the source checkpoint by the pruned one so that a crash at any moment leaves a
loadable checkpoint (the source or the pruned one, each with its own metadata) under the source's name.

It uses the checkpoint module's names for a replace in progress, so every loader already knows how to read an
interrupted one (``checkpoint.resolve_checkpoint_dir`` falls back to the aside copy when the name is missing):

    exact directory SRC            staged copy SRC.tmp          aside copy SRC.old
    ROOT/iter_N (ROOT's latest)    ROOT/.tmp.iter_N              ROOT/.old.iter_N

1. every rank saves the pruned model to the staged name (an ordinary atomic ``save_checkpoint_to``: the
   staged copy is committed, i.e. complete, or absent); rank 0 adds the tokenizer files, plan and summary
2. every rank reads the staged copy's weights (into new tensors, the pruned model as the template) and
   compares all of them with the pruned model (bitwise); any difference aborts with SRC untouched
3. rank 0 renames SRC -> aside, staged -> SRC, then deletes the aside copy (delete = rename to a .trash name
   first, so no half-deleted directory keeps a loadable name)

Crash after 1-2: SRC is the source; the staged copy is never loaded and is wiped by the next run. Crash
between the two renames: SRC is missing, loads use the aside copy (the source). Crash before the delete:
SRC is the pruned checkpoint. ``recover_interrupted_rewrite`` (start of every --in-place run) finishes such
a state the way loads read it: it moves the aside copy back (or deletes it when SRC is committed) and wipes
the staged copy, through ``checkpoint.layout.prepare_staging``, the routine saves use for the same purpose.
Test hook: MINITRON_TEST_CRASH_AT=prune_after_write | prune_after_aside | prune_before_delete.

A checkpoint in Megatron-LM's layout stays in it: the pruned weights become ROOT/release and the tracker
(latest_checkpointed_iteration.txt) is pointed at "release" after the swap (Megatron-LM loads a weights-only
checkpoint without flags only as a release; see checkpoint/megatron_lm.py). The source iteration the tracker
named is deleted after that (it is what --in-place replaces; other iterations stay). Crash before the
tracker moves: the tracker still names the source. Extra hook: prune_before_pointer.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from ..checkpoint import layout
from ..runtime.collectives import all_ranks_agree, run_on_rank0

CRASH_POINTS = ("prune_after_write", "prune_after_aside", "prune_before_pointer", "prune_before_delete")


def rewrite_paths(load_path: str, format: str = "minitron") -> layout.SavePaths:
    """Final / staged / aside names for rewriting the checkpoint that ``load_path`` means. A ROOT (with
    ``latest``) rewrites the iteration ``latest`` names; other iterations are left as they are. A checkpoint
    in Megatron-LM's layout (``format="megatron-lm"``) is rewritten as ROOT/release (module docstring)."""
    path = os.path.abspath(load_path.rstrip(os.sep) or load_path)
    if format == "megatron-lm":
        return _megatron_lm_rewrite_paths(path)
    if os.path.isdir(path) and not layout.is_committed(path):
        name = layout.read_latest(path)
        if name is not None:
            return layout.iteration_paths(path, layout.parse_iter_dir_name(name))
    parent, name = os.path.split(path)
    iteration = layout.parse_iter_dir_name(name)
    if iteration is not None:
        return layout.iteration_paths(parent, iteration)
    return layout.exact_paths(path)


def _megatron_lm_rewrite_paths(path: str) -> layout.SavePaths:
    if os.path.isdir(path) and not layout.is_loadable(path) and layout.is_megatron_lm_root(path):
        root, source = path, os.path.join(path, layout.read_tracker(path))
    else:
        source = checkpoint_dir = layout.resolve_checkpoint_dir(path)
        root = os.path.dirname(checkpoint_dir)
        if os.path.basename(checkpoint_dir).startswith(layout.ASIDE_PREFIX):  # an interrupted replace
            source = os.path.join(root, os.path.basename(checkpoint_dir)[len(layout.ASIDE_PREFIX):])
    final = os.path.join(root, layout.RELEASE_DIR)
    return layout.named_paths(root, layout.RELEASE_DIR, pointer=layout.TRACKER_FILE,
                              retire=None if os.path.abspath(source) == final else os.path.abspath(source))


def recover_interrupted_rewrite(paths: layout.SavePaths) -> None:
    """Rank 0, before anything reads the source: settle an interrupted rewrite as loads see it."""
    layout.prepare_staging(paths)  # aside back under its name (or dropped), stale staged copy wiped
    os.rmdir(paths.staging)  # prepare_staging leaves an empty staging directory for a save; none follows


def swap_in(paths: layout.SavePaths) -> None:
    """Rank 0: the committed, verified staged copy replaces ``paths.final``."""
    assert layout.is_committed(paths.staging), paths.staging
    layout.crash_point("prune_after_write")
    parent = os.path.dirname(paths.final)
    if os.path.exists(paths.aside):
        layout.remove_tree(paths.aside)
    replacing = os.path.exists(paths.final)  # a Megatron-LM rewrite may create ROOT/release afresh
    if replacing:
        os.rename(paths.final, paths.aside)
        layout.fsync_path(parent)
    layout.crash_point("prune_after_aside")
    os.rename(paths.staging, paths.final)
    layout.fsync_path(parent)
    if paths.root is not None and paths.pointer == layout.TRACKER_FILE:
        layout.crash_point("prune_before_pointer")
        layout.write_pointer(paths)  # Megatron-LM's tracker -> release, written last
    layout.crash_point("prune_before_delete")
    if replacing:
        layout.remove_tree(paths.aside)
    if paths.retire is not None and os.path.exists(paths.retire):
        layout.remove_tree(paths.retire)


def on_rank0(step: Callable[[], None], what: str) -> None:
    """Run a filesystem step on rank 0; every rank returns, or raises OSError("prune: {what} failed on rank
    0: ..."), together (runtime.collectives.run_on_rank0 with prune's message prefix)."""
    run_on_rank0(step, what, error=OSError, prefix="prune: ")


def verify_checkpoint(directory: str, model, arch, device) -> None:
    """Read ``directory``'s weights (this rank's shards, into new tensors, ``model`` as the template) and
    require every tensor to equal ``model``'s, bitwise; collective. Raises OSError naming the first differing
    tensor."""
    from .. import checkpoint

    read, = checkpoint.read_weights(directory, [model], arch=arch)
    want = model.state_dict()
    bad = None
    for key, value in want.items():
        if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            if key not in read or not torch.equal(read[key], value):
                bad = key
                break
    if not all_ranks_agree(bad is None, device):
        raise OSError(f"the pruned checkpoint written to {directory} does not read back equal to the pruned "
                      f"model (first difference on this rank: {bad}); the source checkpoint was not touched")


def save_and_swap(paths: layout.SavePaths, model, *, arch, parallel, device, iteration: int,
                  provenance: dict, tokenizer, add_files: Optional[Callable[[str], None]] = None,
                  timer=None, format: str = "minitron") -> str:
    """Steps 1-3 of the module docstring, collective. ``add_files(staged_dir)`` runs on rank 0 before the
    verification (tokenizer files, plan, summary). Returns the final directory."""
    import contextlib

    from .. import checkpoint

    phase = timer if timer is not None else (lambda name: contextlib.nullcontext())
    with phase("save"):
        staged = checkpoint.save_checkpoint_to(paths.staging, [model], arch=arch, iteration=iteration,
                                               parallel=parallel, provenance=provenance, tokenizer=tokenizer,
                                               format=format, megatron_lm_root=False)
        if add_files is not None:
            on_rank0(lambda: add_files(staged), f"adding files to {staged}")
    with phase("verify"):
        verify_checkpoint(staged, model, arch, device)
    with phase("swap"):
        on_rank0(lambda: swap_in(paths), f"moving {staged} to {paths.final} (the source is still loadable)")
    return paths.final
