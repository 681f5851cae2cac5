"""Hugging Face rope settings <-> ModelArch's rope fields: plain RoPE, Llama-3.x scaling, YaRN, LongRoPE.

Reads both config layouts (``rope_theta`` + ``rope_scaling``, transformers 4.x; ``rope_parameters``, 5.x) and
follows transformers' own rope code (modeling_rope_utils: ``_compute_yarn_parameters``,
``_compute_longrope_parameters``) for defaults and precedence; what megatron-core cannot compute exactly is
refused. Exports use the legacy ``rope_scaling`` key, which both major versions of transformers read.
"""
from __future__ import annotations

import math
from typing import Optional

from ..config import ModelArch

# megatron-core's fixed Llama-3.x scaling constants (megatron/core/models/common/embeddings/
# rotary_pos_embedding.py, RotaryEmbedding._apply_scaling defaults)
MCORE_LLAMA3_LOW_FREQ_FACTOR = 1.0
MCORE_LLAMA3_HIGH_FREQ_FACTOR = 4.0
MCORE_LLAMA3_ORIGINAL_MAX_POSITION = 8192


def rope_settings(cfg: dict, where: str = "config.json") -> dict:
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


def _longrope_attention(factor: float, original: int) -> float:
    """transformers' default LongRoPE attention factor (``factor``: max_position_embeddings / original unless
    the config gives one)."""
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
        attention = _longrope_attention(max_positions / original if factor is None else factor, original)
    return dict(longrope_short_factor=[float(x) for x in rope["short_factor"]],
                longrope_long_factor=[float(x) for x in rope["long_factor"]],
                longrope_original_max_position_embeddings=original, longrope_attention_factor=float(attention))


def _longrope_rope_scaling(arch: ModelArch, family: str, max_positions: int) -> dict:
    """The HF ``rope_scaling`` for LongRoPE. Phi-3's, when the attention factor is the one transformers derives
    from the context lengths, in the three-key form transformers 4.x's Phi3Config requires (it ignores an
    explicit attention_factor; 5.x reads the form alike); else with the factor spelled out (transformers 5)."""
    original = arch.longrope_original_max_position_embeddings
    factors = {"short_factor": list(arch.longrope_short_factor), "long_factor": list(arch.longrope_long_factor)}
    derived = _longrope_attention(max_positions / original, original)
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


def arch_rope_fields(cfg: dict, family: str, where: str) -> tuple[dict, dict]:
    """(the flattened rope settings, ModelArch's rope fields) for a config.json of ``family``."""
    rope = rope_settings(cfg, where)
    rope_type = rope["rope_type"]
    if family == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi3Config's old names for it (convert_rope_params_to_dict renames them)
    if rope_type not in ("default", "llama3", "yarn", "longrope"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (plain RoPE, Llama-3.x scaling, YaRN "
                         f"and LongRoPE are)")
    fields = dict(position_embedding=rope_type if rope_type in ("yarn", "longrope") else "rope",
                  rotary_base=float(rope["rope_theta"]), rope_scaling=rope_type == "llama3",
                  rope_scaling_factor=_llama3_scaling(rope, where) if rope_type == "llama3" else 8.0)
    if rope_type == "yarn":
        fields.update(_yarn_fields(rope, cfg, where))
    if rope_type == "longrope":
        fields.update(_longrope_fields(rope, cfg, where, family))
    return rope, fields


def rope_scaling_config(arch: ModelArch, family: str, max_positions: int) -> Optional[dict]:
    """The exported ``rope_scaling`` (None for plain RoPE)."""
    if arch.rope_scaling:
        return {"rope_type": "llama3", "factor": float(arch.rope_scaling_factor),
                "low_freq_factor": MCORE_LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": MCORE_LLAMA3_HIGH_FREQ_FACTOR,
                "original_max_position_embeddings": MCORE_LLAMA3_ORIGINAL_MAX_POSITION}
    if arch.position_embedding == "yarn":
        return yarn_rope_scaling(arch)
    if arch.position_embedding == "longrope":
        return _longrope_rope_scaling(arch, family, max_positions)
    return None
