"""LongRoPE (Phi-3 / Phi-3.5 / Phi-4-mini, HF ``rope_type: longrope``) on megatron-core's GPTModel.

megatron-core implements plain RoPE, Llama-3.x scaling and YaRN. LongRoPE divides each rotary frequency by a
per-frequency factor, one list for sequences up to the pretrained context and another beyond it, and scales
cos / sin by an attention factor. Here it is megatron's own ``RotaryEmbedding`` with those inverse
frequencies (chosen by the sequence length of each forward, as transformers' ``longrope_frequency_update``
chooses them), and the attention factor goes through the one place megatron's attention takes such a factor:
the YaRN concentration it reads off the config (``_yarn_get_concentration_factor_from_config``), set so
that it equals the factor.
"""
from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from ..config import ModelArch


def longrope_inv_freq(arch: ModelArch, factors) -> torch.Tensor:
    """1 / (factor_i * base^(2i / rot_dim)): transformers' _compute_longrope_parameters for one factor list."""
    dim = int(arch.head_dim * arch.rotary_percent)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * arch.rotary_base ** exponent)


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` whose inverse frequencies are LongRoPE's short ones for a forward over at most
    ``original_max_position_embeddings`` positions (offset + length), the long ones beyond."""

    def __init__(self, arch: ModelArch, cp_group=None):
        super().__init__(kv_channels=arch.head_dim, rotary_percent=arch.rotary_percent,
                         rotary_base=int(arch.rotary_base), use_cpu_initialization=True, cp_group=cp_group)
        self.short_inv_freq = longrope_inv_freq(arch, arch.longrope_short_factor)
        self.long_inv_freq = longrope_inv_freq(arch, arch.longrope_long_factor)
        self.original_max_position_embeddings = arch.longrope_original_max_position_embeddings
        self.inv_freq = self.short_inv_freq

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        chosen = self.long_inv_freq if offset + max_seq_len > self.original_max_position_embeddings \
            else self.short_inv_freq
        device = self.inv_freq.device if self.inv_freq.device.type != "cpu" else torch.cuda.current_device()
        self.inv_freq = chosen.to(device)  # the parent's forward is cached per length, so this runs once per length
        return super().get_emb(max_seq_len, offset)


def concentration_config(arch: ModelArch) -> dict:
    """The config attributes that make megatron's attention scale cos / sin by LongRoPE's attention factor:
    with yarn_mscale_all_dim = 0 its YaRN concentration is 0.1 * yarn_mscale * ln(f) + 1 for any f > 1."""
    factor = arch.longrope_attention_factor
    if factor == 1.0:
        return {}
    scale = math.e  # any scale > 1 works; ln(e) = 1 keeps yarn_mscale readable: (factor - 1) / 0.1
    return {"yarn_rotary_scaling_factor": scale, "yarn_mscale": (factor - 1.0) / 0.1, "yarn_mscale_all_dim": 0.0}


def install(model, arch: ModelArch) -> None:
    """Swap the GPTModel's rotary embedding (built as plain rope) for LongRoPE's."""
    if getattr(model, "rotary_pos_emb", None) is not None:
        model.rotary_pos_emb = LongRopeRotaryEmbedding(arch, cp_group=model.rotary_pos_emb.cp_group)
