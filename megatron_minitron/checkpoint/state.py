"""The sharded state dict a checkpoint holds, built the same way for saving and for loading.

    model | model0, model1, ...   each model chunk's sharded_state_dict() (keys are global: any TP x PP)
    optimizer                     optimizer.sharded_state_dict(<the model part above>), per-parameter sharding
    rng_state                     ShardedObject keyed (pp_rank, tp_rank), DP ranks are replicas
    iteration, extra, scheduler   plain values, stored once (common state, written by rank 0)
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from ..runtime.forward import unwrap_model

# How megatron-core's DistributedOptimizer lays out its state in the checkpoint (0.16.1 names):
#   fully_reshardable  each state tensor (fp32 param, exp_avg, exp_avg_sq) stored like its parameter, so it
#                      reshards across TP, PP and DP; costs an all-gather over DP at save time.
#   dp_reshardable     the flat per-DP-rank buffers as they are: no communication, reshards across DP only.
# (`fully_sharded_model_space`, the old default, relies on ShardedTensor.flattened_range, which 0.16.1 no
# longer supports.) Non-distributed optimizers key their state by parameter and reshard freely.
OPTIMIZER_SHARDINGS = ("fully_reshardable", "dp_reshardable")
DEFAULT_OPTIMIZER_SHARDING = "fully_reshardable"
PER_PARAMETER = "per_parameter"  # what metadata records for a non-distributed optimizer
RNG_KEY = "rng_state"


def model_keys(num_chunks: int) -> list:
    """'model' for one chunk, 'model0', 'model1', ... for virtual-pipeline chunks (as Megatron-LM names them)."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state(model_chunks) -> dict:
    chunks = [unwrap_model(c) for c in model_chunks]
    return {key: chunk.sharded_state_dict() for key, chunk in zip(model_keys(len(chunks)), chunks)}


def is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def resolve_optimizer_sharding(optimizer, requested: str) -> str:
    if requested not in OPTIMIZER_SHARDINGS:
        raise ValueError(f"optimizer_sharding={requested!r}: choose one of {OPTIMIZER_SHARDINGS}")
    return requested if is_distributed_optimizer(optimizer) else PER_PARAMETER


def ensure_optimizer_state(optimizer) -> None:
    """Give a never-stepped torch Adam its (zero) state. Without Apex / Transformer Engine, megatron's
    DistributedOptimizer.state_dict() reads the step count from per-parameter state, which torch only creates
    at the first step, and asserts; loading into a fresh optimizer calls it. Zero moments at step 0 are
    exactly a fresh optimizer's state, and a load overwrites them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or not isinstance(inner, torch.optim.Optimizer):
            continue
        if getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(inner, getattr(opt, "config", None))
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # Apex / TE fused Adam keep the step in the param groups
        for group in inner.param_groups:
            for param in group["params"]:
                if "exp_avg" in inner.state[param] and "step" not in inner.state[param]:
                    inner.state[param]["step"] = torch.tensor(0.0)


def optimizer_sharded_state(optimizer, model_state: dict, is_loading: bool, sharding: str) -> dict:
    ensure_optimizer_state(optimizer)
    metadata = {"chained_optim_avoid_prefix": True}
    if sharding != PER_PARAMETER:
        metadata["distrib_optim_sharding_type"] = sharding
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)


# ------------------------------------------------------------------------------------------------ RNG
def collect_rng_state() -> dict:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "tracker": {name: state.clone() for name, state in tracker.get_states().items()},
    }


def restore_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name: s.clone() for name, s in state["tracker"].items()})


def rng_sharded_object(state: dict):
    """This rank's RNG state as one entry of a (PP, TP) grid; DP ranks hold replicas of DP rank 0's."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        RNG_KEY, state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


# ------------------------------------------------------------------------------------------------ layout
def current_layout(model_chunks) -> dict:
    """TP, PP, DP now and the number of layers each pipeline stage holds (a collective over all ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    layers = [len(getattr(getattr(unwrap_model(c), "decoder", None), "layers", [])) for c in model_chunks]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (ps.get_pipeline_model_parallel_rank(), layers))
    per_stage = dict(gathered)
    pp = ps.get_pipeline_model_parallel_world_size()
    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": pp,
        "data_parallel_size": ps.get_data_parallel_world_size(with_context_parallel=True),
        "world_size": dist.get_world_size(),
        "model_chunks": len(model_chunks),
        # layers per stage, per virtual chunk: [[stage0 chunk0, chunk1, ...], [stage1 ...], ...]
        "layers_per_stage": [per_stage[s] for s in range(pp)],
    }


def same_layout(saved: dict, now: dict) -> bool:
    """Whether per-rank state (RNG) saved under ``saved`` maps one-to-one onto this run's ranks."""
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "model_chunks")
    return all(saved.get(k) == now.get(k) for k in keys)


def params_dtype(model_chunks) -> Optional[str]:
    config = getattr(unwrap_model(model_chunks[0]), "config", None)
    dtype = getattr(config, "params_dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


def load_optimizer_state(optimizer, state) -> None:
    """optimizer.load_state_dict(state), working around megatron-core 0.16.1's DistributedOptimizer with torch
    Adam (no Apex / Transformer Engine): load_state_dict puts a per-parameter "step" into torch's state, then
    the parameter-state loaders copy every state key from the checkpoint, which never holds "step"
    (KeyError). So: load the non-tensor part (which sets step from the param groups), hide "step" while the
    tensors are copied in, put it back. torch's load_state_dict also brings back the saved groups' fused /
    foreach flags: this run's choice (train.fused_adam) is put back at the end."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from ..train.optim import fused_adam_in_use, set_adam_implementation

    fused = fused_adam_in_use(optimizer)

    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        pairs = [(optimizer, state)]
    elif len(chained) == 1:
        pairs = [(chained[0], state)]
    else:
        states = [state[k] for k in sorted(state)] if isinstance(state, dict) else list(state)
        if len(states) != len(chained):
            raise ValueError(f"checkpoint holds state for {len(states)} optimizers, this run has {len(chained)}")
        pairs = list(zip(chained, states))
    loaders = {"fully_reshardable": "load_parameter_state_from_fully_reshardable",
               "dp_reshardable": "load_parameter_state_from_dp_reshardable"}
    for opt, opt_state in pairs:
        adopt_saved_group_schedule(opt, opt_state)
        sharding = opt_state.get("param_state_sharding_type") if isinstance(opt_state, dict) else None
        if not isinstance(opt, DistributedOptimizer) or sharding not in loaders:
            opt.load_state_dict(opt_state)
            _unshare_steps(opt)
            continue
        opt_state = dict(opt_state)
        param_state = opt_state.pop("param_state")
        opt.load_state_dict(opt_state)
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        try:
            getattr(opt, loaders[sharding])(param_state)
        finally:
            # one tensor per parameter: megatron hands every parameter the same step tensor, and torch's
            # foreach Adam would then increment it once per parameter
            for p, step in steps.items():
                opt.optimizer.state[p]["step"] = step.clone()
    if chained is not None and len(chained) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()
    if fused is not None:
        set_adam_implementation(optimizer, fused=fused)


# What a param group is (the same in every megatron-core version), and the schedule values a group carries
# that megatron-core >= 0.19 also matches saved groups on (its optimizer.param_group_identifier_keys).
_GROUP_STRUCTURE_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")
_GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd", "optimizer")


def adopt_saved_group_schedule(opt, opt_state) -> None:
    """Give this run's param groups the schedule values (max/min lr, wd range) of the saved groups of the same
    structure, before the optimizer state is loaded. megatron-core 0.16-0.18 end there anyway (the saved group
    is merged over the current one); 0.19 looks saved groups up by those values too, so a resume whose
    train.lr differs from the saved run's would find no group (KeyError / ValueError) without this."""
    inner = getattr(opt, "optimizer", None)
    if not isinstance(opt_state, dict) or not isinstance(inner, torch.optim.Optimizer):
        return
    holder = opt_state.get("optimizer") if isinstance(opt_state.get("optimizer"), dict) else opt_state
    saved = {tuple(g.get(k) for k in _GROUP_STRUCTURE_KEYS): g for g in holder.get("param_groups") or []}
    for group in inner.param_groups:
        match = saved.get(tuple(group.get(k) for k in _GROUP_STRUCTURE_KEYS))
        if match is not None:
            group.update({k: match[k] for k in _GROUP_SCHEDULE_KEYS if k in match})


def _unshare_steps(opt) -> None:
    inner = getattr(opt, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        return
    seen = set()
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))
