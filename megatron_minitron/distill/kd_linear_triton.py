"""Triton tile epilogue of the KD loss fused with the output layer (``distill/kd_linear.py``).

The logits GEMMs of each token chunk stay in cuBLAS (they are ~90% of the work at Llama shapes); these
kernels replace what torch would do between them with fp32 [chunk, V/TP] temporaries:

* ``_stats_kernel``: one program per token row streams the chunk's student and teacher logits in
  ``BLOCK``-column steps with online (running max, rescaled sum-exp) statistics for both distributions, the
  KL cross term, and for the LM loss the target logit and, at tau != 1, the student's tau = 1 statistics.
  Output layout as ``distill.kd_linear`` (``stats_rows`` / ``sum_owners``), combined over TP by torch.
* ``_grad_kernel``: one pass per row writes d loss / d z_s = kd_scale * dKL/da + lm_scale * (p_1 - onehot)
  over the student logits *in place* (each program reads a block before writing the same block), in the
  logits' dtype, ready for the dgrad / wgrad GEMMs. Rows of zero scale (masked) get exact zeros.

The KL part of both kernels is ``kl_triton``'s per-block device functions (``online_kl_block``,
``kl_grad_block``), the same as the logits-path kernels run.
A zero-probability term counts 0 (never 0 * inf or (-inf) - (-inf)), as in ``kl_torch.weighted_by_probability``.
On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before triton is first imported), as the
tests do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kinds import stats_rows
from ..kernels.triton_support import check_interpretable
from .kl_triton import kl_grad_block, online_kl_block

DEFAULT_BLOCK = 2048
DEFAULT_NUM_WARPS = 8


@triton.jit
def _stats_kernel(student_ptr, teacher_ptr, labels_ptr, max_ptr, sums_ptr, n_rows, n_cols,
                  student_stride, teacher_stride, inv_tau,
                  REVERSE: tl.constexpr, LM: tl.constexpr, LM_SEPARATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 at large chunks x 128k vocab
    student_row = student_ptr + row * student_stride
    teacher_row = teacher_ptr + row * teacher_stride
    neg_inf = float("-inf")
    m_s = neg_inf
    m_t = neg_inf
    m_1 = neg_inf
    sum_s = 0.0
    sum_t = 0.0
    sum_1 = 0.0
    cross = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        z = tl.load(student_row + cols, mask=valid, other=neg_inf).to(tl.float32)
        a = z * inv_tau
        b = tl.load(teacher_row + cols, mask=valid, other=neg_inf).to(tl.float32) * inv_tau
        m_s, m_t, sum_s, sum_t, cross = online_kl_block(a, b, m_s, m_t, sum_s, sum_t, cross, REVERSE)
        if LM_SEPARATE:  # the LM softmax is at tau = 1
            new_m_1 = tl.maximum(m_1, tl.max(z, axis=0))
            shift_1 = tl.where(new_m_1 == neg_inf, 0.0, new_m_1)
            rescale_1 = tl.where(m_1 == neg_inf, 0.0, tl.exp(m_1 - shift_1))
            sum_1 = sum_1 * rescale_1 + tl.sum(tl.exp(z - shift_1), axis=0)
            m_1 = new_m_1
    tl.store(max_ptr + row, m_s)
    tl.store(max_ptr + n_rows + row, m_t)
    tl.store(sums_ptr + row, sum_s)
    tl.store(sums_ptr + n_rows + row, sum_t)
    tl.store(sums_ptr + 2 * n_rows + row, cross)
    if LM:
        label = tl.load(labels_ptr + row)
        local = (label >= 0) & (label < n_cols)
        target = tl.load(student_row + tl.where(local, label, 0)).to(tl.float32)
        target = tl.where(local, target, 0.0)
        if LM_SEPARATE:
            tl.store(max_ptr + 2 * n_rows + row, m_1)  # row 3 of max stays the zeros torch allocated
            tl.store(sums_ptr + 3 * n_rows + row, sum_1)
            tl.store(sums_ptr + 4 * n_rows + row, target)
        else:
            tl.store(sums_ptr + 3 * n_rows + row, target)


@triton.jit
def _grad_kernel(student_ptr, teacher_ptr, labels_ptr, grad_ptr, lse_s_ptr, lse_t_ptr, kl_ptr, kd_scale_ptr,
                 lse_1_ptr, lm_scale_ptr, n_cols, student_stride, teacher_stride, grad_stride, inv_tau,
                 REVERSE: tl.constexpr, LM: tl.constexpr, LM_SEPARATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_stride
    teacher_row = teacher_ptr + row * teacher_stride
    grad_row = grad_ptr + row * grad_stride
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    kl = tl.load(kl_ptr + row)
    kd_scale = tl.load(kd_scale_ptr + row)  # w * kd_weight * loss_scale / tau, 0 on masked rows
    lm_scale = 0.0
    lse_1 = 0.0
    label = -1
    if LM:
        lm_scale = tl.load(lm_scale_ptr + row)
        lse_1 = tl.load(lse_1_ptr + row)
        label = tl.load(labels_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        z = tl.load(student_row + cols, mask=valid, other=0.0).to(tl.float32)
        a = z * inv_tau
        b = tl.load(teacher_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau
        d_kl, p_s = kl_grad_block(a, b, lse_s, lse_t, kl, REVERSE)
        d = tl.where(kd_scale != 0.0, d_kl * kd_scale, 0.0)
        if LM:
            if LM_SEPARATE:
                p_1 = tl.exp(z - lse_1)
            else:
                p_1 = p_s  # tau = 1: the same softmax
            d_lm = p_1 - tl.where(cols == label, 1.0, 0.0)
            d += tl.where(lm_scale != 0.0, d_lm * lm_scale, 0.0)
        tl.store(grad_row + cols, d.to(grad_ptr.dtype.element_ty), mask=valid)


def _block_for(n_cols: int) -> int:
    return min(DEFAULT_BLOCK, triton.next_power_of_2(max(1, n_cols)))


class TritonTileEpilogue:
    """Same contract as ``distill.kd_linear.TorchTileEpilogue``; inputs are [rows, V/TP] with unit column stride."""

    block = None  # tests set a small power of two to exercise several blocks per row

    @classmethod
    def partial_stats(cls, student, teacher, labels_local, inv_tau, reverse, lm_mode):
        check_interpretable(student, _stats_kernel, "fused-linear KD kernels")
        n, v = student.shape
        max_rows, sum_rows = stats_rows(lm_mode)
        local_max = torch.zeros(max_rows, n, dtype=torch.float32, device=student.device)
        local_sums = torch.empty(sum_rows, n, dtype=torch.float32, device=student.device)
        if n:
            labels = labels_local.contiguous() if labels_local is not None else local_max  # unused without LM
            _stats_kernel[(n,)](student, teacher, labels, local_max, local_sums, n, v, student.stride(0),
                                teacher.stride(0), inv_tau, REVERSE=reverse, LM=lm_mode is not None,
                                LM_SEPARATE=lm_mode == "separate", BLOCK=cls.block or _block_for(v),
                                num_warps=DEFAULT_NUM_WARPS)
        return local_max, local_sums

    @classmethod
    def grad_(cls, student, teacher, labels_local, lse_s, lse_t, kl, kd_scale, lse_1, lm_scale, inv_tau, reverse):
        n, v = student.shape
        lm = lm_scale is not None
        if n:
            contiguous = [t.contiguous() for t in (lse_s, lse_t, kl, kd_scale)]
            extra = [t.contiguous() for t in (labels_local, lse_1, lm_scale)] if lm else [kd_scale] * 3
            _grad_kernel[(n,)](student, teacher, extra[0], student, *contiguous, extra[1], extra[2], v,
                               student.stride(0), teacher.stride(0), student.stride(0), inv_tau,
                               REVERSE=reverse, LM=lm, LM_SEPARATE=lm and inv_tau != 1.0,
                               BLOCK=cls.block or _block_for(v), num_warps=DEFAULT_NUM_WARPS)
        return student
