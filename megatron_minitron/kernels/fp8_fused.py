"""Activation quantization fused into the kernels that produce the activations (FP8 inference teacher).

Quantizing an activation in a separate pass reads it back from HBM and costs about what FP8 saves in the
GEMM, so each producer here reads its bf16/fp32 input once and writes e4m3 rows plus one fp32 scale per row
(per token): exactly ``torch._scaled_mm``'s row-wise operand (scale_a [M, 1]). Per-row scaling is what makes
a single kernel possible: a row's amax is known once the program that owns the row has seen it, with no
global amax pass. Producers: RMSNorm/LayerNorm, SwiGLU, the attention output (fused with megatron's
[b, heads, s, d] -> [s, b, heads*d] transpose), and plain rows.

Each Triton program owns one row and walks it in ``BLOCK``-wide chunks: the first pass(es) compute the
statistics and the row amax of the *output* y, the last pass recomputes y from the input (the row is
L1/L2-resident by then, so HBM traffic is one read plus the fp8 write) and stores ``q = y / scale``.
Numerics are those of ``kernels.fp8.quantize_fp8(y, "token")``: scale = amax / 448 in fp32 (1 for an
all-zero row), y computed in fp32. The torch functions ``_*_torch`` are the reference and the CPU path.
On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before this module is imported).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .fp8 import E4M3, quantize_fp8

try:  # the teacher imports this module unconditionally; without triton only the torch path exists
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

BACKENDS = ("auto", "triton", "torch")
MAX_BLOCK = 16384  # a row up to this wide is held in registers and read once (Llama-3.1-8B's FFN: 14336)
NORM_KINDS = ("RMSNorm", "LayerNorm")
E4M3_MIN_NORMAL = 2.0 ** -6
# fp32 values in [2^14, 2^15) are spaced 2^-9 apart, e4m3's subnormal spacing: adding and subtracting
# 1.5 * 2^14 rounds a subnormal-range value to the e4m3 grid with the FPU's round-half-even
SUBNORMAL_MAGIC = 24576.0


def round_to_e4m3_grid(t: torch.Tensor) -> torch.Tensor:
    """fp32 values in [-448, 448] rounded (nearest, ties to even) to e4m3-representable fp32 values.

    Same bit trick as the kernels' ``_round_to_e4m3_grid``; exists to test that trick against torch's cast.
    Normal range: e4m3 keeps 3 of fp32's 23 mantissa bits, so round the low 20 bits away in the integer
    representation (a carry into the exponent is the correct result). The sign bit is untouched: the
    magnitude bits cannot carry into it below inf."""
    t = t.float()
    bits = t.view(torch.int32)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF).view(torch.float32)
    magnitude = t.abs()
    subnormal = (magnitude + SUBNORMAL_MAGIC) - SUBNORMAL_MAGIC
    subnormal = (subnormal.view(torch.int32) | ((bits >> 31) << 31)).view(torch.float32)  # v's sign, -0.0 too
    return torch.where(magnitude < E4M3_MIN_NORMAL, subnormal, normal)


# ---------------------------------------------------------------------------------------------------------
# torch reference (fp32 math, then kernels.fp8.quantize_fp8 per row)

def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] with unit stride along K (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _norm_torch(x2, gamma, bias, eps, kind):
    x = x2.float()
    if kind == "RMSNorm":
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        return quantize_fp8((x * gamma) * rstd, "token")  # the kernel's order: amax = rstd * max|x * g|
    centered = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    y = (centered * rstd) * gamma
    return quantize_fp8(y if bias is None else y + bias, "token")


def _swiglu_torch(x2):
    gate, up = torch.chunk(x2.float(), 2, dim=-1)
    return quantize_fp8(F.silu(gate) * up, "token")


def _attention_output_torch(out):
    b, heads, s, d = out.shape
    return quantize_fp8(out.float().permute(2, 0, 1, 3).reshape(s * b, heads * d), "token")


# ---------------------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:
    @triton.jit
    def _round_to_e4m3_grid(v):
        # the interpreter's fp32 -> float8e4nv cast is wrong when rounding carries into the exponent: round
        # here, exactly (see round_to_e4m3_grid), so that the cast only changes the format, on GPU and CPU
        bits = v.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        magnitude = tl.abs(v)
        subnormal = (magnitude + 24576.0) - 24576.0  # SUBNORMAL_MAGIC (a jit function reads no globals)
        # put v's sign bit back with an OR: Triton's unary minus is 0 - x, which turns -0.0 into +0.0 on GPU
        sign = (bits >> 31) << 31
        subnormal = (subnormal.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return tl.where(magnitude < 0.015625, subnormal, normal)  # 2^-6: e4m3's smallest normal

    @triton.jit
    def _row_scale(amax):
        # as fp8.fp8_scale: amax / 448 (correctly rounded, like torch), 1 for an all-zero row
        return tl.where(amax > 0.0, tl.math.div_rn(amax, 448.0), 1.0)

    @triton.jit
    def _store_e4m3(q_ptrs, y, scale, mask):
        v = tl.math.div_rn(y, scale)  # a division, not * (1 / scale), to match quantize_fp8 bit for bit
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)  # 448 is on the grid: rounding cannot exceed it
        tl.store(q_ptrs, _round_to_e4m3_grid(v).to(tl.float8e4nv), mask=mask)

    @triton.jit
    def _load_x_gamma(x_row, w_ptr, cols, valid, ZERO_CENTERED: tl.constexpr):
        x = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            g = g + 1.0
        return x, g

    @triton.jit
    def _norm_chunk(x_row, w_ptr, b_ptr, start, n_cols, mean, rstd, RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
        # x and y = norm(x) on columns [start, start + BLOCK); y is 0 past the row's end
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        x, g = _load_x_gamma(x_row, w_ptr, cols, valid, ZERO_CENTERED)
        if RMS:
            y = (x * g) * rstd
        else:
            y = ((x - mean) * rstd) * g
            if HAS_BIAS:
                y = y + tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        return x, tl.where(valid, y, 0.0), valid, cols

    @triton.jit
    def _quantize_chunk(q_ptrs, y, valid, scale_ptr):
        # a whole row held in registers: its amax, its scale, its e4m3 values
        scale = _row_scale(tl.max(tl.where(valid, tl.abs(y), 0.0), axis=0))
        tl.store(scale_ptr, scale)
        _store_e4m3(q_ptrs, y, scale, valid)

    @triton.jit
    def _norm_quantize_kernel(x_ptr, w_ptr, b_ptr, q_ptr, scale_ptr, n_cols, x_stride, eps,
                              RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                              BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at long sequences
        x_row = x_ptr + row * x_stride
        q_row = q_ptr + row * n_cols
        if ONE_CHUNK:  # the whole row fits in registers: read it once, no second pass
            cols = tl.arange(0, BLOCK)
            valid = cols < n_cols
            x, g = _load_x_gamma(x_row, w_ptr, cols, valid, ZERO_CENTERED)
            if RMS:
                y = (x * g) * (1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / n_cols + eps))
            else:
                centered = tl.where(valid, x - tl.sum(x, axis=0) / n_cols, 0.0)
                y = (centered * (1.0 / tl.sqrt_rn(tl.sum(centered * centered, axis=0) / n_cols + eps))) * g
                if HAS_BIAS:
                    y = y + tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
            _quantize_chunk(q_row + cols, y, valid, scale_ptr + row)
            return
        # pass 1: RMSNorm's mean square and max|x * g| (y = (x * g) * rstd with rstd > 0, so max|y| =
        # rstd * max|x * g| exactly, rounding being monotonic), or LayerNorm's mean
        acc = 0.0
        amax = 0.0
        for start in range(0, n_cols, BLOCK):
            x, x_g, valid, cols = _norm_chunk(x_row, w_ptr, b_ptr, start, n_cols, 0.0, 1.0, True, False,
                                              ZERO_CENTERED, BLOCK)
            if RMS:
                acc += tl.sum(x * x, axis=0)
                amax = tl.maximum(amax, tl.max(tl.abs(x_g), axis=0))
            else:
                acc += tl.sum(x, axis=0)
        if RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt_rn(acc / n_cols + eps)
            amax = amax * rstd
        else:  # LayerNorm: biased variance around the mean (two-pass, as the reference), then max|y|
            mean = acc / n_cols
            var = 0.0
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                valid = cols < n_cols
                x = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
                centered = tl.where(valid, x - mean, 0.0)
                var += tl.sum(centered * centered, axis=0)
            rstd = 1.0 / tl.sqrt_rn(var / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                x, y, valid, cols = _norm_chunk(x_row, w_ptr, b_ptr, start, n_cols, mean, rstd, False, HAS_BIAS,
                                                ZERO_CENTERED, BLOCK)
                amax = tl.maximum(amax, tl.max(tl.abs(y), axis=0))
        scale = _row_scale(amax)
        tl.store(scale_ptr + row, scale)
        # last pass: recompute y exactly as above and write it quantized
        for start in range(0, n_cols, BLOCK):
            x, y, valid, cols = _norm_chunk(x_row, w_ptr, b_ptr, start, n_cols, mean, rstd, RMS, HAS_BIAS,
                                            ZERO_CENTERED, BLOCK)
            _store_e4m3(q_row + cols, y, scale, valid)

    @triton.jit
    def _swiglu_quantize_kernel(x_ptr, q_ptr, scale_ptr, n_cols, x_stride, BLOCK: tl.constexpr,
                                ONE_CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        gate_row = x_ptr + row * x_stride
        up_row = gate_row + n_cols
        q_row = q_ptr + row * n_cols
        if ONE_CHUNK:
            cols = tl.arange(0, BLOCK)
            valid = cols < n_cols
            gate = tl.load(gate_row + cols, mask=valid, other=0.0).to(tl.float32)
            up = tl.load(up_row + cols, mask=valid, other=0.0).to(tl.float32)
            _quantize_chunk(q_row + cols, gate / (1.0 + tl.exp(-gate)) * up, valid, scale_ptr + row)
            return
        amax = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            gate = tl.load(gate_row + cols, mask=valid, other=0.0).to(tl.float32)
            up = tl.load(up_row + cols, mask=valid, other=0.0).to(tl.float32)
            y = gate / (1.0 + tl.exp(-gate)) * up  # padding: silu(0) * 0 = 0
            amax = tl.maximum(amax, tl.max(tl.abs(y), axis=0))
        scale = _row_scale(amax)
        tl.store(scale_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            gate = tl.load(gate_row + cols, mask=valid, other=0.0).to(tl.float32)
            up = tl.load(up_row + cols, mask=valid, other=0.0).to(tl.float32)
            _store_e4m3(q_row + cols, gate / (1.0 + tl.exp(-gate)) * up, scale, valid)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, x_stride, BLOCK: tl.constexpr,
                              ONE_CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        q_row = q_ptr + row * n_cols
        if ONE_CHUNK:
            cols = tl.arange(0, BLOCK)
            valid = cols < n_cols
            x = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
            _quantize_chunk(q_row + cols, x, valid, scale_ptr + row)
            return
        amax = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        scale = _row_scale(amax)
        tl.store(scale_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            _store_e4m3(q_row + cols, tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32), scale, valid)

    @triton.jit
    def _attention_output_quantize_kernel(out_ptr, q_ptr, scale_ptr, batch, heads, head_dim, stride_b,
                                          stride_h, stride_s, stride_d, BLOCK_H: tl.constexpr,
                                          BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr):
        # output row (s, b) of [s, b, heads * d] gathers out[b, :, s, :]: a [BLOCK_H, BLOCK_D] tile per step
        row = tl.program_id(0).to(tl.int64)
        s = row // batch
        b = row % batch
        src = out_ptr + b * stride_b + s * stride_s
        q_row = q_ptr + row * heads * head_dim
        dims = tl.arange(0, BLOCK_D)[None, :]
        if ONE_CHUNK:
            hs = tl.arange(0, BLOCK_H)[:, None]
            valid = (hs < heads) & (dims < head_dim)
            x = tl.load(src + hs * stride_h + dims * stride_d, mask=valid, other=0.0).to(tl.float32)
            scale = _row_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
            tl.store(scale_ptr + row, scale)
            _store_e4m3(q_row + hs * head_dim + dims, x, scale, valid)
            return
        amax = 0.0
        for start in range(0, heads, BLOCK_H):
            hs = start + tl.arange(0, BLOCK_H)[:, None]
            valid = (hs < heads) & (dims < head_dim)
            x = tl.load(src + hs * stride_h + dims * stride_d, mask=valid, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
        scale = _row_scale(amax)
        tl.store(scale_ptr + row, scale)
        for start in range(0, heads, BLOCK_H):
            hs = start + tl.arange(0, BLOCK_H)[:, None]
            valid = (hs < heads) & (dims < head_dim)
            x = tl.load(src + hs * stride_h + dims * stride_d, mask=valid, other=0.0).to(tl.float32)
            _store_e4m3(q_row + hs * head_dim + dims, x, scale, valid)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    interpreted = False
    if triton is not None and not x.is_cuda:
        from triton.runtime.interpreter import InterpretedFunction
        interpreted = isinstance(_quantize_rows_kernel, InterpretedFunction)
    if backend == "auto":
        return triton is not None and (x.is_cuda or (interpreted and os.environ.get("TRITON_INTERPRET") == "1"))
    if triton is None:
        raise ValueError("backend='triton' but triton cannot be imported; use backend='torch' or 'auto'")
    if not x.is_cuda and not interpreted:
        raise ValueError("the Triton FP8 kernels got CPU tensors but Triton is not in interpreter mode: set "
                         "TRITON_INTERPRET=1 before importing megatron_minitron.kernels.fp8_fused, or use "
                         "backend='torch'")
    return True


def _launch_config(n_cols: int, block: Optional[int]):
    if block is None:
        block = min(MAX_BLOCK, triton.next_power_of_2(max(1, n_cols)))
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


def _outputs(m: int, k: int, device):
    return torch.empty(m, k, dtype=E4M3, device=device), torch.empty(m, 1, dtype=torch.float32, device=device)


def _check_float(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{what} must have a non-empty last dimension, got shape {tuple(x.shape)}")


def norm_quantize(x, weight, bias=None, eps=1e-5, kind="RMSNorm", zero_centered_gamma=False, backend="auto",
                  block: Optional[int] = None):
    """x [..., N] -> (q [M, N] float8_e4m3fn, scale [M, 1] fp32), M = prod(x.shape[:-1]).

    kind="RMSNorm": y = x * rsqrt(mean(x^2) + eps) * g; kind="LayerNorm": y = (x - mean) * rsqrt(var + eps)
    * g + bias (biased variance); g = weight + 1 if zero_centered_gamma else weight. Statistics and y in fp32,
    then per-row quantization of y. ``block``: columns per step (power of two; default min(next_pow2(N),
    4096)), for tests."""
    _check_float(x, "x")
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"weight must have shape [{n}] (x's last dim), got {tuple(weight.shape)}")
    if bias is not None:
        if kind == "RMSNorm":
            raise ValueError("RMSNorm has no bias; pass bias=None")
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"bias must have shape [{n}] (x's last dim), got {tuple(bias.shape)}")
    x2 = _rows(x)
    if not _use_triton(x, backend):
        gamma = weight.float() + 1.0 if zero_centered_gamma else weight.float()
        return _norm_torch(x2, gamma, None if bias is None else bias.float(), eps, kind)
    q, scale = _outputs(x2.shape[0], n, x.device)
    block, num_warps = _launch_config(n, block)
    weight = weight.contiguous()
    bias_arg = weight if bias is None else bias.contiguous()  # any pointer: HAS_BIAS=False never reads it
    if x2.shape[0]:
        _norm_quantize_kernel[(x2.shape[0],)](x2, weight, bias_arg, q, scale, n, x2.stride(0), float(eps),
                                              RMS=kind == "RMSNorm", HAS_BIAS=bias is not None,
                                              ZERO_CENTERED=bool(zero_centered_gamma), BLOCK=block,
                                              ONE_CHUNK=block >= n, num_warps=num_warps)
    return q, scale


def swiglu_quantize(x, backend="auto", block: Optional[int] = None):
    """x [..., 2F] (first half gate, second half up, as megatron's torch.chunk(x, 2, -1)) ->
    (q [M, F], scale [M, 1]) of y = silu(gate) * up computed in fp32."""
    _check_float(x, "x")
    if x.shape[-1] % 2:
        raise ValueError(f"SwiGLU input's last dim must be even (gate and up halves), got {x.shape[-1]}")
    x2 = _rows(x)
    if not _use_triton(x, backend):
        return _swiglu_torch(x2)
    f = x2.shape[1] // 2
    q, scale = _outputs(x2.shape[0], f, x.device)
    block, num_warps = _launch_config(f, block)
    if x2.shape[0]:
        _swiglu_quantize_kernel[(x2.shape[0],)](x2, q, scale, f, x2.stride(0), BLOCK=block, ONE_CHUNK=block >= f,
                                                num_warps=num_warps)
    return q, scale


def attention_output_quantize(out, backend="auto", block: Optional[int] = None):
    """out: SDPA output in its layout [b, heads, s, d] (any strides) -> (q [s, b, heads*d] float8_e4m3fn
    contiguous, scale [s*b, 1] fp32): the transpose to megatron's [s, b, h*d] layout, which megatron needs
    anyway, fused with the per-token quantization. ``block``: elements per step (heads x padded d)."""
    _check_float(out, "attention output")
    if out.dim() != 4:
        raise ValueError(f"attention output must be 4-D [b, heads, s, d], got shape {tuple(out.shape)}")
    b, heads, s, d = out.shape
    if heads == 0:
        raise ValueError(f"attention output has no heads: shape {tuple(out.shape)}")
    if not _use_triton(out, backend):
        q, scale = _attention_output_torch(out)
        return q.view(s, b, heads * d), scale
    q, scale = _outputs(s * b, heads * d, out.device)
    block_d = triton.next_power_of_2(max(1, d))
    block, num_warps = _launch_config(heads * block_d, block)
    block_h = max(1, block // block_d)
    if s * b:
        _attention_output_quantize_kernel[(s * b,)](out, q, scale, b, heads, d, *out.stride(), BLOCK_H=block_h,
                                                    BLOCK_D=block_d, ONE_CHUNK=block_h >= heads,
                                                    num_warps=num_warps)
    return q.view(s, b, heads * d), scale


def quantize_rows(x, backend="auto", block: Optional[int] = None):
    """x [..., K] -> (q [M, K], scale [M, 1]) per-row quantization (the generic single-pass kernel)."""
    _check_float(x, "x")
    x2 = _rows(x)
    if not _use_triton(x, backend):
        return quantize_fp8(x2.float(), "token")
    k = x2.shape[1]
    q, scale = _outputs(x2.shape[0], k, x.device)
    block, num_warps = _launch_config(k, block)
    if x2.shape[0]:
        _quantize_rows_kernel[(x2.shape[0],)](x2, q, scale, k, x2.stride(0), BLOCK=block, ONE_CHUNK=block >= k,
                                              num_warps=num_warps)
    return q, scale
