"""Intermediate-state (hidden state) distillation losses and the dynamic weight alpha = L_logit / L_is.

Layout assumption: hidden states are ``[..., hidden]`` (megatron: ``[s, b, h]``) and are either
- TP-replicated (no sequence parallelism: every TP rank holds the full sequence; the usual case after a
  RowParallelLinear all-reduce or a final norm). Every TP rank then computes the same per-token loss and
  the same projection gradient; average with ``masked_mean(loss, mask)`` and no group. Or
- sequence-parallel split (each TP rank holds s/TP positions). The per-token loss is then local to the
  rank's own positions: average with ``masked_mean(loss, mask, group=tp_group)`` (global mean on every
  rank, gradients through local tokens), and mark the projection's parameters ``sequence_parallel = True``
  so megatron's ``finalize_model_grads`` sums their gradients over the TP group (as it does for norms).
The student-to-teacher projection is a plain (replicated) ``nn.Linear``; hidden sizes are small next to
the vocabulary, so these losses compute in fp32 with ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .kinds import HIDDEN_LOSSES
_NORM_EPS = 1e-12


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                      projection: Optional[nn.Linear] = None, kind: str = "mse") -> torch.Tensor:
    """Per-token loss [...] (fp32) between projected student states and (detached) teacher states.

    student_hidden: [..., h_student]; teacher_hidden: [..., h_teacher] (same leading dims).
    projection: nn.Linear(h_student, h_teacher) (None when the widths match); it is trained with the student.
    kind: "mse" = mean over channels of (W h_s + c - h_t)^2; "cosine" = 1 - cos(W h_s + c, h_t).
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"kind must be one of {HIDDEN_LOSSES}, got {kind!r}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} must cover the same tokens (equal leading dims)")
    h_student, h_teacher = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if projection is None:
        if h_student != h_teacher:
            raise ValueError(f"student width {h_student} != teacher width {h_teacher}: pass "
                             f"projection=nn.Linear({h_student}, {h_teacher})")
        projected = student_hidden
    else:
        if projection.in_features != h_student or projection.out_features != h_teacher:
            raise ValueError(f"projection maps {projection.in_features} -> {projection.out_features} but the "
                             f"states are {h_student} -> {h_teacher}; build nn.Linear({h_student}, {h_teacher})")
        projected = projection(student_hidden.to(projection.weight.dtype))
    s = projected.float()
    t = teacher_hidden.detach().float()
    if kind == "mse":
        return (s - t).pow(2).mean(dim=-1)
    dot = (s * t).sum(dim=-1)
    norms = s.norm(dim=-1).clamp_min(_NORM_EPS) * t.norm(dim=-1).clamp_min(_NORM_EPS)
    return 1.0 - dot / norms


def dynamic_alpha(logit_loss: torch.Tensor, intermediate_loss: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """alpha = L_logit / L_is, detached (Minitron: L = L_logit + alpha * L_is keeps both terms the same size).

    Both arguments are scalar losses (already averaged). Returns 0 when L_is is 0 (nothing to match).
    """
    num = logit_loss.detach().float()
    den = intermediate_loss.detach().float()
    usable = den.abs() > eps
    safe_den = torch.where(usable, den, torch.ones_like(den))
    return torch.where(usable, num / safe_den, torch.zeros_like(num))
