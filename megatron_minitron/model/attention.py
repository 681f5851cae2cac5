"""``FusedRoPESelfAttention``: megatron's ``SelfAttention`` with rotary embeddings through our Triton kernel.

megatron-core's ``SelfAttention.forward`` (0.16-0.19) applies RoPE with its module-level
``apply_rotary_pos_emb`` right after ``get_query_key_value_tensors``, with no hook to swap the function
short of patching megatron's globals. This subclass uses the one overridable step instead: on the
training path it hands megatron ``rotary_pos_emb=None`` (so megatron skips its own RoPE) and rotates the
query and key inside ``get_query_key_value_tensors``, i.e. after the q/k layernorms, exactly where megatron
would, with the same frequencies and YaRN concentration factor (mscale). Any call the kernel does not
cover falls through to megatron unchanged: inference (a KV-cache context), packed sequences, cross
attention inputs, precomputed cos/sin, and configs with TE's RoPE fusion, interleaved or MLA-style
rotation, fused single-qkv RoPE, flash decode or per-layer no-RoPE.

No parameters of its own: the state dict (and so every checkpoint) is ``SelfAttention``'s. The builder
uses it only where train.fused_kernels is usable (``builder.fused_kernels_usable``).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention

# keyword arguments of SelfAttention.forward that take a path our kernel does not implement when set
_FALL_THROUGH_WHEN_SET = ("key_value_states", "inference_context", "inference_params", "rotary_pos_cos",
                          "rotary_pos_sin", "rotary_pos_cos_sin", "packed_seq_params")
# config flags (any megatron version that has them) under which megatron's RoPE differs from ours
_FALL_THROUGH_CONFIG = ("apply_rope_fusion", "rotary_interleaved", "multi_latent_attention",
                        "fused_single_qkv_rope", "flash_decode")


def rope_freqs_for_kernel(rotary_pos_emb):
    """(q_freqs, k_freqs) the kernel can apply (either may be None: megatron then skips that tensor), or
    None when megatron must handle ``rotary_pos_emb`` itself (absent, or not [s, 1, 1, even rot_dim])."""
    if rotary_pos_emb is None:
        return None
    pair = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
    if len(pair) != 2 or all(f is None for f in pair):
        return None
    for freqs in pair:
        if freqs is None:
            continue
        if (not isinstance(freqs, torch.Tensor) or freqs.dim() != 4 or freqs.shape[1] != 1
                or freqs.shape[2] != 1 or freqs.shape[-1] % 2):
            return None  # e.g. mRoPE's per-batch frequencies: megatron's path
    return pair


class FusedRoPESelfAttention(SelfAttention):
    _pending_rope = None  # (q_freqs, k_freqs, mscale) for the forward in progress, consumed by the qkv step

    def _kernel_covers(self, args, kwargs) -> bool:
        if args or self.attention_type != "self":  # only the keyword call TransformerLayer makes
            return False
        if any(kwargs.get(name) is not None for name in _FALL_THROUGH_WHEN_SET):
            return False
        config = self.config
        if any(getattr(config, flag, False) for flag in _FALL_THROUGH_CONFIG):
            return False
        no_rope = getattr(config, "no_rope_freq", None)
        return not (no_rope and no_rope[self.layer_number - 1])

    def _mscale(self) -> float:
        cached = getattr(self, "_yarn_concentration_factor", None)  # megatron >= 0.19 caches it
        if cached is not None:
            return float(cached)
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config)
        return float(_yarn_get_concentration_factor_from_config(self.config))

    def forward(self, hidden_states, *args, **kwargs):
        pair = rope_freqs_for_kernel(kwargs.get("rotary_pos_emb"))
        if pair is None or not self._kernel_covers(args, kwargs):
            return super().forward(hidden_states, *args, **kwargs)
        kwargs["rotary_pos_emb"] = None
        self._pending_rope = (*pair, self._mscale())
        try:
            return super().forward(hidden_states, **kwargs)
        finally:
            self._pending_rope = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        pending = self._pending_rope
        if pending is None:
            return qkv
        self._pending_rope = None  # once per forward
        # rotary_pos_emb=None makes megatron ask for split q, k, v (+ gate with attention_output_gate)
        assert kwargs.get("split_qkv", True) and len(qkv) >= 3, "megatron asked for an unsplit qkv"
        from ..kernels.rope_triton import triton_apply_rotary_pos_emb

        q_freqs, k_freqs, mscale = pending
        query, key, *rest = qkv
        if q_freqs is not None:
            query = triton_apply_rotary_pos_emb(query, q_freqs, mscale)
        if k_freqs is not None:
            key = triton_apply_rotary_pos_emb(key, k_freqs, mscale)
        return (query, key, *rest)
