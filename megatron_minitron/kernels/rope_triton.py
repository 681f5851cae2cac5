"""Fused Triton rotary position embedding (forward + backward) in megatron's bshd layout.

Same result as megatron-core's ``apply_rotary_pos_emb`` on ``t`` [s, b, heads, d] with ``freqs``
[s, 1, 1, rot_dim] (its RotaryEmbedding output), non-interleaved (megatron's default): with
x = (x1, x2) the two halves of the first rot_dim channels, y1 = x1 cos1 - x2 sin1 and
y2 = x2 cos2 + x1 sin2; channels past rot_dim (rotary_percent < 1) pass through unchanged. cos / sin
are computed by torch exactly as megatron does (fp32 ``cos(freqs) * mscale`` rounded to t's dtype), so
the only difference from megatron is that the kernel forms y in fp32 and rounds once, where megatron's
bf16 path rounds after each product.

One program per (position, batch) row rotates a block of its heads (all of them at Llama shapes: 32 x 128
channels), reading each element once, writing it once, and cos / sin once per row (megatron's path
materialises the rotated half, two products and two concatenations). The input may be a strided view
(megatron's q and k are slices of the fused qkv output): the kernel reads it in place instead of copying. The backward is the same kernel
with the transposed rotation: d x1 = dy1 cos1 + dy2 sin2, d x2 = dy2 cos2 - dy1 sin1, the tail's gradient is dy.

Used by ``model.attention.FusedRoPESelfAttention`` (train.fused_kernels) on the training path. On CPU
tensors the kernel runs only under ``TRITON_INTERPRET=1`` (set before triton is first imported); that is
how the unit tests run it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import check_interpretable


# elements of one half-rotation tile (heads x rot_dim / 2) a program handles: all of a (position, batch)
# row's heads at Llama shapes (32 x 64), so cos / sin are read once per row, not once per head
MAX_TILE = 2048


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, batch, heads, stride_s, stride_b, stride_h, head_dim, half,
                 rot_dim, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_TAIL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # a (position, batch) row; axis 1 walks its heads in BLOCK_H blocks
    position = row // batch
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = (hs < heads)[:, None]
    # x may be a strided view (megatron's q / k are slices of the fused qkv output); y is contiguous
    x_rows = x_ptr + position * stride_s + (row % batch) * stride_b + hs[:, None] * stride_h
    y_rows = y_ptr + (row * heads + hs[:, None]) * head_dim
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < half
    valid = head_ok & col_ok[None, :]
    x1 = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + half + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    trig = cos_ptr + position * rot_dim + cols
    cos1 = tl.load(trig, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(trig + half, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    trig = sin_ptr + position * rot_dim + cols
    sin1 = tl.load(trig, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(trig + half, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ty = y_ptr.dtype.element_ty
    if BACKWARD:  # x holds dy: the transposed rotation
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(y_rows + cols[None, :], y1.to(out_ty), mask=valid)
    tl.store(y_rows + half + cols[None, :], y2.to(out_ty), mask=valid)
    if BLOCK_TAIL > 0:  # rotary_percent < 1: the remaining channels pass through
        tail = rot_dim + tl.arange(0, BLOCK_TAIL)
        in_tail = head_ok & (tail < head_dim)[None, :]
        tl.store(y_rows + tail[None, :], tl.load(x_rows + tail[None, :], mask=in_tail, other=0.0), mask=in_tail)


def _cos_sin(freqs: torch.Tensor, t: torch.Tensor, mscale: float):
    """[s, rot_dim] cos and sin in t's dtype, computed as megatron's _apply_rotary_pos_emb_bshd does."""
    s, _, _, d = t.shape
    if freqs.dim() != 4 or freqs.shape[0] != s or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise ValueError(f"fused RoPE expects freqs [s={s}, 1, 1, rot_dim], got {tuple(freqs.shape)}")
    rot_dim = freqs.shape[-1]
    if rot_dim % 2 or rot_dim > d:
        raise ValueError(f"fused RoPE: rot_dim {rot_dim} must be even and at most head_dim {d}")
    flat = freqs.reshape(s, rot_dim)
    cos = (torch.cos(flat) * mscale).to(t.dtype).contiguous()
    sin = (torch.sin(flat) * mscale).to(t.dtype).contiguous()
    return cos, sin


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotate ``x`` [s, b, h, d] (any strides with a unit last one; else copied first) into a contiguous y."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    s, b, h, d = x.shape
    rot_dim = cos.shape[1]
    y = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    if s * b * h:
        tail = d - rot_dim
        block_half = triton.next_power_of_2(max(1, rot_dim // 2))
        block_h = min(triton.next_power_of_2(h), max(1, MAX_TILE // block_half))
        tile = block_h * block_half
        _rope_kernel[(s * b, triton.cdiv(h, block_h))](
            x, cos, sin, y, b, h, x.stride(0), x.stride(1), x.stride(2), d, rot_dim // 2, rot_dim,
            BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half,
            BLOCK_TAIL=triton.next_power_of_2(tail) if tail else 0,
            num_warps=8 if tile >= 2048 else 4 if tile >= 512 else 2 if tile >= 128 else 1)  # ~8 per thread
    return y


class TritonRotaryEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(t, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_y):
        cos, sin = ctx.saved_tensors
        return _launch(grad_y, cos, sin, backward=True), None, None


def triton_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0,
                                rotary_interleaved: bool = False) -> torch.Tensor:
    """megatron's ``apply_rotary_pos_emb(t, freqs, config)`` for bshd inputs (no packed sequences)."""
    if rotary_interleaved:
        raise ValueError("fused RoPE supports the non-interleaved layout only (rotary_interleaved=false)")
    if t.dim() != 4:
        raise ValueError(f"fused RoPE expects t [s, b, heads, head_dim], got {tuple(t.shape)}")
    check_interpretable(t, _rope_kernel, "RoPE kernel")
    cos, sin = _cos_sin(freqs.detach(), t, float(mscale))
    return TritonRotaryEmbedding.apply(t, cos, sin)
