"""Local-spec building blocks that megatron-core's local spec lacks.

- ``SDPAttention``: core attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
  kernels on GPU) instead of megatron's unfused baddbmm + softmax + bmm path. Same inputs and outputs as
  ``megatron.core.transformer.dot_product_attention.DotProductAttention``.
- ``Norm``: RMSNorm / LayerNorm that, unlike megatron's ``WrappedTorchNorm``, supports sequence
  parallelism (marks its weights so megatron all-reduces their grads) and Nemotron's zero-centred gamma.
  ``FusedRMSNorm`` is the same with RMSNorm through the Triton kernels (opt-in: train.fused_kernels).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE spec")
        if pg_collection is not None:
            tp_size = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp_size)
        self.groups = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # megatron: [s, b, heads, d] -> sdpa: [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron's mask is True where attention is *not* allowed
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0:
            from megatron.core import tensor_parallel
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._sdpa(q, k, v, mask, causal, dropout)
        else:
            out = self._sdpa(q, k, v, mask, causal, dropout)
        return self._merge_heads(out)

    def _merge_heads(self, out):
        """SDPA's [b, heads, s, d] -> megatron's [s, b, heads * d]. A subclass may return another form of
        the same rows (the FP8 teacher's attention fuses this transpose with quantizing them)."""
        b, _, s, _ = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)

    def _sdpa(self, q, k, v, mask, causal, dropout):
        gqa = self.heads != self.groups
        if gqa and not fused_kernel_takes_gqa(q.device.type, q.dtype, mask is not None):
            # one kv head per query head (megatron's grouping: query head i reads group i // (heads / groups))
            k, v = (t.repeat_interleave(self.heads // self.groups, dim=1) for t in (k, v))
            gqa = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa)


def fused_kernel_takes_gqa(device_type: str, dtype: torch.dtype, has_mask: bool) -> bool:
    """Whether SDPA can run grouped-query attention (fewer kv heads, ``enable_gqa``) in a fused kernel. On CUDA
    flash attention takes it for fp16/bf16 without a mask. For fp32 (an fp32 teacher, a prune of an fp32
    checkpoint) or with a mask, torch releases whose memory-efficient / cuDNN kernels require equal head
    counts fall back to the unfused math kernel, which materialises [b, heads, s, s] fp32 scores (8.6 GB per
    sequence at 32 heads and 8k tokens); repeating the kv heads (2 x [b, heads, s, d]) lets a fused kernel
    run on every release. On CPU the flash kernel takes GQA in fp32 and bf16."""
    if device_type != "cuda":
        return True
    return dtype in (torch.float16, torch.bfloat16) and not has_mask


class Norm(torch.nn.Module):
    """RMSNorm or LayerNorm over the hidden dimension, with megatron's constructor signature."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.kind = config.normalization
        if self.kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization {self.kind!r}: RMSNorm or LayerNorm")
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = 0.0 if self.zero_centered_gamma else 1.0
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), init, dtype=config.params_dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
                     if self.kind == "LayerNorm" else None)
        # megatron all-reduces the grads of params marked so across the TP group under SP
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    fused = False  # FusedRMSNorm: RMSNorm through kernels/rmsnorm_triton.py (train.fused_kernels)

    def forward(self, x):
        if self.fused and self.kind == "RMSNorm":
            from ..kernels.rmsnorm_triton import triton_rms_norm
            return triton_rms_norm(x, self.weight, self.eps, self.zero_centered_gamma)
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.kind == "RMSNorm":
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, self.bias, self.eps)


class FusedRMSNorm(Norm):
    """``Norm`` whose RMSNorm runs the fused Triton kernels (LayerNorm stays torch's); same parameters and
    state-dict keys, so checkpoints do not depend on it. The builder picks it for train.fused_kernels."""

    fused = True
