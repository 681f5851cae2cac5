"""Hugging Face ``config.json`` <-> ``ModelArch`` for the supported model families.

Works on the raw JSON dict (no ``transformers`` import needed) and reads both the legacy layout
(``rope_theta`` + ``rope_scaling``, transformers 4.x) and the 5.x one (``rope_parameters``). Exported
configs use the legacy layout, which both major versions of transformers read.

Family differences that matter for the weights (see ``mapping.py``):
- llama (Llama 2 / 3 / 3.1): RMSNorm, SwiGLU, GQA, RoPE on the whole head dim; Llama-3.1 adds the
  "llama3" frequency scaling, which megatron-core implements with fixed low/high frequency factors
  1 and 4 and an original context of 8192 (``RotaryEmbedding._apply_scaling``).
- mistral (Mistral 7B, Mistral-NeMo 12B): as llama; NeMo's head_dim (128) != hidden / heads (160).
- qwen2: as llama plus a bias on q/k/v (not on o_proj).
- qwen3 (dense Qwen3): as llama plus an RMSNorm over each query and key head (``q_norm`` / ``k_norm``, one
  weight of head_dim shared by the heads) before RoPE: megatron's ``qk_layernorm``. head_dim is 128 at
  every size, which is not hidden / heads for some (Qwen3-4B: 2560 / 32 = 80).
- phi3 (Phi-3, Phi-4): as llama, its files fusing q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``
  (fused.py); RoPE on the first ``partial_rotary_factor`` of the head dim (Phi-4-mini: 0.75).
- smollm3 (SmolLM3): as llama, with layers whose attention skips RoPE (``no_rope_layers``, 1 = rotates; by
  default every 4th layer does not): megatron's ``no_rope_freq`` (1 = skips), one flag per layer.
- arcee (Arcee AFM): as llama, with a non-gated squared-ReLU MLP (``up_proj`` / ``down_proj``, ``relu2``).
- nemotron (Nemotron-4, Minitron): LayerNorm1P (LayerNorm whose stored gamma is gamma - 1: megatron's
  ``layernorm_zero_centered_gamma``, same stored values), squared-ReLU non-gated MLP (up/down only),
  RoPE on the first ``partial_rotary_factor`` (default 0.5) of the head dim.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

from ..config import ROTARY_EMBEDDINGS, ModelArch

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "arcee", "nemotron")
_ARCHITECTURE_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                       "smollm3": "SmolLM3ForCausalLM", "arcee": "ArceeForCausalLM",
                       "nemotron": "NemotronForCausalLM"}
# megatron-core's fixed Llama-3.x scaling constants (megatron/core/models/common/embeddings/
# rotary_pos_embedding.py, RotaryEmbedding._apply_scaling defaults)
MCORE_LLAMA3_LOW_FREQ_FACTOR = 1.0
MCORE_LLAMA3_HIGH_FREQ_FACTOR = 4.0
MCORE_LLAMA3_ORIGINAL_MAX_POSITION = 8192

# config.json keys that describe the architecture; everything else of the original config (token ids,
# dtype, generation defaults) is carried through unchanged on export. layer_types (one entry per layer,
# written by transformers 5 for qwen2 / qwen3) is left for the config class to rebuild: kept, it would no
# longer match a depth-pruned model's num_hidden_layers, which transformers refuses
_ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "norm_eps",
              "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
              "attention_bias", "mlp_bias", "model_type", "architectures", "torch_dtype", "dtype",
              "transformers_version", "layer_types", "no_rope_layers", "no_rope_layer_interval",
              "auto_map")  # remote-code classes (Phi-3's configuration_phi3.py ...): not copied, not for new sizes


# config.json keys by which a mixture-of-experts model says how many experts it has (Mixtral, Qwen2/3-MoE,
# DeepSeek, OLMoE, ...): named in the error, since their model_type alone does not say why it is refused
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def detect_family(hf_config: dict) -> str:
    model_type = hf_config.get("model_type")
    experts = {k: hf_config[k] for k in _EXPERT_KEYS if hf_config.get(k)}
    if experts:
        raise ValueError(f"model_type={model_type!r} is a mixture-of-experts model ({experts}); megatron-minitron "
                         f"prunes and distills dense GPTs only (supported families: "
                         f"{', '.join(SUPPORTED_FAMILIES)})")
    if model_type in SUPPORTED_FAMILIES:
        return model_type
    archs = hf_config.get("architectures") or []
    for family, cls in _ARCHITECTURE_CLASS.items():
        if cls in archs:
            return family
    raise ValueError(
        f"unsupported Hugging Face architecture model_type={model_type!r} architectures={archs}; "
        f"supported families: {', '.join(SUPPORTED_FAMILIES)} "
        f"({', '.join(_ARCHITECTURE_CLASS.values())})")


def _rope_settings(cfg: dict, where: str = "config.json") -> dict:
    """Flatten the rope fields of either config layout into one dict (rope_type, rope_theta, ...)."""
    def named(rope: dict) -> dict:  # transformers 4.x wrote the rope type as "type"
        rope = dict(rope or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        return rope

    params, legacy = named(cfg.get("rope_parameters")), named(cfg.get("rope_scaling"))
    if params and legacy and params != legacy:
        # e.g. a transformers-5 config (rope_parameters) with a model card's rope_scaling block pasted in
        differ = sorted(k for k in set(params) | set(legacy) if params.get(k) != legacy.get(k))
        raise ValueError(f"{where} has both rope_parameters and rope_scaling, and they differ in {differ}: "
                         f"transformers 5 reads rope_scaling alone in place of rope_parameters (so a key only in "
                         f"rope_parameters, such as its rope_theta, is ignored); keep one of the two")
    for key, value in legacy.items():
        params.setdefault(key, value)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in cfg:
        params.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    return params


def _llama3_scaling(rope: dict, where: str) -> float:
    expected = {"low_freq_factor": MCORE_LLAMA3_LOW_FREQ_FACTOR,
                "high_freq_factor": MCORE_LLAMA3_HIGH_FREQ_FACTOR,
                "original_max_position_embeddings": MCORE_LLAMA3_ORIGINAL_MAX_POSITION}
    for key, value in expected.items():
        if key not in rope or float(rope[key]) != value:
            raise ValueError(
                f"{where}: rope_scaling {key}={rope.get(key)!r}, but megatron-core implements Llama-3.x rope "
                f"scaling only with low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings="
                f"8192 (Llama-3.1's values); this model cannot be converted faithfully")
    if "factor" not in rope:
        raise ValueError(f"{where}: rope_scaling of type llama3 lacks 'factor'")
    return float(rope["factor"])


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature term (the paper's sqrt(1/t)), as transformers and megatron-core define it."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# the rope keys transformers' YaRN reads (modeling_rope_utils._compute_yarn_parameters), plus the common ones
_YARN_KEYS = frozenset(("rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
                        "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim", "truncate"))


def _yarn_fields(rope: dict, cfg: dict, where: str) -> dict:
    """ModelArch's yarn_* fields for HF rope_type "yarn", following transformers' _compute_yarn_parameters
    (defaults, and which of factor / mscale / attention_factor decides the concentration)."""
    unknown = sorted(k for k, v in rope.items() if k not in _YARN_KEYS and v is not None)
    if unknown:  # e.g. Ministral 3's llama_4_scaling_beta: a per-position query scale on top of YaRN
        raise ValueError(f"{where}: the yarn rope settings {unknown} are not part of the YaRN megatron-core "
                         f"implements; this model cannot be converted faithfully")
    max_positions = int(cfg.get("max_position_embeddings", 4096))
    # transformers prefers a top-level original_max_position_embeddings (Phi-3's layout) to the rope dict's
    original = int(cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                   or max_positions)
    if rope.get("factor") is None:
        raise ValueError(f"{where}: rope_scaling of type yarn lacks 'factor' (transformers 5 refuses it too); add "
                         f"the context extension factor, e.g. max_position_embeddings / "
                         f"original_max_position_embeddings = {max_positions / original:g}")
    factor = float(rope["factor"])
    if factor < 1.0:
        raise ValueError(f"{where}: yarn rope factor={factor} < 1; YaRN stretches the context, factor >= 1")
    fields = dict(yarn_rotary_scaling_factor=factor, yarn_original_max_position_embeddings=original,
                  yarn_beta_fast=float(rope.get("beta_fast") or 32), yarn_beta_slow=float(rope.get("beta_slow") or 1),
                  yarn_correction_range_round_to_int=bool(rope.get("truncate", True)),
                  yarn_mscale=None, yarn_mscale_all_dim=None)
    mscale, mscale_all_dim, attention = rope.get("mscale"), rope.get("mscale_all_dim"), rope.get("attention_factor")
    if attention is None:
        if mscale and mscale_all_dim:  # transformers uses the pair only when both are non-zero
            fields.update(yarn_mscale=float(mscale), yarn_mscale_all_dim=float(mscale_all_dim))
        return fields
    attention = float(attention)
    if abs(attention - _yarn_mscale(factor)) <= 1e-12 * attention:
        return fields  # megatron's default
    if factor <= 1.0:
        raise ValueError(f"{where}: yarn attention_factor={attention} with factor={factor}: megatron-core's YaRN "
                         f"has no attention scaling without a factor > 1; this model cannot be converted faithfully")
    # megatron-core has no attention_factor; mscale_all_dim = 0 makes its concentration 0.1 mscale ln f + 1
    fields.update(yarn_mscale=(attention - 1.0) / (0.1 * math.log(factor)), yarn_mscale_all_dim=0.0)
    return fields


_LONGROPE_KEYS = frozenset(("rope_type", "type", "rope_theta", "partial_rotary_factor", "short_factor", "long_factor",
                            "factor", "attention_factor", "original_max_position_embeddings"))


def _longrope_attention(max_positions: int, original: int) -> float:
    """transformers' default LongRoPE attention factor, from the two context lengths."""
    factor = max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _longrope_fields(rope: dict, cfg: dict, where: str, family: str = "") -> dict:
    """ModelArch's longrope_* fields for HF rope_type "longrope" (transformers' _compute_longrope_parameters:
    the attention factor is resolved here, from the config's own context lengths, and stored)."""
    unknown = sorted(k for k, v in rope.items() if k not in _LONGROPE_KEYS and v is not None)
    if unknown:
        raise ValueError(f"{where}: the longrope settings {unknown} are not part of LongRoPE as transformers "
                         f"defines it; this model cannot be converted faithfully")
    if not rope.get("short_factor") or not rope.get("long_factor"):
        raise ValueError(f"{where}: rope_scaling of type longrope needs short_factor and long_factor lists")
    max_positions = int(cfg.get("max_position_embeddings", 4096))
    if family == "phi3":  # Phi3Config's own key (default 4096) always overrides the rope dict's
        original = int(cfg.get("original_max_position_embeddings") or 4096)
    else:
        original = int(cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                       or max_positions)
    factor = rope.get("factor")
    attention = rope.get("attention_factor")
    if attention is None:
        attention = (_longrope_attention(max_positions, original) if factor is None else
                     1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    return dict(longrope_short_factor=[float(x) for x in rope["short_factor"]],
                longrope_long_factor=[float(x) for x in rope["long_factor"]],
                longrope_original_max_position_embeddings=original, longrope_attention_factor=float(attention))


def _longrope_rope_scaling(arch: ModelArch, family: str, max_positions: int) -> dict:
    """The HF ``rope_scaling`` for LongRoPE. Phi-3's, when the attention factor is the one transformers derives
    from the context lengths, in the three-key form transformers 4.x's Phi3Config requires (it ignores an
    explicit attention_factor; 5.x reads the form alike); else with the factor spelled out (transformers 5)."""
    original = arch.longrope_original_max_position_embeddings
    factors = {"short_factor": list(arch.longrope_short_factor), "long_factor": list(arch.longrope_long_factor)}
    derived = _longrope_attention(max_positions, original)
    if family == "phi3" and abs(derived - arch.longrope_attention_factor) <= 1e-12 * derived:
        return {"type": "longrope", **factors}  # original_max_position_embeddings: Phi3Config's own key
    return {"rope_type": "longrope", **factors, "original_max_position_embeddings": original,
            "attention_factor": arch.longrope_attention_factor}


def yarn_rope_scaling(arch: ModelArch) -> dict:
    """The HF ``rope_scaling`` dict (rope_type "yarn") computing what megatron-core's YaRN computes for arch."""
    rope = {"rope_type": "yarn", "factor": float(arch.yarn_rotary_scaling_factor),
            "original_max_position_embeddings": int(arch.yarn_original_max_position_embeddings),
            "beta_fast": float(arch.yarn_beta_fast), "beta_slow": float(arch.yarn_beta_slow)}
    if not arch.yarn_correction_range_round_to_int:
        rope["truncate"] = False
    mscale, mscale_all_dim = arch.yarn_mscale, arch.yarn_mscale_all_dim
    if mscale and mscale_all_dim:
        rope.update(mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
    elif mscale is not None and mscale_all_dim is not None:  # transformers would ignore a zero in the pair
        factor = arch.yarn_rotary_scaling_factor
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        rope["attention_factor"] = float(f"{attention:.15g}")  # a decimal that read back gives the same mscale
    return rope


def arch_from_hf_config(hf_config: dict, where: str = "config.json") -> tuple[ModelArch, str]:
    """(ModelArch, family) for a Hugging Face config dict; ValueError for anything not convertible."""
    family = detect_family(hf_config)
    cfg = hf_config
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = _rope_settings(cfg, where)
    rope_type = rope["rope_type"]
    if family == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi3Config's old names for it (convert_rope_params_to_dict renames them)
    if rope_type not in ("default", "llama3", "yarn", "longrope"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (plain RoPE, Llama-3.x scaling, YaRN "
                         f"and LongRoPE are)")
    rope_scaling = rope_type == "llama3"
    rope_factor = _llama3_scaling(rope, where) if rope_scaling else 8.0
    scaling_fields = (_yarn_fields(rope, cfg, where) if rope_type == "yarn" else
                      _longrope_fields(rope, cfg, where, family) if rope_type == "longrope" else {})
    scaled = bool(scaling_fields)

    if family == "nemotron":
        act, expected_act = "squared_relu", "relu2"
        norm, eps, zero_centred = "LayerNorm", float(cfg.get("norm_eps", 1e-5)), True
        rotary_percent = float(rope.get("partial_rotary_factor", 0.5))
    else:
        act, expected_act = ("squared_relu", "relu2") if family == "arcee" else ("swiglu", "silu")
        norm, eps, zero_centred = "RMSNorm", float(cfg.get("rms_norm_eps", 1e-6)), False
        rotary_percent = float(rope.get("partial_rotary_factor", 1.0))
    hidden_act = cfg.get("hidden_act", expected_act)
    if hidden_act != expected_act:
        raise ValueError(f"{where}: {family} with hidden_act={hidden_act!r} is not supported "
                         f"(expected {expected_act!r})")

    attention_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} cannot be "
                         "represented: megatron's add_bias_linear covers attention and MLP linears together")
    if family in ("qwen2", "qwen3") and (cfg.get("use_sliding_window")
                                          or "sliding_attention" in (cfg.get("layer_types") or ())):
        raise ValueError(f"{where}: {family} with sliding-window layers (use_sliding_window=true) is not "
                         "supported (megatron's GPTModel here attends over the whole causal context)")
    no_rope = _no_rope_flags(cfg, where) if family == "smollm3" else None
    window = cfg.get("sliding_window")
    if family in ("mistral", "phi3") and window and window < int(cfg.get("max_position_embeddings", 0)):
        warnings.warn(f"{where}: sliding_window={window} is ignored; megatron attends over the full causal "
                      f"context, which matches transformers only for sequences up to {window} tokens")

    vocab = int(cfg["vocab_size"])
    arch = ModelArch(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=int(head_dim),
        vocab_size=vocab,
        seq_length=int(cfg.get("max_position_embeddings", 4096)),
        normalization=norm,
        norm_epsilon=eps,
        layernorm_zero_centered_gamma=zero_centred,
        activation=act,
        position_embedding=rope_type if scaled else "rope",
        rotary_base=float(rope["rope_theta"]),
        rotary_percent=rotary_percent,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        add_bias_linear=attention_bias,
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        no_rope_freq=no_rope,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # 1: the embedding holds exactly vocab_size rows whenever TP divides vocab_size (docs/hf_conversion.md)
        make_vocab_size_divisible_by=1,
        **scaling_fields,
    )
    if float(arch.rotary_base) != float(int(arch.rotary_base)):
        raise ValueError(f"{where}: rope_theta={arch.rotary_base} is not an integer; megatron-core's "
                         "GPTModel takes an integer rotary_base")
    arch.validate()
    return arch, family


def _no_rope_flags(cfg: dict, where: str) -> Optional[list]:
    """SmolLM3Config's per-layer rope flags (1 = the layer rotates; the default: every
    ``no_rope_layer_interval``-th layer does not) as megatron's no_rope_freq (1 = skips); None if all rotate."""
    layers = int(cfg["num_hidden_layers"])
    if cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None:
        raise ValueError(f"{where}: smollm3 with sliding-window layers (use_sliding_window=true) is not supported "
                         "(megatron's GPTModel here attends over the whole causal context)")
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = int(cfg.get("no_rope_layer_interval", 4))
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    if len(flags) != layers:
        raise ValueError(f"{where}: no_rope_layers has {len(flags)} entries for {layers} layers")
    skips = [1 - int(bool(f)) for f in flags]
    return skips if any(skips) else None


def family_for_arch(arch: ModelArch) -> str:
    """The HF family that can represent ``arch`` when nothing else says which one it came from."""
    if arch.activation == "squared_relu" and arch.normalization == "LayerNorm":
        return "nemotron"
    if arch.activation == "squared_relu":
        return "arcee"  # squared ReLU with RMSNorm
    if arch.qk_layernorm:
        return "qwen3"
    if arch.add_qkv_bias and not arch.add_bias_linear:
        return "qwen2"
    if arch.rotary_percent != 1.0:
        return "phi3"  # the SwiGLU family with partial rotary (Phi-4-mini)
    if arch.no_rope_freq and any(arch.no_rope_freq):
        return "smollm3"  # the family with layers that skip RoPE
    return "llama"


def _transformers_major() -> int:
    try:
        from importlib.metadata import version
        return int(version("transformers").split(".")[0])
    except Exception:  # not installed: the export itself does not need it
        return 0


def check_arch_exportable(arch: ModelArch, family: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    problems = []
    if arch.position_embedding not in ROTARY_EMBEDDINGS:
        problems.append(f"position_embedding={arch.position_embedding} (HF families here rotate q and k: "
                        f"{', '.join(ROTARY_EMBEDDINGS)})")
    if family == "nemotron":
        if arch.activation != "squared_relu" or arch.normalization != "LayerNorm" \
                or not arch.layernorm_zero_centered_gamma:
            problems.append("nemotron needs squared_relu, LayerNorm and layernorm_zero_centered_gamma")
    else:
        activation = "squared_relu" if family == "arcee" else "swiglu"
        if arch.activation != activation or arch.normalization != "RMSNorm" or arch.layernorm_zero_centered_gamma:
            problems.append(f"{family} needs {activation} and RMSNorm without zero-centred gamma")
        if arch.rotary_percent != 1.0 and family != "phi3":
            problems.append(f"{family} rotates the whole head dim (rotary_percent=1)")
    if family == "qwen2":
        if not arch.add_qkv_bias or arch.add_bias_linear:
            problems.append("qwen2 has a bias on q/k/v only (add_qkv_bias=true, add_bias_linear=false)")
    elif arch.add_qkv_bias and not arch.add_bias_linear:
        problems.append(f"{family} has no q/k/v-only bias (that is qwen2)")
    if family in ("mistral", "phi3") and arch.add_bias_linear:
        problems.append(f"{family} has no linear biases")
    if family == "qwen3":
        if not arch.qk_layernorm:
            problems.append("qwen3 normalises each query and key head (qk_layernorm=true)")
        if arch.add_bias_linear or arch.add_qkv_bias:
            problems.append("qwen3 here has no linear biases (attention_bias=false)")
    elif arch.qk_layernorm:
        problems.append(f"{family} has no query/key layer norm (that is qwen3)")
    if arch.no_rope_freq and any(arch.no_rope_freq) and family != "smollm3":
        problems.append(f"{family} rotates q and k in every layer; layers without RoPE (no_rope_freq) are smollm3's")
    if family == "phi3" and arch.position_embedding == "yarn":
        problems.append("transformers' Phi3Config takes default or longrope rope only, not yarn")
    if family == "phi3" and arch.position_embedding == "longrope" \
            and arch.hidden_size // arch.num_attention_heads != arch.head_dim:
        problems.append(f"transformers' Phi3Config checks the longrope factor lists against hidden_size // "
                        f"num_attention_heads ({arch.hidden_size // arch.num_attention_heads}), not head_dim "
                        f"({arch.head_dim}): prune to hidden_size = num_attention_heads x {arch.head_dim}")
    if arch.rope_scaling and family not in ("llama",):
        problems.append(f"{family} has no llama3 rope scaling")
    heads = arch.num_attention_heads
    if arch.hidden_size % heads and _transformers_major() >= 5:
        lower, upper = arch.hidden_size // heads * heads, (arch.hidden_size // heads + 1) * heads
        problems.append(f"hidden_size={arch.hidden_size} is not a multiple of num_attention_heads={heads}: "
                        f"transformers {_transformers_major()}.x refuses such a config (validate_architecture) "
                        f"even with head_dim given; prune to a hidden size divisible by {heads}, e.g. "
                        f"{lower} or {upper}")
    if problems:
        raise ValueError(f"cannot export this model as {family}: " + "; ".join(problems))


def hf_config_from_arch(arch: ModelArch, family: Optional[str] = None, base: Optional[dict] = None,
                        dtype: str = "float32") -> dict:
    """config.json for ``arch``. ``base``: the original HF config, whose non-architecture fields (token
    ids, generation settings) are kept; architecture fields always come from ``arch`` (it may be pruned)."""
    family = family or family_for_arch(arch)
    check_arch_exportable(arch, family)
    cfg = {k: v for k, v in (base or {}).items() if k not in _ARCH_KEYS}
    cfg.update(
        architectures=[_ARCHITECTURE_CLASS[family]],
        model_type=family,
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.query_groups,
        head_dim=arch.head_dim,
        tie_word_embeddings=arch.tie_embeddings,
        rope_theta=float(arch.rotary_base),
        torch_dtype=dtype,  # transformers 4.x reads torch_dtype, 5.x dtype (and torch_dtype as a fallback)
        dtype=dtype,
    )
    cfg.setdefault("max_position_embeddings", arch.seq_length)
    cfg.setdefault("initializer_range", arch.init_method_std)
    if family == "nemotron":
        cfg.update(hidden_act="relu2", norm_eps=arch.norm_epsilon, partial_rotary_factor=arch.rotary_percent)
    else:
        cfg.update(hidden_act="relu2" if family == "arcee" else "silu", rms_norm_eps=arch.norm_epsilon)
    if family in ("llama", "nemotron", "smollm3", "arcee"):
        cfg.update(attention_bias=arch.add_bias_linear, mlp_bias=arch.add_bias_linear)
    if family == "smollm3":
        cfg.setdefault("use_sliding_window", False)
        cfg["no_rope_layers"] = [1 - int(x) for x in (arch.no_rope_freq or [0] * arch.num_layers)]
    if family in ("qwen3", "phi3"):
        cfg.update(attention_bias=False)
    if family in ("qwen2", "qwen3"):
        cfg.setdefault("use_sliding_window", False)
    if family in ("mistral", "phi3"):  # MistralConfig defaults to a 4096-token window megatron never applies
        cfg.setdefault("sliding_window", None)
    if family in ("phi3", "smollm3"):
        # their config classes default to ids past a small vocabulary (Phi3: pad 32000; SmolLM3: 128004), which
        # transformers then uses as the embedding's padding_idx; None until the tokenizer's fill them
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            cfg.setdefault(key, None)
    if family == "phi3":
        if arch.rotary_percent != 1.0:
            cfg["partial_rotary_factor"] = arch.rotary_percent
        if arch.position_embedding == "longrope":  # Phi3Config's own key wins over the rope dict's
            cfg["original_max_position_embeddings"] = arch.longrope_original_max_position_embeddings
    if arch.rope_scaling:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(arch.rope_scaling_factor),
                               "low_freq_factor": MCORE_LLAMA3_LOW_FREQ_FACTOR,
                               "high_freq_factor": MCORE_LLAMA3_HIGH_FREQ_FACTOR,
                               "original_max_position_embeddings": MCORE_LLAMA3_ORIGINAL_MAX_POSITION}
    if arch.position_embedding == "yarn":
        cfg["rope_scaling"] = yarn_rope_scaling(arch)
    if arch.position_embedding == "longrope":
        cfg["rope_scaling"] = _longrope_rope_scaling(arch, family, int(cfg["max_position_embeddings"]))
    return cfg
