"""FP8 (e4m3) inference path for the frozen teacher's linear layers.

Convention: ``x ~= q.float() * scale`` with ``q`` in ``torch.float8_e4m3fn`` (max finite 448, 3 mantissa
bits: relative rounding error <= 2^-4 for normal values; subnormal spacing 2^-9) and ``scale = amax / 448``
in fp32, so the largest magnitude maps onto 448 exactly and nothing saturates.

Granularities (all reduce over the *last* dim, the GEMM's K dim, or over everything):
- "tensor":  one scale for the whole tensor (shape [], i.e. a 0-dim tensor)
- "channel": one scale per output channel of a weight [out, in] -> scale [out, 1]
- "token":   one scale per row of an activation [..., in] -> scale [..., 1]
("channel" and "token" compute the same thing; the names say which operand they are meant for.)

Weights are quantized once at load (:func:`quantize_weight`); activations dynamically per call.
:func:`fp8_linear` runs ``torch._scaled_mm`` (H100 FP8 tensor cores) when it can and otherwise the
dequantize-then-matmul reference (the CPU path and the numerical reference for tests).
Under TP each rank quantizes its own weight shard: per-channel scales are the same as for the full
weight; a per-tensor scale is per shard, which only makes each shard's quantization finer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
GRANULARITIES = ("tensor", "channel", "token")
FP8_BACKENDS = ("auto", "scaled_mm", "reference")


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def fp8_scale(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """amax / 448 in fp32 (1 where amax is 0, so all-zero rows quantize to zeros)."""
    _check_granularity(granularity)
    if granularity == "tensor":
        amax = x.detach().abs().amax().float()
    else:
        amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_fp8(x: torch.Tensor, granularity: str = "tensor",
                 scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (q in float8_e4m3fn, fp32 scale) with x ~= q * scale; ``scale`` given = static scaling."""
    if scale is None:
        scale = fp8_scale(x, granularity)
    q = (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


@dataclass
class FP8Weight:
    """A frozen weight [out, in] in e4m3 with its scale ([] per tensor or [out, 1] per channel)."""
    q: torch.Tensor
    scale: torch.Tensor
    granularity: str

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def quantize_weight(weight: torch.Tensor, granularity: str = "channel") -> FP8Weight:
    """Quantize a linear weight [out, in] once at load time."""
    if granularity == "token":
        raise ValueError("weights are quantized per 'tensor' or per output 'channel', not per 'token'")
    if weight.dim() != 2:
        raise ValueError(f"expected a linear weight [out, in], got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite values; FP8 scales would be inf/NaN (check the checkpoint)")
    q, scale = quantize_fp8(weight, granularity)
    return FP8Weight(q.contiguous(), scale, granularity)


def _scaled_mm_ok(x2: torch.Tensor, weight: FP8Weight) -> bool:
    out_features, in_features = weight.shape
    return x2.is_cuda and in_features % 16 == 0 and out_features % 16 == 0 and hasattr(torch, "_scaled_mm")


def _rowwise_scales(x_scale: torch.Tensor, w_scale: torch.Tensor, m: int, n: int):
    """Both scales in _scaled_mm's row-wise layout (a: [M, 1], b: [1, N]); a per-tensor one is broadcast."""
    a = x_scale.reshape(-1, 1).expand(m, 1) if x_scale.numel() == 1 else x_scale.reshape(m, 1)
    b = w_scale.reshape(1, -1).expand(1, n) if w_scale.numel() == 1 else w_scale.reshape(1, n)
    return a.float().contiguous(), b.float().contiguous()


def fp8_linear(x: torch.Tensor, weight: FP8Weight, bias: Optional[torch.Tensor] = None,
               activation_granularity: str = "token", out_dtype: Optional[torch.dtype] = None,
               backend: str = "auto", use_fast_accum: bool = False) -> torch.Tensor:
    """y = x @ W^T + b with W in FP8 and x quantized dynamically to FP8. x: [..., in] -> [..., out].

    backend: "scaled_mm" = torch._scaled_mm (needs in/out features divisible by 16; runs on CUDA, and on
    CPU in recent torch), "reference" = dequantize both operands and matmul in fp32, "auto" = scaled_mm on
    CUDA when the shape allows, else reference. Row-wise (per-token / per-channel) scaling asks
    _scaled_mm for a bf16 result, which is then cast to ``out_dtype`` (default: x's dtype).
    use_fast_accum: H100 fast FP8 accumulation (faster, slightly less accurate); scaled_mm only.
    """
    if backend not in FP8_BACKENDS:
        raise ValueError(f"backend must be one of {FP8_BACKENDS}, got {backend!r}")
    if activation_granularity not in ("tensor", "token"):
        raise ValueError("activations are quantized per 'tensor' or per 'token'")
    in_features = weight.shape[1]
    out_features = weight.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features but the weight expects {in_features}")
    out_dtype = out_dtype or (x.dtype if x.is_floating_point() else torch.float32)
    x2 = x.reshape(-1, in_features)
    xq, x_scale = quantize_fp8(x2, activation_granularity)
    y = fp8_gemm(xq, x_scale, weight, bias, out_dtype, backend, use_fast_accum)
    return y.reshape(*x.shape[:-1], out_features)


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: FP8Weight, bias: Optional[torch.Tensor] = None,
             out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
             use_fast_accum: bool = False) -> torch.Tensor:
    """y = dequant(xq) @ dequant(W)^T + b for an already-quantized activation xq [M, in] (scale [] or [M, 1]):
    the matmul half of :func:`fp8_linear`, for callers whose kernels quantize while producing the activation
    (``kernels.fp8_fused``). Returns [M, out] in ``out_dtype``."""
    if backend not in FP8_BACKENDS:
        raise ValueError(f"backend must be one of {FP8_BACKENDS}, got {backend!r}")
    m = xq.shape[0]
    out_features = weight.shape[0]
    use_mm = backend == "scaled_mm" or (backend == "auto" and _scaled_mm_ok(xq, weight))
    if use_mm:
        if x_scale.numel() == 1 and weight.scale.numel() == 1:
            y = torch._scaled_mm(xq, weight.q.t(), scale_a=x_scale.reshape(()).float(),
                                 scale_b=weight.scale.reshape(()).float(), out_dtype=out_dtype,
                                 use_fast_accum=use_fast_accum)
        else:  # row-wise scaling: _scaled_mm produces bf16 only
            scale_a, scale_b = _rowwise_scales(x_scale, weight.scale, m, out_features)
            y = torch._scaled_mm(xq, weight.q.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                                 use_fast_accum=use_fast_accum)
    else:
        y = dequantize(xq, x_scale) @ dequantize(weight.q, weight.scale).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


class FP8Linear(nn.Module):
    """Inference-only stand-in for a frozen ``nn.Linear``: e4m3 weight (buffers), dynamic FP8 activations."""

    def __init__(self, weight: FP8Weight, bias: Optional[torch.Tensor], activation_granularity: str = "token",
                 backend: str = "auto"):
        super().__init__()
        self.register_buffer("qweight", weight.q)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.weight_granularity = weight.granularity
        self.activation_granularity = activation_granularity
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_granularity: str = "channel",
                    activation_granularity: str = "token", backend: str = "auto") -> "FP8Linear":
        return cls(quantize_weight(linear.weight.detach(), weight_granularity), linear.bias,
                   activation_granularity, backend)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = FP8Weight(self.qweight, self.weight_scale, self.weight_granularity)
        return fp8_linear(x, weight, self.bias, self.activation_granularity, backend=self.backend)
