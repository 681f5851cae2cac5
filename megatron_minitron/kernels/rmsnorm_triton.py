"""Fused Triton RMSNorm (forward + backward) for the local-spec student layer, without Transformer Engine.

Forward: one program per row loads the row once, accumulates sum(x^2) in fp32, writes
y = x * rstd * w in the input's dtype and keeps rstd ([rows] fp32) for the backward. Backward: each
program walks a contiguous slice of rows, writes dx = rstd * (w*dy - xhat * mean(w*dy * xhat)) per row and
accumulates its share of dw = sum_rows dy * xhat in fp32 registers; torch sums the [programs, N] partials.
Zero-centred gamma (Nemotron) is applied in the kernel as w + 1 (in fp32), so the parameter keeps its
stored value and its gradient is unchanged (d(w+1)/dw = 1).

The math is ``torch.nn.functional.rms_norm``'s (fp32 statistics, one rounding to the input dtype), which
``model.layers.Norm`` uses unfused. On CPU tensors the kernels run only under ``TRITON_INTERPRET=1``
(set before triton is first imported); that is how the unit tests run them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import check_interpretable

MAX_FUSED_HIDDEN = 65536  # one row must fit one program's registers / shared memory
BACKWARD_ROWS_PER_PROGRAM = 64  # rows whose dw partials one backward program sums before writing


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, ZERO_CENTERED: tl.constexpr,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w = w + 1.0
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * n_cols + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
                              rows_per_program, ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w = w + 1.0
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        if row < n_rows:
            offset = row.to(tl.int64) * n_cols
            x = tl.load(x_ptr + offset + cols, mask=valid, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offset + cols, mask=valid, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            wdy = w * dy
            mean_term = tl.sum(wdy * xhat, axis=0) / n_cols
            dx = rstd * (wdy - xhat * mean_term)
            tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=valid)
            dw += dy * xhat
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=valid)


def _block_for(n_cols: int) -> int:
    if n_cols > MAX_FUSED_HIDDEN:
        raise ValueError(f"fused RMSNorm supports hidden sizes up to {MAX_FUSED_HIDDEN}, got {n_cols}: "
                         "set train.fused_kernels=false")
    return triton.next_power_of_2(max(1, n_cols))


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


class TritonRMSNorm(torch.autograd.Function):
    """RMSNorm over the last dimension of ``x`` (any leading shape) with weight [hidden]. Also Qwen3's q/k
    layernorms: x is then a [s, b, heads, head_dim] view into linear_qkv's output (not contiguous; under GQA the
    query's rows have no single stride), which is copied into contiguous rows first."""

    @staticmethod
    def forward(ctx, x, weight, eps, zero_centered_gamma):
        check_interpretable(x, _rms_norm_forward_kernel, "RMSNorm kernel")
        n_cols = x.shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}, expected ({n_cols},)")
        block = _block_for(n_cols)
        rows = x.reshape(-1, n_cols).contiguous()
        n_rows = rows.shape[0]
        y = torch.empty_like(rows)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        w = weight.contiguous()
        if n_rows:
            _rms_norm_forward_kernel[(n_rows,)](rows, w, y, rstd, n_cols, float(eps),
                                                ZERO_CENTERED=bool(zero_centered_gamma), BLOCK=block,
                                                num_warps=_num_warps(block))
        ctx.save_for_backward(rows, w, rstd)
        ctx.zero_centered = bool(zero_centered_gamma)
        ctx.block = block
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        rows, w, rstd = ctx.saved_tensors
        n_rows, n_cols = rows.shape
        dy = grad_y.reshape(n_rows, n_cols).contiguous()
        dx = torch.empty_like(rows)
        n_programs = max(1, triton.cdiv(n_rows, BACKWARD_ROWS_PER_PROGRAM))
        dw_partial = torch.zeros(n_programs, n_cols, dtype=torch.float32, device=rows.device)
        if n_rows:
            _rms_norm_backward_kernel[(n_programs,)](dy, rows, w, rstd, dx, dw_partial, n_rows, n_cols,
                                                     BACKWARD_ROWS_PER_PROGRAM,
                                                     ZERO_CENTERED=ctx.zero_centered, BLOCK=ctx.block,
                                                     num_warps=_num_warps(ctx.block))
        dw = dw_partial.sum(0).to(w.dtype)
        return dx.view(ctx.x_shape), dw, None, None


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    zero_centered_gamma: bool = False) -> torch.Tensor:
    """``F.rms_norm(x, (hidden,), weight (+1 if zero_centered_gamma), eps)`` through the fused kernels."""
    return TritonRMSNorm.apply(x, weight, float(eps), bool(zero_centered_gamma))
