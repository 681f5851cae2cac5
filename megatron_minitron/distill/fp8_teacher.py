"""FP8 (e4m3) matmuls for the frozen teacher's transformer layers (`distill.teacher_precision=fp8`).

The teacher only runs forward, so each linear of its transformer layers (QKV, output projection, fc1, fc2)
is quantized once, after its checkpoint is loaded, to e4m3 with per-output-channel scales, and its matmul
becomes ``kernels.fp8.fp8_gemm`` (``torch._scaled_mm`` on Hopper, activations scaled per token). The
high-precision weights are released.

The teacher is built from a layer spec (:func:`fp8_layer_spec`, derived from the local spec that
``model.builder`` uses) whose submodules are the classes below, so nothing is patched after construction:
  FP8ColumnParallelLinear / FP8RowParallelLinear  megatron's linears (same parameters, state-dict keys,
      sharded state dict and TP sharding: the checkpoint loads as into the bf16 teacher) with a forward-only
      FP8 matmul and megatron's own TP/SP communication around it
Quantizing an activation in a separate pass costs about what FP8 saves in the GEMM, so each activation is
quantized by the kernel that produces it (``kernels.fp8_fused``):
  FP8Norm           input_layernorm   + quantize -> linear_qkv  (the norm's output is never written in bf16)
  FP8SDPAttention   attention output  + quantize -> linear_proj (fused with the [b, h, s, d] -> [s, b, h*d]
                                                                 transpose)
  FP8Norm           pre_mlp_layernorm + quantize -> linear_fc1
  FP8SwiGLUMLP      SwiGLU            + quantize -> linear_fc2
A producer returns its e4m3 rows as a :class:`QuantizedRows` tensor that carries the per-row scales;
megatron passes it on unchanged to the consuming linear. A site that cannot be fused (another norm or
activation, megatron's unfused attention) keeps its module, and its FP8 linear quantizes its own input.
Qwen3's q/k layernorms (``qk_layernorm``) sit between linear_qkv's output and RoPE; no linear reads their
output, so they stay ``Norm`` in the teacher's precision, on linear_qkv's output (which the FP8 matmul returns
in that precision), as in the bf16 teacher.

The embedding and output layer stay in the teacher's precision: the logits are what the KD loss compares,
and the vocabulary projection is where FP8 rounding would show most.

Use: ``build_fp8_teacher(...)``, load the checkpoint, ``quantize_weights(teacher)``. ``quantize_teacher``
turns an already loaded bf16/fp32 GPTModel into the same FP8 teacher (its decoder rebuilt from the spec).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from ..kernels.fp8 import FP8Weight, fp8_gemm, quantize_fp8, quantize_weight
from ..kernels.fp8_fused import attention_output_quantize, norm_quantize, swiglu_quantize
from ..model.builder import dense_mlp_parts
from ..model.layers import Norm, SDPAttention
from ..model.mlp import quiet_unknown_mlp_type

NO_LINEARS_MESSAGE = ("teacher_precision=fp8 found no megatron linear layers to quantize (the Transformer Engine "
                      "spec's fused layers are not supported); build the teacher with the local spec "
                      "(train.transformer_engine=false) or use teacher_precision=bf16")


@dataclass(frozen=True)
class FP8Options:
    """How the teacher's linears quantize. ``fast_accum``: Hopper's fast FP8 accumulation in ``_scaled_mm``
    (what Transformer Engine uses for forward GEMMs; faster, slightly less exact)."""
    weight_granularity: str = "channel"
    activation_granularity: str = "token"
    fast_accum: bool = False

    def __post_init__(self):
        if self.activation_granularity not in ("tensor", "token"):
            raise ValueError(f"activation_granularity must be 'tensor' or 'token', got "
                             f"{self.activation_granularity!r}")
        if self.weight_granularity not in ("tensor", "channel"):
            raise ValueError(f"weight_granularity must be 'tensor' or 'channel', got {self.weight_granularity!r}")

    @property
    def fusable(self) -> bool:
        """The fused producers write one scale per row: they serve per-token activations only."""
        return self.activation_granularity == "token"


class QuantizedRows(torch.Tensor):
    """An activation already quantized by the kernel that produced it: e4m3 values in the activation's shape
    [..., K] with ``row_scales`` [M, 1] fp32 (M = prod of the leading dims, x ~= q * scale per row).

    Torch functions on it return plain tensors (the scales would not follow them), so a QuantizedRows either
    reaches its FP8 linear as the same object or stops being one; the FP8 linears refuse a plain e4m3 input."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(cls, q: torch.Tensor, row_scales: torch.Tensor):
        assert q.dtype == torch.float8_e4m3fn and row_scales.shape == (q.numel() // q.shape[-1], 1), \
            (q.dtype, q.shape, row_scales.shape)
        rows = torch.Tensor._make_subclass(cls, q, False)
        rows.row_scales = row_scales
        return rows

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [M, K], scales [M, 1]): ``_scaled_mm``'s row-wise operand."""
        q = self.as_subclass(torch.Tensor)
        return q.reshape(-1, q.shape[-1]), self.row_scales


def _refuse_gradients():
    if torch.is_grad_enabled():
        raise RuntimeError("the FP8-quantized teacher was called with gradients enabled; it must run under "
                           "torch.no_grad()")


def _gather_sequence(xq: torch.Tensor, x_scale: torch.Tensor, tp_group):
    """Under sequence parallelism a column-parallel linear needs every rank's rows: gather them in FP8."""
    q = mappings.gather_from_sequence_parallel_region(xq.view(torch.uint8), tensor_parallel_output_grad=False,
                                                      group=tp_group).view(xq.dtype)
    scale = mappings.gather_from_sequence_parallel_region(x_scale, tensor_parallel_output_grad=False,
                                                          group=tp_group)
    return q, scale


class _FP8Matmul:
    """The e4m3 weight and the forward-only matmul shared by the two FP8 linears (a mixin: megatron's
    constructors build the parameters; the weight is quantized after the checkpoint is loaded)."""

    def _init_fp8(self, fp8: FP8Options):
        if self.is_expert:
            raise ValueError("the FP8 teacher does not support MoE expert linears; use teacher_precision=bf16")
        self.fp8_options = fp8
        # a plain attribute, not a buffer: Module.bfloat16() (megatron's Float16Module) casts every floating
        # point tensor it owns, and float8 counts as floating point
        self.fp8_weight: Optional[FP8Weight] = None

    def quantize_loaded_weight(self) -> None:
        """Quantize ``weight`` (the loaded checkpoint's) to e4m3 and free it. Once, after loading."""
        if self.fp8_weight is not None:
            raise ValueError("this FP8 teacher's weights are already quantized (quantize_weights runs once, "
                             "after the checkpoint is loaded)")
        self.fp8_weight = quantize_weight(self.weight.detach(), self.fp8_options.weight_granularity)
        # the high-precision copy is no longer read: keep the Parameter (megatron's code expects one) but free it
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def _fp8_matmul(self, input_, bias, gather_sequence: bool) -> torch.Tensor:
        """y = input @ W^T (+ bias) in FP8 for input [s, b, K] (or a QuantizedRows); under SP the sequence
        rows are first gathered from the TP group (then y has s * tp rows)."""
        _refuse_gradients()
        if self.fp8_weight is None:
            raise RuntimeError("the FP8 teacher's weights are not quantized yet: load the checkpoint, then call "
                               "distill.fp8_teacher.quantize_weights(teacher)")
        features = self.fp8_weight.shape[1]
        assert input_.shape[-1] == features, (tuple(input_.shape), tuple(self.fp8_weight.shape))
        if isinstance(input_, QuantizedRows):  # the kernel that produced this activation quantized it
            xq, x_scale = input_.rows()
            if gather_sequence:
                xq, x_scale = _gather_sequence(xq, x_scale, self.tp_group)
        else:
            assert input_.dtype != torch.float8_e4m3fn, "an e4m3 activation lost its scales on the way here"
            if gather_sequence:
                input_ = mappings.gather_from_sequence_parallel_region(
                    input_, tensor_parallel_output_grad=False, group=self.tp_group)
            xq, x_scale = quantize_fp8(input_.reshape(-1, features), self.fp8_options.activation_granularity)
        y = fp8_gemm(xq, x_scale, self.fp8_weight, bias, self.config.params_dtype,
                     use_fast_accum=self.fp8_options.fast_accum)
        return y.reshape(-1, *input_.shape[1:-1], self.fp8_weight.shape[0])  # the sequence dim grows under SP


class FP8ColumnParallelLinear(_FP8Matmul, ColumnParallelLinear):
    """megatron's ColumnParallelLinear, forward only, with the FP8 matmul. Inference forward of megatron's:
    [SP: gather the sequence] -> matmul (+ bias unless skip_bias_add) -> [gather_output: gather columns]."""

    def __init__(self, *args, fp8: FP8Options, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(fp8)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None:
            raise ValueError("the FP8 teacher's linears multiply by their own quantized weight; pass no weight")
        bias = None if self.skip_bias_add else self.bias
        output = self._fp8_matmul(input_, bias, gather_sequence=self.sequence_parallel)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = mappings.gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, (self.bias if self.skip_bias_add else None)


class FP8RowParallelLinear(_FP8Matmul, RowParallelLinear):
    """megatron's RowParallelLinear, forward only, with the FP8 matmul. Inference forward of megatron's:
    matmul -> all-reduce (SP: reduce-scatter the sequence) over the TP group -> + bias unless skip_bias_add."""

    def __init__(self, *args, fp8: FP8Options, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.input_is_parallel:
            raise ValueError("FP8RowParallelLinear takes its input already split over the TP ranks "
                             "(input_is_parallel=True, as in every transformer layer)")
        self._init_fp8(fp8)

    def forward(self, input_):
        output = self._fp8_matmul(input_, None, gather_sequence=False)
        if self.sequence_parallel:
            output = mappings.reduce_scatter_to_sequence_parallel_region(output, group=self.tp_group)
        else:
            output = mappings.reduce_from_tensor_model_parallel_region(output, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


class FP8Norm(Norm):
    """The norm in front of an FP8 linear: normalizes and quantizes per token in one kernel and returns the
    e4m3 rows (QuantizedRows); parameters and state-dict keys are Norm's."""

    def forward(self, x):
        _refuse_gradients()
        q, scale = norm_quantize(x, self.weight, self.bias, self.eps, self.kind, self.zero_centered_gamma)
        return QuantizedRows(q.view(x.shape), scale)


class FP8SDPAttention(SDPAttention):
    """SDPAttention whose output leaves already quantized per token (QuantizedRows [s, b, heads * d]): the
    transpose to megatron's layout and the quantization are one kernel."""

    def _merge_heads(self, out):
        q, scale = attention_output_quantize(out)
        return QuantizedRows(q, scale)


def swiglu_fusable(config) -> bool:
    """Whether megatron's MLP computes plain SwiGLU, silu(gate) * up, which ``swiglu_quantize`` fuses."""
    return (config.gated_linear_unit and config.activation_func is F.silu
            and not getattr(config, "use_te_activation_func", False)
            and not getattr(config, "glu_linear_offset", 0.0)
            and getattr(config, "activation_func_clamp_value", None) is None)


class FP8SwiGLUMLP(MLP):
    """megatron's MLP with SwiGLU and its quantization in one kernel between fc1 and an FP8 fc2."""

    def __init__(self, config, *args, **kwargs):
        if not swiglu_fusable(config):
            raise ValueError("FP8SwiGLUMLP computes silu(gate) * up only (fp8_layer_spec checks "
                             "swiglu_fusable(config) before choosing it)")
        super().__init__(config, *args, **kwargs)
        if not isinstance(self.linear_fc2, FP8RowParallelLinear):
            raise ValueError("FP8SwiGLUMLP needs an FP8RowParallelLinear fc2 to consume its e4m3 rows")

    def forward(self, hidden_states, per_token_scale=None, **_kwargs):
        if per_token_scale is not None:
            raise ValueError("the FP8 teacher does not support MoE per-token scales; use teacher_precision=bf16")
        intermediate, fc1_bias = self.linear_fc1(hidden_states)
        if fc1_bias is not None:
            intermediate = intermediate + fc1_bias
        q, scale = swiglu_quantize(intermediate)
        return self.linear_fc2(QuantizedRows(q.view(*intermediate.shape[:-1], q.shape[-1]), scale))


FUSED_PRODUCERS = (FP8Norm, FP8SDPAttention, FP8SwiGLUMLP)
_FP8_LINEARS = {ColumnParallelLinear: FP8ColumnParallelLinear, RowParallelLinear: FP8RowParallelLinear}


def _module_class(entry):
    return entry.module if isinstance(entry, ModuleSpec) else entry


def _with_class(entry, cls):
    """``entry`` (a class or a ModuleSpec) building ``cls`` instead, with the same params / submodules."""
    if isinstance(entry, ModuleSpec):
        return dataclasses.replace(entry, module=cls)
    return cls


def _fp8_linear(entry, options: FP8Options):
    """(spec entry, swapped): megatron's own linear classes (exactly these) become the FP8 ones."""
    target = _FP8_LINEARS.get(_module_class(entry)) if isinstance(_module_class(entry), type) else None
    if target is None:
        return entry, False
    if isinstance(entry, ModuleSpec):
        return dataclasses.replace(entry, module=target, params={**entry.params, "fp8": options}), True
    return ModuleSpec(module=target, params={"fp8": options}), True


def fp8_layer_spec(spec: ModuleSpec, config, options: FP8Options = FP8Options(), fuse: bool = True) -> ModuleSpec:
    """The FP8 teacher's transformer-layer spec: ``spec`` (``model.builder.layer_spec``'s local spec) with
    megatron's linears swapped for the FP8 ones and, when ``fuse`` (per-token activations only), each
    producer that can quantize its output (our Norm, SDPAttention, a plain-SwiGLU MLP) for its fused class.
    A new spec; ``spec`` is unchanged. ``config``: the layers' TransformerConfig (decides the SwiGLU site)."""
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules))
    layer = spec.submodules
    fuse = fuse and options.fusable
    if fuse and getattr(config, "apply_residual_connection_post_layernorm", False):
        raise ValueError("the FP8 teacher's fused norms hand their output to the next linear only; "
                         "apply_residual_connection_post_layernorm also adds it to the residual")
    swapped = 0
    attention = getattr(layer, "self_attention", None)
    if isinstance(attention, ModuleSpec) and hasattr(attention.submodules, "linear_qkv"):
        att = dataclasses.replace(attention.submodules)
        att.linear_qkv, qkv = _fp8_linear(att.linear_qkv, options)
        att.linear_proj, proj = _fp8_linear(att.linear_proj, options)
        if fuse and qkv and _module_class(layer.input_layernorm) is Norm:
            layer.input_layernorm = _with_class(layer.input_layernorm, FP8Norm)
        if fuse and proj and _module_class(att.core_attention) is SDPAttention:
            att.core_attention = _with_class(att.core_attention, FP8SDPAttention)
        layer.self_attention = dataclasses.replace(attention, submodules=att)
        swapped += qkv + proj
    mlp_parts = dense_mlp_parts(getattr(layer, "mlp", None))
    if mlp_parts is not None:
        sub, rebuild = mlp_parts
        sub.linear_fc1, fc1 = _fp8_linear(sub.linear_fc1, options)
        sub.linear_fc2, fc2 = _fp8_linear(sub.linear_fc2, options)
        if fuse and fc1 and _module_class(layer.pre_mlp_layernorm) is Norm:
            layer.pre_mlp_layernorm = _with_class(layer.pre_mlp_layernorm, FP8Norm)
        fused_mlp = fuse and fc2 and swiglu_fusable(config)
        layer.mlp = rebuild(FP8SwiGLUMLP if fused_mlp else MLP, sub)
        swapped += fc1 + fc2
    if swapped == 0:
        raise ValueError(NO_LINEARS_MESSAGE)
    return spec


def build_fp8_teacher(arch, parallel, dtype: torch.dtype, attention_backend: str = "auto", use_te: bool = False,
                      device: Optional[torch.device] = None, options: FP8Options = FP8Options(),
                      fuse: bool = True, initialize: bool = True):
    """This rank's stage of the FP8 teacher (``model.builder.build_gpt`` with :func:`fp8_layer_spec`), its
    weights still in ``dtype``: load the checkpoint into it as into the bf16 teacher, then
    :func:`quantize_weights`. ``initialize=False`` skips the random init (the load sets every tensor)."""
    from ..model.builder import build_gpt

    return build_gpt(arch, parallel, dtype, attention_backend=attention_backend, use_te=use_te, device=device,
                     layer_spec_transform=partial(fp8_layer_spec, options=options, fuse=fuse), initialize=initialize)


def fp8_linears(model) -> list:
    return [m for m in model.modules() if isinstance(m, _FP8Matmul)]


def fused_sites(model) -> int:
    """How many producers quantize their own output (4 per layer when every site fuses)."""
    return sum(isinstance(m, FUSED_PRODUCERS) for m in model.modules())


def quantize_weights(teacher) -> int:
    """Quantize the loaded weights of every FP8 linear of a teacher built by :func:`build_fp8_teacher`;
    returns how many linears. Call once, after loading the checkpoint."""
    linears = fp8_linears(teacher)
    if not linears:
        raise ValueError("this model has no FP8 linears: build it with distill.fp8_teacher.build_fp8_teacher, "
                         "or turn a loaded model into the FP8 teacher with quantize_teacher")
    for linear in linears:
        linear.quantize_loaded_weight()
    return len(linears)


def _fp8_decoder(decoder, options: FP8Options, fuse: bool):
    """``decoder`` (a TransformerBlock) rebuilt from the FP8 layer spec, holding the same weights."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    specs = [fp8_layer_spec(spec, decoder.config, options, fuse) for spec in decoder.submodules.layer_specs]
    with torch.random.fork_rng(devices=[]), quiet_unknown_mlp_type():  # its random init is overwritten
        block = TransformerBlock(config=decoder.config,
                                 spec=dataclasses.replace(decoder.submodules, layer_specs=specs),
                                 post_layer_norm=decoder.post_layer_norm, pre_process=decoder.pre_process,
                                 post_process=decoder.post_process, pg_collection=decoder.pg_collection,
                                 vp_stage=decoder.vp_stage)
    weight = next(decoder.parameters(), None)
    if weight is not None:
        block.to(weight.device)
    block.load_state_dict(decoder.state_dict())
    return block.train(decoder.training)


def quantize_teacher(teacher, weight_granularity: str = "channel", activation_granularity: str = "token",
                     fuse: bool = True, fast_accum: bool = False) -> int:
    """Turn a loaded GPTModel built by ``model.builder.build_gpt`` into the FP8 teacher: its decoder is
    rebuilt from :func:`fp8_layer_spec` with the same weights, which are then quantized. Returns how many
    linears; ``teacher.fp8_fused_sites`` counts the producers fused (:func:`fused_sites`). Building the
    teacher with :func:`build_fp8_teacher` instead saves building its decoder twice."""
    options = FP8Options(weight_granularity, activation_granularity, fast_accum)
    if fp8_linears(teacher):
        raise ValueError("this model is already an FP8 teacher; after loading its checkpoint call "
                         "quantize_weights(teacher)")
    teacher.decoder = _fp8_decoder(teacher.decoder, options, fuse)
    count = quantize_weights(teacher)
    teacher.fp8_fused_sites = fused_sites(teacher)
    return count
