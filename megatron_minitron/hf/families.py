"""Hugging Face ``config.json`` <-> ``ModelArch`` for the supported model families.

Works on the raw JSON dict (no ``transformers`` import needed); the rope settings are rope.py's.

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

import warnings
from typing import Optional

from ..config import ROTARY_EMBEDDINGS, ModelArch
from .rope import arch_rope_fields, rope_scaling_config

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "arcee", "nemotron")
_ARCHITECTURE_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                       "smollm3": "SmolLM3ForCausalLM", "arcee": "ArceeForCausalLM",
                       "nemotron": "NemotronForCausalLM"}
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


def arch_from_hf_config(hf_config: dict, where: str = "config.json") -> tuple[ModelArch, str]:
    """(ModelArch, family) for a Hugging Face config dict; ValueError for anything not convertible."""
    family = detect_family(hf_config)
    cfg = hf_config
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    rope, rope_fields = arch_rope_fields(cfg, family, where)

    if family == "nemotron":
        act, expected_act = "squared_relu", "relu2"
        norm, eps, zero_centred = "LayerNorm", float(cfg.get("norm_eps", 1e-5)), True
        rotary_percent = float(rope.get("partial_rotary_factor", 0.5))
    else:
        act, expected_act = ("squared_relu", "relu2") if family == "arcee" else ("swiglu", "silu")
        # the config classes' own default when the key is absent
        default_eps = 1e-5 if family in ("phi3", "arcee") else 1e-6
        norm, eps, zero_centred = "RMSNorm", float(cfg.get("rms_norm_eps", default_eps)), False
        rotary_percent = float(rope.get("partial_rotary_factor", 1.0))
        if rotary_percent != 1.0 and family not in ("phi3",):
            raise ValueError(f"{where}: partial_rotary_factor={rotary_percent}, but transformers' {family} rotates "
                             f"the whole head dim (its rope ignores the key); remove it from config.json if the "
                             f"model was trained with transformers, or convert it as a family that honours it")
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
        rotary_percent=rotary_percent,
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
        **rope_fields,
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
    if arch.rope_scaling and family in ("phi3",):  # the others' rope takes any rope_type transformers knows
        problems.append(f"{family} has no llama3 rope scaling (transformers' Phi3Config: default or longrope)")
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
    if family in ("phi3", "smollm3", "arcee"):
        # their config classes default to ids past a small vocabulary (Phi3: pad 32000; SmolLM3: 128004; Arcee:
        # bos 128000), which transformers then uses (the embedding's padding_idx); None until the tokenizer's fill them
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            cfg.setdefault(key, None)
    if family == "phi3":
        if arch.rotary_percent != 1.0:
            cfg["partial_rotary_factor"] = arch.rotary_percent
        if arch.position_embedding == "longrope":  # Phi3Config's own key wins over the rope dict's
            cfg["original_max_position_embeddings"] = arch.longrope_original_max_position_embeddings
    scaling = rope_scaling_config(arch, family, int(cfg["max_position_embeddings"]))
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg
