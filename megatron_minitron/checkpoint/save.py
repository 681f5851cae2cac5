"""Atomic saves of megatron-core distributed checkpoints (``torch_dist``), synchronous, on every rank.

Sequence (see docs/checkpoints.md): rank 0 prepares the staging directory -> barrier -> every rank writes
its shards (dist_checkpointing.save, which ends in a barrier) -> rank 0 writes minitron.yaml, fsyncs,
writes COMMIT, renames staging to the final name -> writes `latest` -> purges old iterations -> rank 0's
outcome is broadcast so that every rank returns or raises together (runtime.collectives.run_on_rank0).

``format="megatron-lm"`` writes the same way in Megatron-LM's layout (megatron_lm.py): the sharded state
under Megatron-LM's keys plus ``args`` / ``checkpoint_version`` in common.pt, and its tracker file
``latest_checkpointed_iteration.txt`` as the pointer, written last. Weights without optimizer state go to
ROOT/release (tracker "release"), which Megatron-LM loads with no flags.
"""
from __future__ import annotations

import datetime
import errno
import os
import queue
import shutil
import warnings
from typing import Optional

import torch.distributed as dist

from ..config import ModelArch, Parallel
from ..runtime.collectives import run_on_rank0
from . import integrity, layout, space
from .metadata import MEGATRON_LM_FORMAT, SAVE_FORMATS, build_metadata, write_metadata
from .state import (DEFAULT_OPTIMIZER_SHARDING, RNG_KEY, collect_rng_state, current_layout,
                    model_sharded_state, optimizer_sharded_state, params_dtype,
                    resolve_optimizer_sharding, rng_sharded_object)

RESERVED_EXTRA_KEYS = ("iteration",)


def save_checkpoint(root: str, iteration: int, model_chunks: list, *, arch: ModelArch, optimizer=None,
                    scheduler=None, extra: Optional[dict] = None, parallel: Optional[Parallel] = None,
                    provenance: Optional[dict] = None, tokenizer=None, keep_last: Optional[int] = None,
                    save_rng: bool = True, optimizer_sharding: str = DEFAULT_OPTIMIZER_SHARDING,
                    validate_access_integrity: bool = True, format: str = "minitron",
                    megatron_lm_args: Optional[dict] = None) -> str:
    """Save ROOT/iter_<iteration> atomically, point ROOT/latest at it, keep the newest ``keep_last``.

    Call on every rank. ``model_chunks``: this rank's model chunks (GPTModel, or DDP-wrapped).
    ``extra``: any picklable dict (e.g. {"consumed_samples": n}), returned by load_checkpoint.
    ``optimizer_sharding``: "fully_reshardable" (loads at any TP x PP x DP) or "dp_reshardable" (no
    all-gather at save; loads only at the same TP x PP). ``format``: "minitron" or "megatron-lm" (ROOT's
    pointer is then Megatron-LM's tracker file, and a save without optimizer goes to ROOT/release);
    ``megatron_lm_args``: extra fields for its ``args`` (megatron_lm.args_from_arch). Returns the committed
    directory.
    """
    _check_format(format)
    if format == MEGATRON_LM_FORMAT:
        from .megatron_lm import output_dir_name
        _check_root_pointer(root, layout.TRACKER_FILE)
        paths = layout.named_paths(root, output_dir_name(iteration, optimizer is not None), layout.TRACKER_FILE)
    else:
        _check_root_pointer(root, layout.LATEST_FILE)
        paths = layout.iteration_paths(root, iteration)
    return _save(paths, iteration, model_chunks, arch=arch, optimizer=optimizer, scheduler=scheduler,
                 extra=extra, parallel=parallel, provenance=provenance, tokenizer=tokenizer,
                 keep_last=keep_last, save_rng=save_rng, optimizer_sharding=optimizer_sharding,
                 validate_access_integrity=validate_access_integrity, format=format,
                 megatron_lm_args=megatron_lm_args)


def save_checkpoint_to(directory: str, model_chunks: list, *, arch: ModelArch, iteration: int = 0,
                       optimizer=None, scheduler=None, extra: Optional[dict] = None,
                       parallel: Optional[Parallel] = None, provenance: Optional[dict] = None, tokenizer=None,
                       save_rng: bool = False, optimizer_sharding: str = DEFAULT_OPTIMIZER_SHARDING,
                       validate_access_integrity: bool = True, format: str = "minitron",
                       megatron_lm_root: bool = True, megatron_lm_args: Optional[dict] = None) -> str:
    """Save to exactly ``directory`` (e.g. `prune --save OUT`), atomically via ``directory.tmp``.

    An existing checkpoint there is replaced safely; any other non-empty directory is refused.
    ``format="megatron-lm"``: ``directory`` becomes a Megatron-LM ROOT (``--load`` it in Megatron-LM):
    ``directory/release`` (or ``directory/iter_<iteration>`` with an optimizer) plus the tracker, written
    last; with ``megatron_lm_root=False`` ``directory`` is the iteration directory itself and no tracker is
    written (prune --in-place stages its copy that way). Returns the committed directory.
    """
    _check_format(format)
    if format == MEGATRON_LM_FORMAT and megatron_lm_root:
        from .megatron_lm import output_dir_name
        root = os.path.abspath(directory)
        _check_megatron_lm_output_root(root)
        paths = layout.named_paths(root, output_dir_name(iteration, optimizer is not None), layout.TRACKER_FILE)
    else:
        paths = layout.exact_paths(directory)
        final = paths.final
        if os.path.exists(final) and (not os.path.isdir(final)
                                      or (os.listdir(final) and not layout.looks_like_checkpoint(final))):
            raise ValueError(f"{final} exists and is not a megatron-minitron checkpoint directory; refusing to "
                             f"overwrite it. Choose a new directory or remove it first")
    return _save(paths, iteration, model_chunks, arch=arch, optimizer=optimizer, scheduler=scheduler,
                 extra=extra, parallel=parallel, provenance=provenance, tokenizer=tokenizer, keep_last=None,
                 save_rng=save_rng, optimizer_sharding=optimizer_sharding,
                 validate_access_integrity=validate_access_integrity, format=format,
                 megatron_lm_args=megatron_lm_args)


def _check_format(format: str) -> None:
    if format not in SAVE_FORMATS:
        raise ValueError(f"checkpoint format {format!r}: choose one of {SAVE_FORMATS}")


def _check_root_pointer(root: str, pointer: str) -> None:
    """One root, one layout: a root holding the other format's pointer is refused (two pointers could
    disagree, and each reader would follow only its own)."""
    other = layout.LATEST_FILE if pointer == layout.TRACKER_FILE else layout.TRACKER_FILE
    if os.path.isfile(os.path.join(root, other)) and not os.path.isfile(os.path.join(root, pointer)):
        kind = "Megatron-LM" if other == layout.TRACKER_FILE else "megatron-minitron"
        fmt = "megatron-lm" if other == layout.TRACKER_FILE else "minitron"
        raise ValueError(f"{root} holds {kind}-format checkpoints (it has {other}); keep that format "
                         f"(train.save_format={fmt}, prune --save-format {fmt}) or save into another directory")


def _check_megatron_lm_output_root(root: str) -> None:
    if not os.path.exists(root):
        return
    if not os.path.isdir(root):
        raise ValueError(f"{root} exists and is a file; choose a new directory for the checkpoint")
    if layout.is_committed(root) or os.path.isfile(os.path.join(root, layout.LATEST_FILE)):
        raise ValueError(f"{root} is a megatron-minitron-format checkpoint; write the Megatron-LM-format output "
                         f"to a new directory (or remove it first)")
    ours = (layout.STAGING_PREFIX, layout.ASIDE_PREFIX, layout.TRACKER_FILE, layout.TRASH_PREFIX)
    foreign = [n for n in os.listdir(root) if not n.startswith(ours) and n != layout.RELEASE_DIR
               and layout.parse_iter_dir_name(n) is None]
    if foreign and not layout.is_megatron_lm_root(root):
        raise ValueError(f"{root} exists and is not a Megatron-LM checkpoint root (it holds {sorted(foreign)[:5]} "
                         f"and no {layout.TRACKER_FILE}); refusing to write into it. Choose a new directory")


def _check_inputs(arch, extra, model_chunks) -> None:
    if arch is None or not isinstance(arch, ModelArch):
        raise ValueError("save needs arch=<ModelArch> of the model: it is written into minitron.yaml so that "
                         "loaders can check and rebuild the model")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    clash = [k for k in (extra or {}) if k in RESERVED_EXTRA_KEYS]
    if clash:
        raise ValueError(f"extra uses reserved key(s) {clash}; pass the iteration as the iteration argument")
    if not model_chunks:
        raise ValueError("model_chunks is empty; pass this rank's list of model chunks")
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised; call runtime.init_distributed() first")


def _save(paths: layout.SavePaths, iteration: int, model_chunks: list, *, arch, optimizer, scheduler, extra,
          parallel, provenance, tokenizer, keep_last, save_rng, optimizer_sharding,
          validate_access_integrity, format="minitron", megatron_lm_args=None) -> str:
    from megatron.core import dist_checkpointing

    _check_inputs(arch, extra, model_chunks)
    if format == MEGATRON_LM_FORMAT and arch is not None:
        from . import megatron_lm as mlm
        mlm.check_representable(arch)  # before anything is written
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), got {keep_last}")
    sharding = resolve_optimizer_sharding(optimizer, optimizer_sharding) if optimizer is not None else None
    needed = space.estimate_checkpoint_bytes(model_chunks, optimizer is not None)
    _on_rank0(lambda: space.check_free_space(os.path.dirname(paths.staging), needed),
              f"checking free space for {paths.final} (nothing was changed)")
    _on_rank0(lambda: layout.prepare_staging(paths), f"preparing {paths.staging} (nothing was changed)")

    megatron_lm = format == MEGATRON_LM_FORMAT
    state = model_sharded_state(model_chunks)
    model_state = dict(state)
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state(optimizer, model_state, is_loading=False,
                                                     sharding=sharding)
    if scheduler is not None and not megatron_lm:
        state["scheduler"] = scheduler.state_dict()
    layout_now = current_layout(model_chunks)
    if parallel is not None and parallel.pipeline_split is not None:
        layout_now["pipeline_split"] = list(parallel.pipeline_split)
    save_kwargs = {}
    if megatron_lm:
        from . import megatron_lm as mlm
        hint = mlm.load_hint(arch) if arch is not None else None
        if hint and dist.get_rank() == 0:
            warnings.warn(hint, stacklevel=2)  # once per process (Python's default filter)
        if save_rng:
            state[RNG_KEY] = mlm.rng_sharded_object(mlm.to_megatron_rng(collect_rng_state()))
        fields = dict(megatron_lm_args or {})
        flops = fields.pop("num_floating_point_operations_so_far", 0)
        if scheduler is not None:  # in Megatron-LM's units (samples) when the global batch size is given
            state[mlm.SCHEDULER_KEY] = mlm.scheduler_to_megatron_lm(scheduler.state_dict(),
                                                                    fields.get("global_batch_size"))
        state["args"] = _megatron_lm_args(arch, layout_now, parallel, iteration, extra, optimizer, sharding,
                                          save_rng, tokenizer, params_dtype(model_chunks), fields)
        state["checkpoint_version"] = mlm.CHECKPOINT_VERSION
        state["num_floating_point_operations_so_far"] = flops
        save_kwargs["content_metadata"] = mlm.content_metadata(sharding)
    elif save_rng:
        state[RNG_KEY] = rng_sharded_object(collect_rng_state())
    state["iteration"] = int(iteration)
    state["extra"] = dict(extra or {})

    _use_in_process_results_queue()
    try:
        dist_checkpointing.save(state, paths.staging, validate_access_integrity=validate_access_integrity,
                                async_sharded_save=False, **save_kwargs)
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        _discard_staging(paths, e)
        raise
    entries = integrity.shard_hashes(paths.staging)

    contents = {"model": True, "optimizer": optimizer is not None,
                "optimizer_sharding": sharding,
                "scheduler": scheduler is not None, "rng": bool(save_rng),
                "extra_keys": sorted(str(k) for k in (extra or {})),
                "params_dtype": params_dtype(model_chunks), "backend": "torch_dist"}
    if megatron_lm:
        contents["release"] = optimizer is None  # megatron_lm.output_dir_name: weights only -> ROOT/release

    def commit():
        metadata = build_metadata(arch, iteration, layout_now, contents, provenance, tokenizer, format=format)
        metadata["megatron_core"] = _megatron_version()
        write_metadata(paths.staging, metadata)
        integrity.finish_manifest(paths.staging, entries)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        layout.commit_staged(paths, f"iteration {iteration}\n{stamp}\n")

    _on_rank0(commit, f"committing {paths.final} (the previous checkpoint is untouched)")
    if paths.root is not None:
        def point_and_purge():
            layout.crash_point("before_latest")
            layout.write_pointer(paths)
            layout.crash_point("before_purge")
            layout.purge(paths.root, keep_last)
        _on_rank0(point_and_purge, f"updating {paths.root}/{paths.pointer} or purging old checkpoints "
                                   f"({paths.final} is committed)")
    return paths.final


def _megatron_lm_args(arch, layout_now: dict, parallel, iteration, extra, optimizer, sharding, save_rng,
                      tokenizer, dtype, fields: dict):
    """The ``args`` Namespace of a Megatron-LM-format save: our architecture and layout, what was saved."""
    from . import megatron_lm as mlm
    from .state import PER_PARAMETER

    sizes = dict(layout_now)
    if parallel is not None:
        sizes["sequence_parallel"] = parallel.sequence_parallel
    sizes["use_distributed_optimizer"] = sharding not in (None, PER_PARAMETER) if optimizer is not None else (
        parallel.use_distributed_optimizer if parallel is not None else False)
    values = {"iteration": int(iteration),
              "consumed_train_samples": int((extra or {}).get("consumed_samples", 0)),
              # Megatron-LM skips what these say was not saved (no_save_rng) instead of failing to find it
              "no_save_optim": True if optimizer is None else None,
              # RNG states made without a GPU are CPU generator states where Megatron-LM's load restores CUDA
              # ones (torch.cuda.set_rng_state, the tracker's CUDA generators): stored for our resume, but
              # marked not saved so that Megatron-LM starts its RNG afresh instead of failing
              "no_save_rng": None if save_rng and _cuda_rng_in_use() else True,
              "dist_ckpt_optim_fully_reshardable": sharding == "fully_reshardable"}
    values.update(mlm.precision_args(dtype))
    values.update(mlm.tokenizer_args(tokenizer))
    values.update(fields)
    return mlm.args_from_arch(arch, sizes, **values)


def _cuda_rng_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _discard_staging(paths: layout.SavePaths, error: Exception) -> None:
    """A failed write (every rank raises: torch_dist gathers the writers' errors) leaves nothing behind: rank 0
    removes the staging directory; the previous checkpoint was never touched. A full disk is said plainly."""
    text = str(error)
    # torch's zip writer reports a full disk as "unexpected pos N vs M", without an errno: the disk tells
    disk_full = any(f"[Errno {code}]" in text for code in (errno.ENOSPC, errno.EDQUOT)) or (
        getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)) or space.nearly_full(paths.staging)
    dist.barrier()  # every rank looked at the disk before the partial files go
    if dist.get_rank() == 0:
        shutil.rmtree(paths.staging, ignore_errors=True)
    if disk_full:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} while writing the checkpoint; the partial "
                                    f"save was removed and the previous checkpoint is intact", paths.final) from None


def _on_rank0(step, what: str) -> None:
    """A filesystem step on rank 0 only; every rank then returns, or raises OSError, together (a rank that
    raised alone would leave the others waiting in the next collective)."""
    run_on_rank0(step, what, error=OSError, prefix="checkpoint save: ")


def _use_in_process_results_queue() -> None:
    """torch_dist's writer passes its results through a queue that it creates, on first use, with a
    multiprocessing Manager started by "spawn": a server process that re-imports ``__main__`` (scripts
    without a main guard fail, and a process killed mid-run leaves it orphaned). Our saves are synchronous,
    so results are put and taken in this same process: a plain queue does. Only set when none exists yet."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def _megatron_version() -> Optional[str]:
    return layout.installed_megatron_core()
