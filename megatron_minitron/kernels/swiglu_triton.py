"""Fused Triton SwiGLU (forward + backward) for the local-spec student MLP, without Transformer Engine.

Input ``y`` [..., 2F] is megatron's fc1 output for a gated linear unit: gate = y[..., :F], up = y[..., F:]
(what ``torch.chunk(y, 2, -1)`` in megatron's ``MLP.forward`` gives; under tensor parallelism each rank's
fc1 output is its own [gate shard | up shard], so the split is the same on every rank). Output
silu(gate) * up [..., F].

Forward: each program loads one block of a row's gate and up once, forms silu(gate) * up in fp32 and
rounds once to the input dtype. Backward: recomputes sigmoid(gate) from the saved input (nothing else is
kept) and writes d gate = dout * up * s * (1 + gate * (1 - s)), d up = dout * gate * s into one [..., 2F]
buffer, so no concatenation follows. megatron's unfused path rounds after silu and after the product
(and its ``bias_swiglu_impl`` computes in the input dtype); in fp32 the results agree to rounding.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before triton is first imported);
that is how the unit tests run them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import check_interpretable

MAX_BLOCK = 1024  # columns one program handles; wider rows are split over a second grid axis


@triton.jit
def _gate_and_up(y_ptr, n_half, BLOCK: tl.constexpr):
    """This program's block of one row of fc1's output [gate | up]: (row, columns, mask, row offset, gate, up),
    the halves in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_half
    base = row * 2 * n_half
    gate = tl.load(y_ptr + base + cols, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(y_ptr + base + n_half + cols, mask=valid, other=0.0).to(tl.float32)
    return row, cols, valid, base, gate, up


@triton.jit
def _swiglu_forward_kernel(y_ptr, out_ptr, n_half, BLOCK: tl.constexpr):
    row, cols, valid, base, gate, up = _gate_and_up(y_ptr, n_half, BLOCK)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * n_half + cols, out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _swiglu_backward_kernel(dout_ptr, y_ptr, dy_ptr, n_half, BLOCK: tl.constexpr):
    row, cols, valid, base, gate, up = _gate_and_up(y_ptr, n_half, BLOCK)
    dout = tl.load(dout_ptr + row * n_half + cols, mask=valid, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dout * gate * sig
    out_ty = dy_ptr.dtype.element_ty
    tl.store(dy_ptr + base + cols, d_gate.to(out_ty), mask=valid)
    tl.store(dy_ptr + base + n_half + cols, d_up.to(out_ty), mask=valid)


def _grid(n_rows: int, n_half: int):
    block = min(MAX_BLOCK, triton.next_power_of_2(max(1, n_half)))
    return (n_rows, triton.cdiv(n_half, block)), block


def _num_warps(block: int) -> int:
    return 4 if block <= 512 else 8


class TritonSwiGLU(torch.autograd.Function):
    """silu(y[..., :F]) * y[..., F:] for ``y`` [..., 2F] (any leading shape)."""

    @staticmethod
    def forward(ctx, y):
        check_interpretable(y, _swiglu_forward_kernel, "SwiGLU kernel")
        width = y.shape[-1]
        if width % 2:
            raise ValueError(f"fused SwiGLU needs an even last dimension (gate and up halves), got {width}")
        n_half = width // 2
        rows = y.reshape(-1, width).contiguous()
        out = torch.empty(rows.shape[0], n_half, dtype=y.dtype, device=y.device)
        grid, block = _grid(rows.shape[0], n_half)
        if rows.numel():
            _swiglu_forward_kernel[grid](rows, out, n_half, BLOCK=block, num_warps=_num_warps(block))
        ctx.save_for_backward(rows)
        ctx.y_shape = y.shape
        return out.view(*y.shape[:-1], n_half)

    @staticmethod
    def backward(ctx, grad_out):
        (rows,) = ctx.saved_tensors
        n_half = rows.shape[1] // 2
        dout = grad_out.reshape(-1, n_half).contiguous()
        dy = torch.empty_like(rows)
        grid, block = _grid(rows.shape[0], n_half)
        if rows.numel():
            _swiglu_backward_kernel[grid](dout, rows, dy, n_half, BLOCK=block, num_warps=_num_warps(block))
        return dy.view(ctx.y_shape)


def triton_swiglu(y: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` with ``gate, up = torch.chunk(y, 2, -1)``, through the fused kernels."""
    return TritonSwiGLU.apply(y)
