"""Loading at any TP x PP x DP: megatron-core's dist_checkpointing reshards weights and optimizer state.

Every check that can fail on the user's side (path, `latest`, COMMIT, metadata, architecture, which parts
the checkpoint holds) runs before any tensor is read, on every rank, from the same files, so all ranks
raise the same error together.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ModelArch
from . import integrity, megatron_lm_torch
from ..runtime.forward import unwrap_model
from .description import CheckpointInfo, describe_directory
from .layout import check_readable_by_installed_core, resolve_checkpoint_dir
from .metadata import MEGATRON_LM_FORMAT, check_arch
from .state import (DEFAULT_OPTIMIZER_SHARDING, PER_PARAMETER, RNG_KEY, collect_rng_state, current_layout,
                    load_optimizer_state, model_keys, model_sharded_state, optimizer_sharded_state,
                    resolve_optimizer_sharding, restore_rng_state, rng_sharded_object, same_layout)


def _rank0_note(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[checkpoint] {text}", flush=True)


def _prepare(path: str, model_chunks: list, arch: Optional[ModelArch]) -> CheckpointInfo:
    if not model_chunks:
        raise ValueError("model_chunks is empty; pass this rank's list of model chunks")
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised; call runtime.init_distributed() first")
    directory = resolve_checkpoint_dir(path)
    check_readable_by_installed_core(directory)
    integrity.verify_on_load(directory)  # a damaged or missing file is named before anything reads it
    info = describe_directory(directory)
    if arch is not None:
        check_arch(arch, info)
    return info


def _dist_load(state: dict, directory: str, validate_access_integrity: bool) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

    try:
        return dist_checkpointing.load(state, directory, validate_access_integrity=validate_access_integrity,
                                       strict=StrictHandling.RAISE_UNEXPECTED)
    except (CheckpointingException, TorchCheckpointException, KeyError) as e:
        raise ValueError(
            f"checkpoint {directory} does not fit the model being loaded: {_reason(e)}\n(the model's "
            f"architecture or padded vocabulary - which rounds up to a multiple of make_vocab_size_divisible_by"
            f" x TP - differs from the saved one)") from None


def _reason(error: Exception) -> str:
    """The distinct one-line causes inside an error (torch's wraps every rank's traceback into one)."""
    text = str(error)
    causes = re.findall(r"CheckpointingException: (.+)", text)
    if not causes:
        return text if len(text) < 2000 else text[:2000] + " ..."
    return "; ".join(dict.fromkeys(c.strip() for c in causes))


def _load_model(loaded: dict, model_chunks: list) -> None:
    for key, chunk in zip(model_keys(len(model_chunks)), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)


def _torch_format(info: CheckpointInfo) -> bool:
    return info.format == MEGATRON_LM_FORMAT and info.contents.backend == megatron_lm_torch.BACKEND


def _load_torch_format(info: CheckpointInfo, model_chunks: list) -> None:
    layout = info.layout
    megatron_lm_torch.load_model_weights(info.directory, info.arch, layout.tensor_model_parallel_size,
                                         layout.pipeline_model_parallel_size, model_chunks)


def load_checkpoint(path: str, model_chunks: list, optimizer=None, scheduler=None,
                    arch: Optional[ModelArch] = None, load_rng: bool = True,
                    validate_access_integrity: bool = True) -> dict:
    """Restore a training state saved by save_checkpoint / save_checkpoint_to, at any parallel layout.

    ``path``: a checkpoint root (follows `latest`) or a checkpoint directory. ``optimizer`` / ``scheduler``:
    restored when given (ValueError if the checkpoint has none). RNG states are restored only when TP and PP
    match the saved layout. Returns the saved ``extra`` dict plus ``iteration``.
    """
    info = _prepare(path, model_chunks, arch)
    directory, contents, saved = info.directory, info.contents, info.layout
    if _torch_format(info):
        raise ValueError(f"{directory} is a Megatron-LM --ckpt-format torch checkpoint, whose optimizer, "
                         f"scheduler and RNG state megatron-minitron does not restore; load its weights "
                         f"(load_weights / train.load) to start a run from them, or resume it in Megatron-LM "
                         f"(or convert it there with --ckpt-convert-format torch_dist --ckpt-convert-save DIR)")
    for name, wanted in (("optimizer", optimizer), ("scheduler", scheduler)):
        if wanted is not None and not getattr(contents, name):
            raise ValueError(f"{directory} holds no {name} state (it was saved without one, e.g. by prune or "
                             f"an HF import); load it with load_weights() (train.load) to start a new run from "
                             f"its weights, or pass {name}=None")
    layout_matches = same_layout(saved.as_record(), current_layout(model_chunks))
    sharding = contents.optimizer_sharding
    megatron_lm = info.format == MEGATRON_LM_FORMAT
    if optimizer is not None and sharding not in (PER_PARAMETER, "fully_reshardable", "dp_reshardable"):
        raise ValueError(f"{directory} holds optimizer state sharded as {sharding!r}, which megatron-core "
                         f"0.16.1 cannot load (only fully_reshardable, dp_reshardable or a non-distributed "
                         f"optimizer's); load weights only (load_weights / train.load), or re-save it with "
                         f"Megatron-LM using --dist-ckpt-optim-fully-reshardable")
    if optimizer is not None:
        now = resolve_optimizer_sharding(optimizer, DEFAULT_OPTIMIZER_SHARDING)
        if (sharding == PER_PARAMETER) != (now == PER_PARAMETER):
            raise ValueError(f"{directory} holds {'non-' if sharding == PER_PARAMETER else ''}distributed "
                             f"optimizer state but the optimizer given is {'not ' if now == PER_PARAMETER else ''}"
                             f"a DistributedOptimizer; set parallel.use_distributed_optimizer as when it was "
                             f"saved, or load weights only (load_weights)")
        if sharding == "dp_reshardable" and not layout_matches:
            raise ValueError(f"{directory} holds optimizer state saved as dp_reshardable at TP"
                             f"{saved.tensor_model_parallel_size} PP{saved.pipeline_model_parallel_size},"
                             f" which only loads at that TP x PP. Load at that layout, or load weights only "
                             f"(load_weights), or re-save it there with optimizer_sharding='fully_reshardable'")
    restore_rng = False
    if load_rng and contents.rng:
        restore_rng = layout_matches
        if not restore_rng:
            _rank0_note(f"RNG states not restored: saved at TP{saved.tensor_model_parallel_size} "
                        f"PP{saved.pipeline_model_parallel_size}, loading at another layout")

    state = model_sharded_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state(optimizer, dict(state), is_loading=True,
                                                     sharding=sharding)
    if restore_rng:
        if megatron_lm:
            from . import megatron_lm as mlm
            state[RNG_KEY] = mlm.rng_sharded_object(mlm.to_megatron_rng(collect_rng_state()))
        else:
            state[RNG_KEY] = rng_sharded_object(collect_rng_state())
    loaded = _dist_load(state, directory, validate_access_integrity)

    _load_model(loaded, model_chunks)
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None:
        try:
            if megatron_lm:
                from .megatron_lm import SCHEDULER_KEY, scheduler_from_megatron_lm
                scheduler.load_state_dict(scheduler_from_megatron_lm(loaded[SCHEDULER_KEY], loaded.get("args")))
            else:
                scheduler.load_state_dict(loaded["scheduler"])
        except AssertionError as e:  # megatron asserts that LR settings match the checkpoint's
            raise ValueError(f"LR schedule settings differ from {directory}'s: {e}. Keep them, or set "
                             f"override_opt_param_scheduler / use_checkpoint_opt_param_scheduler on the "
                             f"scheduler") from None
    if restore_rng:
        if megatron_lm:
            from .megatron_lm import from_megatron_rng
            restore_rng_state(from_megatron_rng(loaded[RNG_KEY]))
        else:
            restore_rng_state(loaded[RNG_KEY])
    result = dict(loaded.get("extra") or {})
    if megatron_lm and "consumed_samples" not in result:  # Megatron-LM keeps its data position in args
        result["consumed_samples"] = int(getattr(loaded.get("args"), "consumed_train_samples", 0) or 0)
    result["iteration"] = int(loaded.get("iteration", 0))
    return result


def read_weights(path: str, model_chunks: list, arch: Optional[ModelArch] = None) -> list:
    """The checkpoint's weights for this rank's shards of ``model_chunks``, read into new tensors (one state
    dict per chunk, the models' own keys); the models are only the template and keep their values. Cheaper
    than building a second model to load into (a read-back check)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    info = _prepare(path, model_chunks, arch)
    if _torch_format(info):
        layout = info.layout
        return megatron_lm_torch.read_model_weights(info.directory, info.arch, layout.tensor_model_parallel_size,
                                                    layout.pipeline_model_parallel_size, model_chunks)
    state = model_sharded_state(model_chunks)

    def into_new_tensor(entry):
        if isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            entry.data = torch.empty_like(entry.data)  # the load writes here, not into the model's parameter
        return entry

    dict_list_map_inplace(into_new_tensor, state)
    loaded = _dist_load(state, info.directory, validate_access_integrity=True)
    return [loaded[key] for key in model_keys(len(model_chunks))]


def load_weights(path: str, model_chunks: list, arch: Optional[ModelArch] = None, optimizer=None,
                 validate_access_integrity: bool = True) -> dict:
    """Weights only (no optimizer state, scheduler, RNG or iteration): initialise from a teacher or a
    pretrained / pruned checkpoint, at any layout. Pass the already-built ``optimizer`` so that its fp32
    main copies of bf16 weights are refreshed from the loaded weights. Returns the checkpoint's metadata
    record (``read_metadata``'s dict; ``describe_checkpoint`` gives the same typed)."""
    info = _prepare(path, model_chunks, arch)
    if _torch_format(info):
        _load_torch_format(info, model_chunks)
    else:
        loaded = _dist_load(model_sharded_state(model_chunks), info.directory, validate_access_integrity)
        _load_model(loaded, model_chunks)
    if optimizer is not None:
        optimizer.reload_model_params()
    return info.metadata
