"""FP8 (e4m3) matmuls for the frozen teacher's transformer layers (`distill.teacher_precision=fp8`).

The teacher only runs forward, so each linear of its transformer layers (QKV, output projection, fc1, fc2)
is quantized once, at load, to e4m3 with per-output-channel scales, and its matmul becomes
``kernels.fp8.fp8_gemm`` (``torch._scaled_mm`` on Hopper, activations scaled per token). Only the matmul is
swapped: megatron's ``_forward_impl`` hook is replaced per module, so its TP/SP communication and bias
handling stay as they are. The high-precision weights are released.

Quantizing an activation in a separate pass costs about what FP8 saves in the GEMM, so each activation is
quantized by the kernel that produces it (``kernels.fp8_fused``):
  input_layernorm  + quantize -> linear_qkv     (the norm's output is never written in bf16)
  attention output + quantize -> linear_proj    (fused with the [b, h, s, d] -> [s, b, h*d] transpose)
  pre_mlp_layernorm + quantize -> linear_fc1
  SwiGLU           + quantize -> linear_fc2
The producer hands its (e4m3 rows, per-row scales) to the consuming linear through ``linear.fp8_input``;
the tensor megatron passes along in between is only a placeholder of the right shape. A site that cannot be
fused (another norm or activation, the TE spec) keeps the unfused path: quantize inside the matmul hook.

The embedding and output layer stay in the teacher's precision: the logits are what the KD loss compares,
and the vocabulary projection is where FP8 rounding would show most.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.fp8 import FP8Weight, fp8_gemm, quantize_fp8, quantize_weight
from ..kernels.fp8_fused import attention_output_quantize, norm_quantize, swiglu_quantize


def _gather_sequence(xq: torch.Tensor, x_scale: torch.Tensor, tp_group):
    """Under sequence parallelism a column-parallel linear needs every rank's rows: gather them in FP8."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    q = gather_from_sequence_parallel_region(xq.view(torch.uint8), tensor_parallel_output_grad=False,
                                             group=tp_group).view(xq.dtype)
    scale = gather_from_sequence_parallel_region(x_scale, tensor_parallel_output_grad=False, group=tp_group)
    return q, scale


def _fp8_forward_impl(module, qweight: FP8Weight, activation_granularity: str, out_dtype: torch.dtype,
                      fast_accum: bool, input, weight=None, bias=None, sequence_parallel=False, tp_group=None, **_megatron_kwargs):
    """Drop-in for megatron's ``linear_with_grad_accumulation_and_async_allreduce`` (forward only)."""
    if torch.is_grad_enabled():
        raise RuntimeError("an FP8-quantized teacher linear was called with gradients enabled; the teacher "
                           "must run under torch.no_grad()")
    features = qweight.shape[1]
    stashed = module.__dict__.pop("fp8_input", None)
    if stashed is not None:  # the kernel that produced this activation already quantized it
        xq, x_scale = stashed
        assert xq.shape == (input.numel() // input.shape[-1], features), (xq.shape, input.shape)
        if sequence_parallel:
            xq, x_scale = _gather_sequence(xq, x_scale, tp_group)
    else:
        if sequence_parallel:  # column-parallel layers gather the sequence before their matmul
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=False,
                                                         group=tp_group)
        xq, x_scale = quantize_fp8(input.reshape(-1, features), activation_granularity)
    y = fp8_gemm(xq, x_scale, qweight, bias, out_dtype, use_fast_accum=fast_accum)
    return y.reshape(-1, *input.shape[1:-1], qweight.shape[0])  # the sequence dim grows under SP


def _fuse_norm(norm, consumer) -> bool:
    from ..model.layers import Norm

    if not isinstance(norm, Norm):
        return False

    def forward(x):
        consumer.fp8_input = norm_quantize(x, norm.weight, norm.bias, norm.eps, norm.kind,
                                           norm.zero_centered_gamma)
        return x  # placeholder: the consumer reads the stashed e4m3 rows

    norm.forward = forward
    return True


def _fuse_attention_output(attention) -> bool:
    from ..model.layers import SDPAttention

    core, proj = getattr(attention, "core_attention", None), getattr(attention, "linear_proj", None)
    if not isinstance(core, SDPAttention) or not hasattr(proj, "fp8_weight"):
        return False

    def transform(out):
        q, scale = attention_output_quantize(out)
        proj.fp8_input = (q.view(-1, q.shape[-1]), scale)
        return q  # placeholder [s, b, h*d] (the e4m3 values themselves)

    core.output_transform = transform
    return True


def _fuse_swiglu(mlp) -> bool:
    config = getattr(mlp, "config", None)
    if (config is None or not config.gated_linear_unit or config.activation_func is not F.silu
            or getattr(config, "use_te_activation_func", False) or getattr(config, "glu_linear_offset", 0.0)
            or getattr(config, "activation_func_clamp_value", None) is not None
            or not hasattr(mlp.linear_fc2, "fp8_weight")):
        return False

    def forward(hidden_states, per_token_scale=None, **_kwargs):
        if per_token_scale is not None:
            raise ValueError("the FP8 teacher does not support MoE per-token scales; use teacher_precision=bf16")
        intermediate, fc1_bias = mlp.linear_fc1(hidden_states)
        if fc1_bias is not None:
            intermediate = intermediate + fc1_bias
        q, scale = swiglu_quantize(intermediate)
        mlp.linear_fc2.fp8_input = (q, scale)
        return mlp.linear_fc2(q.view(*intermediate.shape[:-1], q.shape[-1]))

    mlp.forward = forward
    return True


def quantize_teacher(teacher, weight_granularity: str = "channel", activation_granularity: str = "token",
                     fuse: bool = True, fast_accum: bool = False) -> int:
    """Quantize every tensor-parallel linear in ``teacher.decoder`` in place and fuse activation
    quantization into its producers (per-token activations only); returns how many linears.
    ``teacher.fp8_fused_sites`` counts the producers fused. ``fast_accum``: Hopper's fast FP8 accumulation
    in ``_scaled_mm`` (what Transformer Engine uses for forward GEMMs; faster, slightly less exact)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if activation_granularity not in ("tensor", "token"):
        raise ValueError(f"activation_granularity must be 'tensor' or 'token', got {activation_granularity!r}")
    count = 0
    for module in teacher.decoder.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or module.weight is None:
            continue
        qweight = quantize_weight(module.weight.detach(), weight_granularity)

        def forward_impl(*args, _module=module, _q=qweight, _dtype=module.config.params_dtype, **kwargs):
            return _fp8_forward_impl(_module, _q, activation_granularity, _dtype, fast_accum, *args, **kwargs)

        module._forward_impl = forward_impl
        module.fp8_weight = qweight
        # the bf16 copy is no longer read: keep the Parameter object (megatron checks it exists) but free it
        module.weight.data = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)
        count += 1
    if count == 0:
        raise ValueError("teacher_precision=fp8 found no megatron linear layers to quantize (the Transformer "
                         "Engine spec's fused layers are not supported); build the teacher with the local spec "
                         "(train.transformer_engine=false) or use teacher_precision=bf16")
    fused = 0
    if fuse and activation_granularity == "token":
        for layer in teacher.decoder.layers:
            attention, mlp = getattr(layer, "self_attention", None), getattr(layer, "mlp", None)
            qkv, fc1 = getattr(attention, "linear_qkv", None), getattr(mlp, "linear_fc1", None)
            if hasattr(qkv, "fp8_weight"):
                fused += _fuse_norm(layer.input_layernorm, qkv)
            if hasattr(fc1, "fp8_weight"):
                fused += _fuse_norm(layer.pre_mlp_layernorm, fc1)
            fused += _fuse_attention_output(attention) + _fuse_swiglu(mlp)
    teacher.fp8_fused_sites = fused
    return count
