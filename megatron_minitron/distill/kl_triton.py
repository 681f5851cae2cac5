"""Fused Triton kernels for the vocab-parallel forward / reverse KL distillation loss.

Forward kernel: one program per token row streams the local vocab shard in blocks of ``BLOCK`` columns,
keeping online (running max, rescaled sum-exp) statistics for student and teacher plus the cross term
(forward: sum exp(b - m_t)(b - a); reverse: sum exp(a - m_s)(a - b)), and writes them as [tokens]-sized
partial statistics. torch then combines the shards (one MAX + one SUM all-reduce, shared with the torch
path in ``distill.vocab_parallel``) and forms the per-token KL. Backward kernel: one pass per row that
recomputes p_s and p_t from the inputs and the saved log-sum-exps and writes d loss / d z_s directly in
the student's dtype. No fp32 ``[tokens, V]`` tensor exists at any point.

The math and notation are those of ``distill.kl_torch``. The per-block steps (``online_kl_block``,
``kl_grad_block``) are device functions shared with the fused output-layer epilogue
(``distill/kd_linear_triton.py``). On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set
before triton is first imported); that is how the unit tests run them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..kernels.triton_support import check_interpretable
from .kl_torch import kl_forward

DEFAULT_BLOCK = 2048
DEFAULT_NUM_WARPS = 8


@triton.jit
def online_kl_block(a, b, m_s, m_t, sum_s, sum_t, cross, REVERSE: tl.constexpr):
    """Fold one block of a row, a = z_s / tau and b = z_t / tau (-inf past the row end), into the running
    maxima m_s / m_t, the sum-exps shifted by them and the KL cross term (forward: sum exp(b - m_t)(b - a),
    kept negated; reverse: sum exp(a - m_s)(a - b)). Returns the five updated statistics.

    Keep the statement order: it decides which multiply-adds LLVM contracts into FMAs, and this order compiles
    to the same PTX as the kernels had when each spelled the step out (checked for every flag and dtype)."""
    neg_inf = float("-inf")
    new_m_s = tl.maximum(m_s, tl.max(a, axis=0))
    new_m_t = tl.maximum(m_t, tl.max(b, axis=0))
    # shift 0 while everything seen is -inf, so exp() never sees (-inf) - (-inf)
    shift_s = tl.where(new_m_s == neg_inf, 0.0, new_m_s)
    shift_t = tl.where(new_m_t == neg_inf, 0.0, new_m_t)
    rescale_s = tl.where(m_s == neg_inf, 0.0, tl.exp(m_s - shift_s))
    rescale_t = tl.where(m_t == neg_inf, 0.0, tl.exp(m_t - shift_t))
    exp_s = tl.exp(a - shift_s)
    exp_t = tl.exp(b - shift_t)
    a_minus_b = a - b
    sum_s = sum_s * rescale_s + tl.sum(exp_s, axis=0)
    sum_t = sum_t * rescale_t + tl.sum(exp_t, axis=0)
    # a zero-probability term (logit -inf: padded/masked vocabulary, top-k logits, past the row end)
    # adds 0, never 0 * inf or (-inf) - (-inf) = NaN
    if REVERSE:
        cross = cross * rescale_s + tl.sum(tl.where(exp_s > 0.0, exp_s * a_minus_b, 0.0), axis=0)
    else:
        cross = cross * rescale_t - tl.sum(tl.where(exp_t > 0.0, exp_t * a_minus_b, 0.0), axis=0)
    return new_m_s, new_m_t, sum_s, sum_t, cross


@triton.jit
def kl_grad_block(a, b, lse_s, lse_t, kl, REVERSE: tl.constexpr):
    """d KL / d a for one block given the row's full-vocabulary log-sum-exps and KL; also p_s (0 where the
    student logit is -inf, and then so is the reverse-KL gradient)."""
    log_p_s = a - lse_s
    log_p_t = b - lse_t
    p_s = tl.exp(log_p_s)
    if REVERSE:
        d = tl.where(p_s > 0.0, p_s * (log_p_s - log_p_t - kl), 0.0)
    else:
        d = p_s - tl.exp(log_p_t)
    return d, p_s


@triton.jit
def _kl_partial_stats_kernel(student_ptr, teacher_ptr, max_ptr, sums_ptr, n_rows, n_cols,
                             student_stride, teacher_stride, inv_tau,
                             REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 at 32k tokens x 128k vocab
    student_row = student_ptr + row * student_stride
    teacher_row = teacher_ptr + row * teacher_stride
    neg_inf = float("-inf")
    m_s = neg_inf
    m_t = neg_inf
    sum_s = 0.0
    sum_t = 0.0
    cross = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        a = tl.load(student_row + cols, mask=valid, other=neg_inf).to(tl.float32) * inv_tau
        b = tl.load(teacher_row + cols, mask=valid, other=neg_inf).to(tl.float32) * inv_tau
        m_s, m_t, sum_s, sum_t, cross = online_kl_block(a, b, m_s, m_t, sum_s, sum_t, cross, REVERSE)
    tl.store(max_ptr + row, m_s)
    tl.store(max_ptr + n_rows + row, m_t)
    tl.store(sums_ptr + row, sum_s)
    tl.store(sums_ptr + n_rows + row, sum_t)
    tl.store(sums_ptr + 2 * n_rows + row, cross)


@triton.jit
def _kl_grad_kernel(student_ptr, teacher_ptr, grad_ptr, lse_s_ptr, lse_t_ptr, kl_ptr, row_scale_ptr, n_cols,
                    student_stride, teacher_stride, grad_stride, inv_tau,
                    REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_stride
    teacher_row = teacher_ptr + row * teacher_stride
    grad_row = grad_ptr + row * grad_stride
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    kl = tl.load(kl_ptr + row)
    scale = tl.load(row_scale_ptr + row)  # grad_loss * loss_scale / tau, 0 on masked rows
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        a = tl.load(student_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau
        b = tl.load(teacher_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau
        d, _ = kl_grad_block(a, b, lse_s, lse_t, kl, REVERSE)
        d = tl.where(scale != 0.0, d * scale, 0.0)  # masked rows: exact zeros whatever their logits
        tl.store(grad_row + cols, d.to(grad_ptr.dtype.element_ty), mask=valid)


def kl_partial_stats(student: torch.Tensor, teacher: torch.Tensor, inv_tau: float, reverse: bool,
                     block: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_NUM_WARPS):
    """Per-shard statistics ([2, N] local maxima, [3, N] shifted sums), same layout as the torch path."""
    check_interpretable(student, _kl_partial_stats_kernel, "KD kernel")
    n, v = student.shape
    local_max = torch.empty(2, n, dtype=torch.float32, device=student.device)
    local_sums = torch.empty(3, n, dtype=torch.float32, device=student.device)
    if n:
        _kl_partial_stats_kernel[(n,)](student, teacher, local_max, local_sums, n, v, student.stride(0),
                                       teacher.stride(0), inv_tau, REVERSE=reverse, BLOCK=block,
                                       num_warps=num_warps)
    return local_max, local_sums


class TritonKLDivergence(torch.autograd.Function):
    """Per-token vocab-parallel KL on flat [N, V/TP] inputs (unit stride on the vocab dim)."""

    @staticmethod
    def forward(ctx, student, teacher, mask, temperature, scale_by_temperature_squared, reverse, group, block):
        ctx.block = block
        return kl_forward(ctx, kl_partial_stats, student, teacher, mask, temperature,
                          scale_by_temperature_squared, reverse, group, block)

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, lse_s, lse_t, kl, mask = ctx.saved_tensors
        row_scale = grad_loss.float() * (ctx.loss_scale * ctx.inv_tau)
        if mask is not None:
            row_scale = torch.where(mask, row_scale, torch.zeros_like(row_scale))
        row_scale = row_scale.contiguous()
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        n, v = student.shape
        if n:
            _kl_grad_kernel[(n,)](student, teacher, grad, lse_s, lse_t, kl, row_scale, v, student.stride(0),
                                  teacher.stride(0), grad.stride(0), ctx.inv_tau, REVERSE=ctx.reverse,
                                  BLOCK=ctx.block, num_warps=DEFAULT_NUM_WARPS)
        return grad, None, None, None, None, None, None, None


def triton_kl(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor], temperature: float,
              scale_by_temperature_squared: bool, reverse: bool, group,
              block: Optional[int] = None) -> torch.Tensor:
    """Flat [N, V/TP] inputs -> per-token loss [N] (fp32). ``block``: vocab columns per step (power of 2)."""
    if block is None:
        block = min(DEFAULT_BLOCK, triton.next_power_of_2(max(1, student.shape[1])))
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    return TritonKLDivergence.apply(student, teacher.detach(), mask, float(temperature),
                                    bool(scale_by_temperature_squared), bool(reverse), group, block)
