"""Distillation losses between student and teacher logits, vocab-parallel under tensor parallelism.

Inputs are each TP rank's logits shards, ``[..., V/TP]`` (e.g. ``[s, b, V/TP]`` or ``[tokens, V/TP]``), of
any float dtype; the student's may require grad, the teacher's is detached. Every loss returns the
*per-token* loss (fp32, shape ``[...]``, the same on every TP rank); average it with :func:`masked_mean`.
Softmax statistics, dot products and norms are all-reduced over ``group`` (default: megatron's TP group
when initialised; ``None``: no reduction). A full-vocabulary tensor is never gathered, and fp32 copies
exist for one chunk of tokens at a time. Gradients flow to the student logits only and need no
collective in the backward (every term of d loss / d z_s[v] is local to v's shard given per-token
statistics). Derivations: ``distill/kl_torch.py``, ``distill/logit_distances.py``, docs/distillation_losses.md.

Backends for the KL losses: ``"torch"`` (chunked autograd Function), ``"triton"`` (fused kernels in
``distill/kl_triton.py``), ``"auto"`` = Triton on CUDA tensors when ``triton`` imports, else torch.
MSE and cosine run on the torch path only. The kinds and backends are named in ``distill/kinds.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .intermediate import dynamic_alpha, hidden_state_loss  # noqa: F401  (re-exported: the public API)
from .kinds import KL_LOSSES, LOGIT_LOSSES, LOSS_BACKENDS
from .kl_torch import chunked_kl
from .logit_distances import chunked_logit_cosine, chunked_logit_mse
from .vocab_parallel import TP_GROUP, GroupArg, all_reduce_sum_, flatten_mask, flatten_tokens, resolve_group


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # ImportError, or a broken install that fails at import time
        return False


def pick_kl_backend(backend: str, device: torch.device) -> str:
    """"triton" or "torch" for a KL loss (``logit_kd_loss`` and the fused output-layer ``linear_kd_loss``)."""
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    if backend == "triton" or (backend == "auto" and device.type == "cuda" and triton_available()):
        if not triton_available():
            raise ValueError("backend='triton' but triton cannot be imported; `pip install triton` or use "
                             "backend='torch'")
        return "triton"
    return "torch"


def _pick_backend(backend: str, kind: str, device: torch.device) -> str:
    if backend == "triton" and kind not in KL_LOSSES:
        raise ValueError(f"the Triton backend implements {' and '.join(KL_LOSSES)} only, not {kind!r}; "
                         f"use backend='torch' or 'auto'")
    chosen = pick_kl_backend(backend, device)  # validates the name
    return chosen if kind in KL_LOSSES else "torch"


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl", *,
                  temperature: float = 1.0, scale_by_temperature_squared: bool = True,
                  loss_mask: Optional[torch.Tensor] = None, group: GroupArg = TP_GROUP,
                  backend: str = "auto", chunk_tokens: Optional[int] = None,
                  triton_block: Optional[int] = None) -> torch.Tensor:
    """Per-token distillation loss between vocab-parallel logit shards.

    kind: "forward_kl" = KL(p_t(tau) || p_s(tau)) (the Minitron logit loss), "reverse_kl" =
        KL(p_s(tau) || p_t(tau)), "mse" = mean over the vocab of (z_s - z_t)^2, "cosine" = 1 - cos(z_s, z_t).
    temperature, scale_by_temperature_squared: KL only; with the flag (default True, Hinton et al.) the KL
        is multiplied by tau^2 so gradient magnitudes do not shrink as 1/tau^2 when tau changes; at tau = 1
        it makes no difference.
    loss_mask: [...] (the logits' leading dims), nonzero = token counts. Masked tokens get exactly 0 loss
        and exactly 0 gradient.
    group: process group over which the vocab is split; TP_GROUP (default) = megatron's TP group,
        None = the logits hold the whole vocabulary.
    chunk_tokens: tokens per fp32 chunk on the torch path (default: 2^24 fp32 elements per chunk).
    Returns: fp32 [...] per-token loss, identical on every rank of ``group``.
    """
    if kind not in LOGIT_LOSSES:
        raise ValueError(f"kind must be one of {LOGIT_LOSSES}, got {kind!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; both must be this rank's "
                         f"[..., vocab/TP] shard of the same tokens (same padded vocab size)")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError("logits must be floating point tensors")
    leading = student_logits.shape[:-1]
    process_group = resolve_group(group)
    student = flatten_tokens(student_logits)
    teacher = flatten_tokens(teacher_logits.detach())
    mask = flatten_mask(loss_mask, leading, student.device)
    chosen = _pick_backend(backend, kind, student.device)
    if kind in KL_LOSSES:
        reverse = kind == "reverse_kl"
        if chosen == "triton":
            from .kl_triton import triton_kl

            loss = triton_kl(student, teacher, mask, temperature, scale_by_temperature_squared, reverse,
                             process_group, block=triton_block)
        else:
            loss = chunked_kl(student, teacher, mask, temperature, scale_by_temperature_squared, reverse,
                              process_group, chunk_tokens)
    elif kind == "mse":
        loss = chunked_logit_mse(student, teacher, mask, process_group, chunk_tokens)
    else:
        loss = chunked_logit_cosine(student, teacher, mask, process_group, chunk_tokens)
    return loss.reshape(leading)


def masked_mean(per_token: torch.Tensor, mask: Optional[torch.Tensor] = None,
                group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
    """Mean of ``per_token`` over the tokens where ``mask`` is nonzero (0 if there are none).

    Masked entries are excluded with ``where`` (not multiplied), so a NaN/inf there cannot leak into the
    result or its gradient. A float mask weights tokens: sum(w * x) / sum(w).
    group: when each rank of ``group`` holds *different* tokens (e.g. sequence-parallel hidden states),
        the value becomes the mean over all of them, the same on every rank, and each rank's gradient is
        d mean / d (its own tokens) = w / sum over all ranks of w. Leave None for TP-replicated losses
        (the vocab-parallel logit losses are already identical on every TP rank).
    """
    if mask is None:
        weights = torch.ones_like(per_token, dtype=torch.float32)
    else:
        if mask.shape != per_token.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != per-token loss shape {tuple(per_token.shape)}")
        weights = mask.to(device=per_token.device, dtype=torch.float32)
    keep = weights != 0
    weighted = torch.where(keep, per_token.float() * weights, torch.zeros_like(weights))
    local_sum = weighted.sum()
    totals = torch.stack([local_sum.detach(), weights.sum()])
    if group is not None:
        all_reduce_sum_(totals, group)
    count = totals[1].clamp_min(1e-12) if mask is not None else totals[1]
    # value: global sum / global count; gradient: only through this rank's own tokens
    return (local_sum + (totals[0] - local_sum.detach())) / count
