"""megatron-core DDP, optimizer and LR schedule from a ``Train`` config."""
from __future__ import annotations

import importlib.util

from ..config import Parallel, Train


def wrap_ddp(model, parallel: Parallel):
    """Wrap one model chunk in megatron-core's DDP (contiguous grad buffers, distributed-optimizer aware)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        # grads are summed over DP and divided by the global token count in finalize_model_grads
        average_in_collective=False,
    )
    return DistributedDataParallel(model.config, ddp_config, model)


def megatron_finds_fused_adam() -> bool:
    """Whether megatron-core's optimizer will be Transformer Engine's or Apex's FusedAdam (it imports them in
    that order) rather than torch's AdamW, judged from what is installed, without importing either."""
    return any(importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex"))


def steps_with_foreach_adam(train: Train) -> bool:
    """Whether this config's optimizer steps with torch's foreach AdamW (what the memory planner counts a
    step temporary for): neither train.fused_adam nor an installed TE / Apex FusedAdam."""
    return not (train.fused_adam or megatron_finds_fused_adam())


def build_optimizer(model_chunks, train: Train, parallel: Parallel, dtype):
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    install_multi_tensor_ops()
    optimizer = get_megatron_optimizer(config, model_chunks)
    set_adam_implementation(optimizer, fused=train.fused_adam)
    return optimizer


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron-core's ``local_multi_tensor_l2_norm``, its gradient-norm kernel without TE / Apex:
    the same sqrt(sum of squared per-tensor norms), through torch's multi-tensor norm and left on the device.
    The fallback reads every per-tensor norm back to the host, one device sync per gradient tensor (~300 for a
    32-layer model) on every step."""
    import torch

    if per_tensor:  # megatron-core never asks for per-tensor norms here; keep its answer if it ever does
        from megatron.core.utils import local_multi_tensor_l2_norm
        return local_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args)
    norms = torch._foreach_norm([t for tensors in tensor_lists for t in tensors])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for megatron-core's ``local_multi_tensor_scale`` (dst = src * scale), used by gradient
    clipping with src and dst the same gradients: scaled in place by torch's multi-tensor kernel, where the
    fallback writes a temporary of each gradient and copies it back (twice the memory traffic)."""
    import torch

    src, dst = tensor_lists
    if len(src) == len(dst) and all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
        return
    for s, d in zip(src, dst):
        d.copy_(s * scale)


def install_multi_tensor_ops() -> None:
    """Where megatron-core's gradient clipping runs its local fallbacks (neither TE nor Apex installed), run
    ``foreach_l2_norm`` / ``foreach_scale`` instead. TE's and Apex's kernels are left as they are."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = foreach_scale


def set_adam_implementation(optimizer, fused: bool) -> int:
    """Run the torch Adam(W) that megatron-core falls back to without Apex / Transformer Engine either fused
    (one kernel for all of a group's tensors) or as torch's default (foreach on GPU). Called after the build
    and again after every load: torch's load_state_dict restores the saved groups' flags, so a checkpoint
    written with the other choice would otherwise switch this run's. Each step counter goes where that
    implementation reads it: fused on the parameter's device, foreach on the CPU (a GPU counter there costs a
    device sync per parameter). Returns how many param groups are torch Adam(W); Apex's and TE's FusedAdam are
    fused already and are left alone (0)."""
    import torch

    groups = 0
    for inner in _torch_adams(optimizer):
        flags = dict(fused=True, foreach=False) if fused else dict(fused=None, foreach=None)
        inner.defaults.update(flags)
        for group in inner.param_groups:
            group.update(flags)
            groups += 1
            for param in group["params"]:
                state = inner.state.get(param, {})
                if torch.is_tensor(state.get("step")):
                    device = param.device if fused else torch.device("cpu")
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)
    return groups


def fused_adam_in_use(optimizer):
    """True / False: whether the torch Adam(W) inside ``optimizer`` runs fused; None when there is none (Apex,
    TE or another optimizer). What a checkpoint load keeps (checkpoint.state.load_optimizer_state)."""
    for inner in _torch_adams(optimizer):
        return bool(inner.param_groups[0].get("fused"))
    return None


def _torch_adams(optimizer):
    """The torch Adam / AdamW inside megatron-core's (chained, mixed-precision, distributed) optimizers."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def build_scheduler(optimizer, train: Train):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = train.lr_decay_iters or train.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, train.lr_warmup_iters + 1),
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
    )
