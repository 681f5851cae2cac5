"""KD loss fused with the output layer: forward / reverse KL (and the student's LM loss) straight from the
final hidden states and the vocab-parallel output weights, never holding either model's [T, V] logits.

    z_s = h_s W_s^T, z_t = h_t W_t^T   (this TP rank's vocabulary shard of both output layers)
    loss = kd_weight * sum_i w_i KL_i(tau) [* tau^2]  +  lm_weight * sum_i w_i CE_i(z_s, label_i)

Algorithm (shared by both backends; notation and per-token math as ``distill.kl_torch``):
for each chunk of tokens (default: as many as keep one [chunk, V/TP] logits buffer at 2^27 elements,
1024 tokens at V = 128256),
  1. two GEMMs give both models' logits for the chunk and this shard (the model dtype, bf16 on GPU);
  2. a tile epilogue streams each row in vocabulary blocks with the online-softmax reduction and writes
     [tokens]-sized partial statistics (max / shifted sum-exp of student and teacher, the KL cross term,
     and for the LM loss the target logit and, when tau != 1, the student's tau = 1 statistics);
  3. ``combine_partial_softmax_stats`` combines the shards: one MAX + one SUM all-reduce per chunk
     (the target logit rides in the SUM with a dummy zero max);
  4. the epilogue writes d loss / d z_s for the chunk into the student-logits buffer (in place);
  5. two GEMMs accumulate d loss / d h_s (this shard's part) and d loss / d W_s.
The gradients are therefore computed in the forward and only scaled by the incoming scalar gradient in
the backward: the output is a scalar (a token sum, weights given up front), plus detached per-token
losses for reporting. GEMM work equals the unfused path's (student forward, teacher forward, student
dgrad + wgrad): no logits are recomputed. Tiling the vocabulary at the GEMM level too would force a
second pass of both logit GEMMs once the full-vocabulary statistics are known (1.5x the GEMM flops),
which is why the token chunk keeps its whole local vocabulary row in one bounded buffer.

Backends (the tile epilogue, steps 2 and 4): ``"torch"`` (fp32 per chunk, this module; what runs
without Triton and the reference of the tiled algorithm), ``"triton"``
(``distill/kd_linear_triton.py``: one program per row, fp32 in registers, no fp32 [chunk, V] tensor),
``"auto"`` = Triton on CUDA tensors when triton imports. The GEMMs are torch (cuBLAS) in both: they
are ~90% of the time at Llama shapes and a hand-written Triton GEMM with this epilogue would need
tuning on the target GPU to match cuBLAS.

TP: each rank passes its vocabulary shard of both output weights ([V/TP, H], megatron's
ColumnParallelLinear layout, rank r holding rows r*V/TP ...) and the full (gathered) hidden states;
the hidden-state gradient is summed over TP in the backward (as megatron's
``copy_to_tensor_model_parallel_region``), or with ``sequence_parallel`` the hidden states are
gathered by megatron's ``gather_from_sequence_parallel_region`` whose backward reduce-scatters.
Terms of zero probability count 0 (``weighted_by_probability``), so -inf never makes a NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .kinds import KL_LOSSES, stats_rows
from .kl_torch import kl_from_global_stats, kl_grad_chunk, local_partial_stats
from .losses import pick_kl_backend
from .vocab_parallel import TP_GROUP, GroupArg, combine_partial_softmax_stats, fp32_copy, resolve_group, safe_shift

# Logits elements per chunk and model: 2 x 2^27 bf16 = 512 MiB of logits buffers at any T.
DEFAULT_CHUNK_LOGITS = 1 << 27


@dataclass
class LinearKDOutput:
    """loss: differentiable scalar ``kd_weight * sum_i w_i kd_i + lm_weight * sum_i w_i lm_i``.
    kd, lm: detached fp32 per-token KD loss (tau^2 included when asked) and student cross-entropy, with the
    hidden states' leading shape, 0 on masked tokens; lm is None without labels."""
    loss: torch.Tensor
    kd: torch.Tensor
    lm: Optional[torch.Tensor]


# -- statistics layout (both epilogues): max rows [m_s(tau), m_t(tau), (m_1: student at tau = 1), (0)],
#    sum rows [S_s, S_t, cross, (S_1), (target logit)]; "(..)" only with labels, m_1/S_1 only when tau != 1.
def lm_mode_for(has_labels: bool, temperature: float) -> Optional[str]:
    """None (no LM loss), "shared" (tau = 1: the LM softmax is the KD student softmax), "separate"."""
    if not has_labels:
        return None
    return "shared" if temperature == 1.0 else "separate"


def sum_owners(reverse: bool, lm_mode: Optional[str]) -> list[int]:
    owners = [0, 1, 0 if reverse else 1]
    if lm_mode == "shared":
        owners += [2]          # target logit: the zero max row
    elif lm_mode == "separate":
        owners += [2, 3]       # S_1 (max row 2), target logit (zero max row 3)
    return owners


def local_target_logits(student: torch.Tensor, labels_local: torch.Tensor) -> torch.Tensor:
    """z_s[i, label_i] (fp32) where the label falls in this shard, else 0 (summed over TP)."""
    local = (labels_local >= 0) & (labels_local < student.shape[1])
    picked = student.gather(1, labels_local.clamp(0, student.shape[1] - 1)[:, None]).squeeze(1).float()
    return torch.where(local, picked, torch.zeros_like(picked))


class TorchTileEpilogue:
    """Steps 2 and 4 in torch, fp32 copies of one chunk (the CPU path and the reference algorithm)."""

    @staticmethod
    def partial_stats(student, teacher, labels_local, inv_tau, reverse, lm_mode):
        local_max, local_sums = local_partial_stats(student, teacher, inv_tau, reverse, chunk=max(1, student.shape[0]))
        if lm_mode is None:
            return local_max, local_sums
        n = student.shape[0]
        max_rows, sum_rows = [local_max], [local_sums]
        if lm_mode == "separate":
            z = fp32_copy(student)
            m_1 = z.amax(dim=-1)
            max_rows.append(m_1[None])
            sum_rows.append(torch.exp(z.sub_(safe_shift(m_1)[:, None])).sum(dim=-1)[None])
        max_rows.append(torch.zeros(1, n, dtype=torch.float32, device=student.device))
        sum_rows.append(local_target_logits(student, labels_local)[None])
        return torch.cat(max_rows), torch.cat(sum_rows)

    @staticmethod
    def grad_(student, teacher, labels_local, lse_s, lse_t, kl, kd_scale, lse_1, lm_scale, inv_tau, reverse):
        """Overwrite ``student`` (the chunk's logits) with d loss / d z_s; rows of zero scale get exact 0."""
        a = fp32_copy(student).mul_(inv_tau)
        b = fp32_copy(teacher).mul_(inv_tau)
        d_kl = kl_grad_chunk(a, b, lse_s, lse_t, kl, reverse)
        grad = torch.where(kd_scale[:, None] != 0, d_kl * kd_scale[:, None], torch.zeros_like(d_kl))
        if lm_scale is not None:
            p_1 = torch.exp(student.float() - lse_1[:, None])
            local = (labels_local >= 0) & (labels_local < student.shape[1])
            rows = torch.nonzero(local).squeeze(1)
            p_1[rows, labels_local[rows]] -= 1.0
            grad += torch.where(lm_scale[:, None] != 0, p_1 * lm_scale[:, None], torch.zeros_like(p_1))
        student.copy_(grad)
        return student


class FusedLinearKD(torch.autograd.Function):
    """Flat inputs: hidden [N, H], weights [V/TP, H], token_weight [N] fp32, labels_local [N] int64 or None."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, token_weight, labels_local,
                kd_weight: float, lm_weight: float, temperature: float, scale_by_temperature_squared: bool,
                reverse: bool, group, reduce_hidden_grad: bool, chunk: int, epilogue):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, local_vocab = student_hidden.shape[0], student_weight.shape[0]
        device = student_hidden.device
        inv_tau = 1.0 / temperature
        loss_scale = temperature ** 2 if scale_by_temperature_squared else 1.0
        lm_mode = lm_mode_for(labels_local is not None, temperature)
        owners = sum_owners(reverse, lm_mode)
        kd = torch.zeros(n, dtype=torch.float32, device=device)
        lm = torch.zeros(n if lm_mode else 0, dtype=torch.float32, device=device)
        grad_hidden = torch.empty_like(student_hidden) if need_hidden_grad else None
        # accumulated in the weight's dtype (one rounding per chunk), like the unfused linear's bf16 wgrad
        grad_weight = torch.zeros_like(student_weight) if need_weight_grad else None
        rows = min(chunk, n)
        student_buf = torch.empty(rows, local_vocab, dtype=student_hidden.dtype, device=device)
        teacher_buf = torch.empty(rows, local_vocab, dtype=teacher_hidden.dtype, device=device)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            z_s = torch.matmul(student_hidden[start:end], student_weight.t(), out=student_buf[:end - start])
            z_t = torch.matmul(teacher_hidden[start:end], teacher_weight.t(), out=teacher_buf[:end - start])
            labels = labels_local[start:end] if lm_mode else None
            local_max, local_sums = epilogue.partial_stats(z_s, z_t, labels, inv_tau, reverse, lm_mode)
            global_max, global_sums = combine_partial_softmax_stats(local_max, local_sums, owners, group)
            kl, lse_s, lse_t = kl_from_global_stats(global_max, global_sums, reverse)
            weight = token_weight[start:end]
            keep = weight != 0
            kd[start:end] = torch.where(keep, kl * loss_scale, torch.zeros_like(kl))
            lse_1 = lm_scale = None
            if lm_mode:
                lse_1 = lse_s if lm_mode == "shared" else global_max[2] + torch.log(global_sums[3])
                lm_chunk = lse_1 - global_sums[-1]
                lm[start:end] = torch.where(keep, lm_chunk, torch.zeros_like(lm_chunk))
                if lm_weight:  # else the LM loss is only reported: no LM term in the gradient pass
                    lm_scale = torch.where(keep, weight * lm_weight, torch.zeros_like(weight))
            if need_hidden_grad or need_weight_grad:
                kd_scale = torch.where(keep, weight * (kd_weight * loss_scale * inv_tau), torch.zeros_like(weight))
                grad_logits = epilogue.grad_(z_s, z_t, labels, lse_s, lse_t, kl, kd_scale, lse_1, lm_scale,
                                             inv_tau, reverse)
                if need_hidden_grad:
                    torch.matmul(grad_logits, student_weight, out=grad_hidden[start:end])
                if need_weight_grad:
                    grad_weight.addmm_(grad_logits.t(), student_hidden[start:end])
        del student_buf, teacher_buf
        total = kd_weight * (kd * token_weight).sum()
        if lm_mode:
            total = total + lm_weight * (lm * token_weight).sum()
        ctx.grads = (grad_hidden, grad_weight)
        ctx.group, ctx.reduce_hidden_grad = group, reduce_hidden_grad
        ctx.mark_non_differentiable(kd, lm)
        return total, kd, lm

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_lm):
        if ctx.grads is None:
            raise RuntimeError("the fused output-layer KD loss was backpropagated twice; its gradients are "
                               "computed once in the forward (retain_graph=True is not supported)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # the buffers belong to autograd now
        # grad_total stays fp32: the multiply runs in fp32 and rounds once to the gradients' dtype
        if grad_hidden is not None:
            grad_hidden.mul_(grad_total)
            if ctx.reduce_hidden_grad and ctx.group is not None:
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        if grad_weight is not None:
            grad_weight.mul_(grad_total)
        return (grad_hidden, grad_weight) + (None,) * 13


def _pick_epilogue(backend: str, device: torch.device):
    if pick_kl_backend(backend, device) == "triton":
        from .kd_linear_triton import TritonTileEpilogue

        return TritonTileEpilogue
    return TorchTileEpilogue


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, kind, temperature):
    if kind not in KL_LOSSES:
        raise ValueError(f"kind must be one of {KL_LOSSES} for the fused output-layer loss, got {kind!r} "
                         f"(MSE / cosine need the logits: use distill.losses.logit_kd_loss)")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, hidden, weight in (("student", student_hidden, student_weight),
                                 ("teacher", teacher_hidden, teacher_weight)):
        if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
            raise ValueError(f"{name} hidden states ({hidden.dtype}) and output weight ({weight.dtype}) must be "
                             f"floating point of the same dtype (cast the hidden states to the weight's dtype)")
        if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"{name} output weight {tuple(weight.shape)} does not match hidden states "
                             f"{tuple(hidden.shape)}: expected [vocab/TP, {hidden.shape[-1]}]")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher output weights cover {student_weight.shape[0]} and "
                         f"{teacher_weight.shape[0]} vocabulary rows: both must be this rank's shard of the "
                         f"same (padded) vocabulary")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
                         f"{tuple(teacher_hidden.shape)} must cover the same tokens")


def _gather_sequence(hidden: torch.Tensor, group) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)


def linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_weight: torch.Tensor, kind: str = "forward_kl", *, temperature: float = 1.0,
                   scale_by_temperature_squared: bool = True, loss_mask: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None, kd_weight: float = 1.0, lm_weight: float = 0.0,
                   group: GroupArg = TP_GROUP, sequence_parallel: bool = False, backend: str = "auto",
                   chunk_tokens: Optional[int] = None) -> LinearKDOutput:
    """KD (and optional LM) loss of one micro-batch from final hidden states and output-layer weights.

    student_hidden / teacher_hidden: [..., H_s] / [..., H_t] final (post-norm) hidden states, e.g. megatron's
        [s, b, h]; with ``sequence_parallel`` this rank's [s/TP, b, h] sequence shard (gathered here).
    student_weight / teacher_weight: this TP rank's [V/TP, H] output-layer (or tied embedding) weight.
    loss_mask: the (gathered) hidden states' leading shape; nonzero entries count, a float mask weights the
        tokens. Masked tokens get exactly 0 loss and 0 gradient.
    labels: int, same shape, targets for the student's cross-entropy (full-vocabulary ids; ignored where
        masked); required when lm_weight > 0, optional otherwise (the LM loss is then only reported).
    group: the TP group the vocabulary is split over (TP_GROUP = megatron's when initialised, None = whole
        vocabulary). Gradients reach the student hidden states and weight through ``loss`` only.
    """
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, kind, temperature)
    if kd_weight < 0 or lm_weight < 0:
        raise ValueError(f"kd_weight and lm_weight must be >= 0, got {kd_weight} and {lm_weight}")
    if lm_weight and labels is None:
        raise ValueError("lm_weight > 0 needs labels (the next-token ids)")
    process_group = resolve_group(group)
    if sequence_parallel and process_group is not None:
        student_hidden = _gather_sequence(student_hidden, process_group)
        with torch.no_grad():
            teacher_hidden = _gather_sequence(teacher_hidden.detach(), process_group)
    leading = student_hidden.shape[:-1]
    device = student_hidden.device
    n = leading.numel()
    student_flat = student_hidden.reshape(n, student_hidden.shape[-1]).contiguous()
    if not torch.is_grad_enabled():  # validation: the forward's gradient GEMMs and buffers would be wasted
        student_flat, student_weight = student_flat.detach(), student_weight.detach()
    teacher_flat = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1]).contiguous()
    if loss_mask is None:
        token_weight = torch.ones(n, dtype=torch.float32, device=device)
    else:
        if tuple(loss_mask.shape) != tuple(leading):
            raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)} but the hidden states' token dims are "
                             f"{tuple(leading)}; pass one entry per token (in the hidden states' order)")
        token_weight = loss_mask.reshape(-1).to(device=device, dtype=torch.float32)
    local_vocab = student_weight.shape[0]
    labels_local = None
    if labels is not None:
        if tuple(labels.shape) != tuple(leading) or labels.is_floating_point():
            raise ValueError(f"labels must be integer ids with the hidden states' token shape {tuple(leading)}, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        tp_size = 1 if process_group is None else dist.get_world_size(process_group)
        tp_rank = 0 if process_group is None else dist.get_rank(process_group)
        flat_labels = labels.reshape(-1).to(device=device, dtype=torch.int64)
        out_of_range = (flat_labels < 0) | (flat_labels >= local_vocab * tp_size)
        if bool((out_of_range & (token_weight != 0)).any()):  # one host sync per call
            raise ValueError(f"labels of counted tokens must lie in [0, {local_vocab * tp_size}) (the padded "
                             f"vocabulary); mask the tokens whose label is an ignore index")
        labels_local = flat_labels - tp_rank * local_vocab
    chunk = chunk_tokens if chunk_tokens is not None else max(1, DEFAULT_CHUNK_LOGITS // max(1, local_vocab))
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if chunk_tokens is None and chunk >= 128:
        chunk -= chunk % 64  # GEMM-friendly row counts
    epilogue = _pick_epilogue(backend, device)
    reduce_hidden_grad = process_group is not None and not sequence_parallel
    total, kd, lm = FusedLinearKD.apply(student_flat, student_weight, teacher_flat, teacher_weight.detach(),
                                        token_weight, labels_local, float(kd_weight), float(lm_weight),
                                        float(temperature), bool(scale_by_temperature_squared),
                                        kind == "reverse_kl", process_group, reduce_hidden_grad, chunk, epilogue)
    return LinearKDOutput(total, kd.reshape(leading), lm.reshape(leading) if labels_local is not None else None)
