"""The FP8 teacher as it was built before it had a layer spec: a bf16 GPTModel whose module instances are
patched after construction (each linear's ``_forward_impl``, the norms' and the MLP's ``forward``, the core
attention's head merge, an ``fp8_input`` attribute carrying a producer's e4m3 rows to its consumer).

Kept only as the reference that the spec-built teacher (``distill.fp8_teacher``) is compared with: the same
logits bit for bit in tests/unit/test_fp8_teacher_spec.py, the same speed in benchmarks/bench_fp8.py.
It calls the same kernels (``kernels.fp8``, ``kernels.fp8_fused``), so it checks the wiring, not the kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_minitron.kernels.fp8 import fp8_gemm, quantize_fp8, quantize_weight
from megatron_minitron.kernels.fp8_fused import attention_output_quantize, norm_quantize, swiglu_quantize


def _gather_sequence(xq, x_scale, tp_group):
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    q = gather_from_sequence_parallel_region(xq.view(torch.uint8), tensor_parallel_output_grad=False,
                                             group=tp_group).view(xq.dtype)
    scale = gather_from_sequence_parallel_region(x_scale, tensor_parallel_output_grad=False, group=tp_group)
    return q, scale


def _fp8_forward_impl(module, qweight, activation_granularity, out_dtype, fast_accum, input, weight=None,
                      bias=None, sequence_parallel=False, tp_group=None, **_megatron_kwargs):
    if torch.is_grad_enabled():
        raise RuntimeError("patched FP8 teacher called with gradients enabled; use torch.no_grad()")
    features = qweight.shape[1]
    stashed = module.__dict__.pop("fp8_input", None)
    if stashed is not None:
        xq, x_scale = stashed
        assert xq.shape == (input.numel() // input.shape[-1], features), (xq.shape, input.shape)
        if sequence_parallel:
            xq, x_scale = _gather_sequence(xq, x_scale, tp_group)
    else:
        if sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=False,
                                                         group=tp_group)
        xq, x_scale = quantize_fp8(input.reshape(-1, features), activation_granularity)
    y = fp8_gemm(xq, x_scale, qweight, bias, out_dtype, use_fast_accum=fast_accum)
    return y.reshape(-1, *input.shape[1:-1], qweight.shape[0])


def _fuse_norm(norm, consumer) -> bool:
    from megatron_minitron.model.layers import Norm

    if not isinstance(norm, Norm):
        return False

    def forward(x):
        consumer.fp8_input = norm_quantize(x, norm.weight, norm.bias, norm.eps, norm.kind,
                                           norm.zero_centered_gamma)
        return x

    norm.forward = forward
    return True


def _fuse_attention_output(attention) -> bool:
    from megatron_minitron.model.layers import SDPAttention

    core, proj = getattr(attention, "core_attention", None), getattr(attention, "linear_proj", None)
    if not isinstance(core, SDPAttention) or not hasattr(proj, "fp8_weight"):
        return False

    def merge_heads(out):
        q, scale = attention_output_quantize(out)
        proj.fp8_input = (q.view(-1, q.shape[-1]), scale)
        return q

    core._merge_heads = merge_heads
    return True


def _fuse_swiglu(mlp) -> bool:
    config = getattr(mlp, "config", None)
    if (config is None or not config.gated_linear_unit or config.activation_func is not F.silu
            or getattr(config, "use_te_activation_func", False) or getattr(config, "glu_linear_offset", 0.0)
            or getattr(config, "activation_func_clamp_value", None) is not None
            or not hasattr(mlp.linear_fc2, "fp8_weight")):
        return False

    def forward(hidden_states, per_token_scale=None, **_kwargs):
        intermediate, fc1_bias = mlp.linear_fc1(hidden_states)
        if fc1_bias is not None:
            intermediate = intermediate + fc1_bias
        q, scale = swiglu_quantize(intermediate)
        mlp.linear_fc2.fp8_input = (q, scale)
        return mlp.linear_fc2(q.view(*intermediate.shape[:-1], q.shape[-1]))

    mlp.forward = forward
    return True


def patch_teacher(teacher, weight_granularity="channel", activation_granularity="token", fuse=True,
                  fast_accum=False) -> int:
    """Quantize a loaded bf16/fp32 GPTModel (megatron's local spec) by patching its module instances;
    returns how many linears. ``teacher.fp8_fused_sites`` counts the producers fused."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    count = 0
    for module in teacher.decoder.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or module.weight is None:
            continue
        qweight = quantize_weight(module.weight.detach(), weight_granularity)

        def forward_impl(*args, _module=module, _q=qweight, _dtype=module.config.params_dtype, **kwargs):
            return _fp8_forward_impl(_module, _q, activation_granularity, _dtype, fast_accum, *args, **kwargs)

        module._forward_impl = forward_impl
        module.fp8_weight = qweight
        module.weight.data = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)
        count += 1
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
