"""Vocab-parallel forward / reverse KL between student and teacher logits: the chunked pure-torch path.

Notation (per token, over the full vocabulary of size V, shards of V/TP on each TP rank):
    a = z_s / tau, b = z_t / tau, lse_x = log sum_v exp(x_v), p_s = softmax(a), p_t = softmax(b)
    forward KL(p_t || p_s) = sum_v p_t (b - a) - lse_t + lse_s
    reverse KL(p_s || p_t) = sum_v p_s (a - b) - lse_s + lse_t
Gradients w.r.t. the student logits z_s (teacher detached), before the optional tau^2 factor:
    forward: (p_s - p_t) / tau
    reverse: p_s * (log p_s - log p_t - KL_rev) / tau
(reverse: d/da_j sum_v p_v d_v with d = log p_s - log p_t; the term sum_v p_v d(log p_v)/da_j vanishes,
 and dp_v/da_j = p_v (delta_vj - p_j) gives p_j (d_j - sum_v p_v d_v).)

Memory: the inputs stay in their own dtype; fp32 is used only for one chunk of tokens at a time, so peak
extra memory is a few ``chunk x V/TP`` fp32 temporaries plus ``[tokens]``-sized statistics, plus the
gradient itself (input dtype). The backward recomputes the softmaxes from the saved inputs and the saved
per-token log-sum-exps: it needs no collective.
"""
from __future__ import annotations

from typing import Optional

import torch

from .vocab_parallel import chunk_size_for, combine_partial_softmax_stats, fp32_copy, safe_shift

# rows of the local-sums tensor and the distribution (0 = student, 1 = teacher) whose max shifts them
_SUM_OWNERS_FORWARD = [0, 1, 1]   # S_s, S_t, sum exp(b - m_t) (b - a)
_SUM_OWNERS_REVERSE = [0, 1, 0]   # S_s, S_t, sum exp(a - m_s) (a - b)


def weighted_by_probability(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``weight * value`` with a term of zero weight counted as 0 even where ``value`` is +-inf or NaN: a
    token of probability 0 (logit -inf: a padded or masked vocabulary, top-k teacher logits) adds nothing
    to a KL, whereas IEEE arithmetic would make 0 * inf (and (-inf) - (-inf)) NaN."""
    return torch.where(weight > 0, weight * value, torch.zeros_like(weight))


def kl_from_global_stats(global_max: torch.Tensor, global_sums: torch.Tensor,
                         reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token KL and the two log-sum-exps from full-vocabulary statistics (shared with the Triton path)."""
    sum_s, sum_t, cross = global_sums[0], global_sums[1], global_sums[2]
    lse_s = global_max[0] + torch.log(sum_s)
    lse_t = global_max[1] + torch.log(sum_t)
    if reverse:
        kl = cross / sum_s - lse_s + lse_t
    else:
        kl = cross / sum_t - lse_t + lse_s
    return kl, lse_s, lse_t


def local_partial_stats(student: torch.Tensor, teacher: torch.Tensor, inv_tau: float, reverse: bool,
                        chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shard statistics for every token: ([2, N] local maxima, [3, N] sums shifted by them)."""
    n = student.shape[0]
    local_max = torch.empty(2, n, dtype=torch.float32, device=student.device)
    local_sums = torch.empty(3, n, dtype=torch.float32, device=student.device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        a = fp32_copy(student[start:end]).mul_(inv_tau)
        b = fp32_copy(teacher[start:end]).mul_(inv_tau)
        m_s, m_t = a.amax(dim=-1), b.amax(dim=-1)
        exp_s = torch.exp(a - safe_shift(m_s)[:, None])
        exp_t = torch.exp(b - safe_shift(m_t)[:, None])
        diff = a.sub_(b)  # a - b, reusing a's buffer
        local_max[0, start:end], local_max[1, start:end] = m_s, m_t
        local_sums[0, start:end] = exp_s.sum(dim=-1)
        local_sums[1, start:end] = exp_t.sum(dim=-1)
        if reverse:
            local_sums[2, start:end] = weighted_by_probability(exp_s, diff).sum(dim=-1)
        else:
            local_sums[2, start:end] = -weighted_by_probability(exp_t, diff).sum(dim=-1)
    return local_max, local_sums


def kl_grad_chunk(a: torch.Tensor, b: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
                  kl: torch.Tensor, reverse: bool) -> torch.Tensor:
    """d KL / d a for one chunk (fp32; a and b are the temperature-scaled logits; a's buffer is reused)."""
    log_p_s = a.sub_(lse_s[:, None])
    log_p_t = b.sub_(lse_t[:, None])
    p_s = torch.exp(log_p_s)
    if reverse:
        return weighted_by_probability(p_s, log_p_s.sub_(log_p_t).sub_(kl[:, None]))
    return p_s.sub_(torch.exp(log_p_t))


def kl_forward(ctx, partial_stats, student, teacher, mask, temperature: float,
               scale_by_temperature_squared: bool, reverse: bool, group, block: int) -> torch.Tensor:
    """The forward both backends share: this shard's statistics (``partial_stats``: the torch chunked
    pass or the Triton kernel), their TP combination, the per-token KL, and what the backward needs."""
    inv_tau = 1.0 / temperature
    local_max, local_sums = partial_stats(student, teacher, inv_tau, reverse, block)
    owners = _SUM_OWNERS_REVERSE if reverse else _SUM_OWNERS_FORWARD
    global_max, global_sums = combine_partial_softmax_stats(local_max, local_sums, owners, group)
    kl, lse_s, lse_t = kl_from_global_stats(global_max, global_sums, reverse)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    ctx.save_for_backward(student, teacher, lse_s, lse_t, kl, mask)
    ctx.inv_tau, ctx.reverse = inv_tau, reverse
    ctx.loss_scale = temperature ** 2 if scale_by_temperature_squared else 1.0
    return kl * ctx.loss_scale


class ChunkedKLDivergence(torch.autograd.Function):
    """Per-token vocab-parallel KL with an analytic, chunked backward. Inputs are flat [N, V/TP]."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
                temperature: float, scale_by_temperature_squared: bool, reverse: bool, group, chunk: int):
        ctx.chunk = chunk
        return kl_forward(ctx, local_partial_stats, student, teacher, mask, temperature,
                          scale_by_temperature_squared, reverse, group, chunk)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        student, teacher, lse_s, lse_t, kl, mask = ctx.saved_tensors
        # chain rule: d loss/d z_s = loss_scale * (1/tau) * dKL/da
        row_scale = grad_loss.float() * (ctx.loss_scale * ctx.inv_tau)
        if mask is not None:
            row_scale = torch.where(mask, row_scale, torch.zeros_like(row_scale))
        grad = torch.empty_like(student)
        n = student.shape[0]
        for start in range(0, n, ctx.chunk):
            end = min(n, start + ctx.chunk)
            a = fp32_copy(student[start:end]).mul_(ctx.inv_tau)
            b = fp32_copy(teacher[start:end]).mul_(ctx.inv_tau)
            d = kl_grad_chunk(a, b, lse_s[start:end], lse_t[start:end], kl[start:end], ctx.reverse)
            d.mul_(row_scale[start:end, None])
            if mask is not None:  # exact zeros even if a masked row holds non-finite logits
                d = torch.where(mask[start:end, None], d, torch.zeros_like(d))
            grad[start:end] = d
        return grad, None, None, None, None, None, None, None


def chunked_kl(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor], temperature: float,
               scale_by_temperature_squared: bool, reverse: bool, group,
               chunk_tokens: Optional[int]) -> torch.Tensor:
    """Flat [N, V/TP] inputs -> per-token loss [N] (fp32); see the module docstring."""
    chunk = chunk_size_for(student.shape[0], student.shape[1], chunk_tokens)
    return ChunkedKLDivergence.apply(student, teacher.detach(), mask, float(temperature),
                                     bool(scale_by_temperature_squared), bool(reverse), group, chunk)
