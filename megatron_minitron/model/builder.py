"""Build a megatron-core ``GPTModel`` (this rank's pipeline stage) from a ``ModelArch``.

Layer spec: Transformer Engine's when asked for and importable, else megatron-core's local spec with two
of our modules swapped in (``layers.SDPAttention`` for core attention unless ``unfused`` is asked for,
``layers.Norm`` for every norm). Checkpoints are interchangeable between the two specs: megatron maps
the local spec's norm keys onto TE's fused ``layer_norm_weight`` names. train.fused_kernels (where
``fused_kernels_usable``) further swaps in subclasses with the same parameters that run our Triton kernels:
``layers.FusedRMSNorm``, ``attention.FusedRoPESelfAttention`` and ``mlp.FusedSwiGLUMLP``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import ROTARY_EMBEDDINGS, ModelArch, Parallel
from ..runtime import cpu_mode


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        return True
    except Exception:  # ImportError, or a broken install that raises on import
        return False


def resolve_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.float32 if cpu_mode.enabled() or not torch.cuda.is_available() else torch.bfloat16
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def pipeline_layout(parallel: Parallel, num_layers: int) -> Optional[str]:
    """megatron's layout string for an uneven split, e.g. [1, 3] -> 'Et|tttL'."""
    if parallel.pipeline_split is None or parallel.pipeline_model_parallel_size == 1:
        return None
    stages = ["t" * n for n in parallel.layers_per_stage(num_layers)]
    stages[0] = "E" + stages[0]
    stages[-1] = stages[-1] + "L"
    return "|".join(stages)


def transformer_config(arch: ModelArch, parallel: Parallel, dtype: torch.dtype = torch.float32,
                       recompute: bool = False, use_te: bool = False, fp8: Optional[dict] = None,
                       initialize: bool = True):
    from megatron.core.transformer.transformer_config import TransformerConfig

    activation = {"swiglu": F.silu, "squared_relu": _squared_relu(), "gelu": F.gelu}[arch.activation]
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.query_groups,
        kv_channels=arch.head_dim,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_epsilon,
        layernorm_zero_centered_gamma=arch.layernorm_zero_centered_gamma,
        activation_func=activation,
        gated_linear_unit=arch.activation == "swiglu",
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,  # also makes megatron all-reduce their grads over TP (finalize_model_grads)
        no_rope_freq=list(arch.no_rope_freq) if arch.no_rope_freq and any(arch.no_rope_freq) else None,
        init_method_std=arch.init_method_std,
        hidden_dropout=arch.hidden_dropout,
        attention_dropout=arch.attention_dropout,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        pipeline_model_parallel_layout=pipeline_layout(parallel, arch.num_layers),
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # identical initial weights whatever the TP size (the master weight is built, then split)
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # Losses are token sums; megatron divides grads by the global token count (DDP reads this at
        # construction to decide its own 1/DP scaling, so it must be set here, not later).
        calculate_per_token_loss=True,
    )
    if not initialize:
        # for a caller that loads every weight next (loads are strict): megatron's init helpers still run, since
        # they also mark each weight's TP attributes (the optimizer's grad norm reads them; perform_initialization
        # =False would skip that too), but draw no random numbers, which on the CPU take seconds per 1B params
        names = {f.name for f in dataclasses.fields(TransformerConfig)}
        kwargs.update({name: _leave_uninitialised for name in
                       ("init_method", "output_layer_init_method", "embedding_init_method") if name in names})
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if fp8:  # Transformer Engine's FP8 (megatron wraps the TE layers in fp8_autocast with this recipe)
        if not use_te:
            raise ValueError("FP8 training needs the Transformer Engine layer spec (train.transformer_engine)")
        kwargs.update(fp8=fp8["format"], fp8_recipe=fp8["recipe"], fp8_amax_history_len=fp8["amax_history_len"],
                      fp8_amax_compute_algo=fp8["amax_compute_algo"])
    config = TransformerConfig(**kwargs)
    if arch.position_embedding == "yarn":
        # GPTModel builds its YarnRotaryEmbedding, and attention scales cos/sin, from these attributes of the
        # config (getattr; megatron-core 0.16's TransformerConfig declares none of them)
        for name in YARN_CONFIG_FIELDS:
            setattr(config, name, getattr(arch, name))
    if arch.position_embedding == "longrope":  # its attention factor, through the same attributes
        from .longrope import concentration_config
        for name, value in concentration_config(arch).items():
            setattr(config, name, value)
    return config


# ModelArch fields megatron-core reads off the TransformerConfig for position_embedding_type="yarn"
YARN_CONFIG_FIELDS = ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast",
                      "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim",
                      "yarn_correction_range_round_to_int")


def _leave_uninitialised(tensor):
    """An init_method that leaves the tensor as allocated (``build_gpt(initialize=False)``)."""
    return tensor


def fused_kernels_usable(requested: bool, use_te: bool, device: Optional[torch.device]) -> bool:
    """Whether train.fused_kernels takes effect: asked for, on the local spec (TE fuses its own norms), on
    a CUDA device and with triton importable. Otherwise the torch path runs (off by default until measured)."""
    if not requested or use_te:
        return False
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if not on_cuda or cpu_mode.enabled():
        return False
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # ImportError, or a broken install that raises on import
        return False


def _squared_relu():
    from megatron.core.activations import squared_relu
    return squared_relu


def layer_spec(arch: ModelArch, attention_backend: str = "auto", use_te: bool = False,
               fused_kernels: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)

    from .layers import FusedRMSNorm, Norm, SDPAttention

    if use_te or attention_backend == "te":
        if not have_transformer_engine():
            raise ValueError("train.transformer_engine / attention_backend=te asked for Transformer Engine,"
                             " which is not importable here; use attention_backend=sdpa (the default)")
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=arch.normalization,
                                                  qk_layernorm=arch.qk_layernorm))
    sub = spec.submodules
    norm = FusedRMSNorm if fused_kernels and arch.normalization == "RMSNorm" else Norm
    sub.input_layernorm = norm
    sub.pre_mlp_layernorm = norm
    if arch.qk_layernorm:  # over each head's d channels (megatron passes hidden_size=kv_channels)
        sub.self_attention.submodules.q_layernorm = norm
        sub.self_attention.submodules.k_layernorm = norm
    if attention_backend in ("auto", "sdpa"):
        sub.self_attention.submodules.core_attention = SDPAttention
    if fused_kernels:
        _swap_in_fused_modules(sub, arch)
    return spec


def _swap_in_fused_modules(sub, arch: ModelArch) -> None:
    """RoPE and SwiGLU through our kernels (train.fused_kernels): same parameters, same state-dict keys."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    from .attention import FusedRoPESelfAttention
    from .mlp import FusedSwiGLUMLP

    attention = sub.self_attention
    if arch.position_embedding in ROTARY_EMBEDDINGS and isinstance(attention, ModuleSpec) and attention.module is SelfAttention:
        attention.module = FusedRoPESelfAttention
    if arch.activation == "swiglu":
        sub.mlp = _mlp_entry_with_class(sub.mlp, FusedSwiGLUMLP)


def _mlp_entry_with_class(mlp, cls):
    """The local spec's dense-MLP entry building ``cls`` (an MLP subclass) instead; any other entry as is."""
    parts = dense_mlp_parts(mlp)
    if parts is None:
        return mlp
    submodules, rebuild = parts
    return rebuild(cls, submodules)


def dense_mlp_parts(mlp):
    """(a copy of the MLP's submodules, rebuild(cls, submodules) -> the layer's mlp entry) for megatron's dense
    MLP, None for anything else. megatron-core <= 0.17 spells it ``ModuleSpec(module=MLP, submodules=...)``;
    0.18-0.19 ``functools.partial(MLP.as_mlp_submodule, submodules=...)`` (a classmethod: cls's builds a cls).
    From 0.18 the layer calls the entry and rewraps a ModuleSpec of MLP itself only, so a ModuleSpec becomes
    the builder form wherever ``as_mlp_submodule`` exists."""
    import functools

    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp, ModuleSpec) and mlp.module is MLP:
        def rebuild(cls, sub):
            if hasattr(cls, "as_mlp_submodule"):
                return functools.partial(cls.as_mlp_submodule, submodules=sub, **mlp.params)
            return dataclasses.replace(mlp, module=cls, submodules=sub)

        return _copy(mlp.submodules), rebuild
    if isinstance(mlp, functools.partial) and getattr(mlp.func, "__self__", None) is MLP \
            and getattr(mlp.func, "__name__", "") == "as_mlp_submodule" and "submodules" in mlp.keywords:
        others = {k: v for k, v in mlp.keywords.items() if k != "submodules"}

        def rebuild(cls, sub):
            return functools.partial(cls.as_mlp_submodule, *mlp.args, submodules=sub, **others)

        return _copy(mlp.keywords["submodules"]), rebuild
    return None


def _copy(submodules):
    """A shallow copy of a submodules dataclass (the caller may swap its entries), anything else as it is."""
    return dataclasses.replace(submodules) if dataclasses.is_dataclass(submodules) else submodules


def build_gpt(arch: ModelArch, parallel: Parallel, dtype: torch.dtype = torch.float32,
              attention_backend: str = "auto", use_te: bool = False, recompute: bool = False,
              device: Optional[torch.device] = None, fp8: Optional[dict] = None,
              layer_spec_transform: Optional[Callable] = None, fused_kernels: bool = False,
              initialize: bool = True):
    """This rank's stage of the GPT. Call after ``runtime.init_distributed``.

    ``layer_spec_transform(spec, config) -> spec``: builds every transformer layer from another spec derived
    from the usual one (the FP8 teacher's swaps in its own submodule classes, ``distill.fp8_teacher``).
    ``fused_kernels``: RMSNorm, RoPE and SwiGLU through the Triton kernels where ``fused_kernels_usable``
    (train.fused_kernels)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    from .layers import FusedRMSNorm, Norm
    from .mlp import quiet_unknown_mlp_type

    use_te = use_te and attention_backend != "unfused"
    fused = fused_kernels_usable(fused_kernels, use_te, device)
    spec = layer_spec(arch, attention_backend, use_te, fused)  # fails clearly first when TE is asked for but absent
    config = transformer_config(arch, parallel, dtype, recompute, use_te, fp8, initialize)
    if layer_spec_transform is not None:
        spec = layer_spec_transform(spec, config)
    if not use_te:  # our Norm for the final norm too (megatron's torch norm rejects SP, zero-centred)
        spec = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                          layer_norm=FusedRMSNorm if fused else Norm)
    tp = parallel.tensor_model_parallel_size
    with quiet_unknown_mlp_type():  # train.fused_kernels' FusedSwiGLUMLP, the FP8 teacher's MLP
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size(tp),
            max_sequence_length=arch.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_embeddings,
            # LongRoPE is megatron's rope with other frequencies: built as rope, its embedding swapped below
            position_embedding_type="rope" if arch.position_embedding == "longrope" else arch.position_embedding,
            rotary_percent=arch.rotary_percent,
            rotary_base=int(arch.rotary_base),
            rope_scaling=arch.rope_scaling,
            rope_scaling_factor=arch.rope_scaling_factor,
        )
    if arch.position_embedding == "longrope":
        from . import longrope
        longrope.install(model, arch)
    if device is not None:
        model.to(device)
    return model

