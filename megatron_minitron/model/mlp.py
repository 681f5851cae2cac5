"""``FusedSwiGLUMLP``: megatron's ``MLP`` with the SwiGLU activation through our Triton kernel.

megatron-core's ``MLP.forward`` (0.16-0.19) is fc1 -> activation -> fc2; its activation step has no
hook that sees the whole fc1 output except the TE-only ``use_te_activation_func`` module, so this
subclass runs those three steps itself when the kernel covers the config: a gated linear unit with
``F.silu``, no per-token (MoE) scale, no GLU clamp or linear offset, and neither megatron's own
``bias_activation_fusion`` nor TE's activation asked for. Otherwise ``MLP.forward`` runs unchanged.

The gate / up split is megatron's: ``torch.chunk(fc1_out, 2, -1)`` on this rank's fc1 output, which under
tensor parallelism holds this rank's [gate shard | up shard] (fc1 is built with stride 2 for a GLU).
A bias (add_bias_linear) is added before the activation as megatron's unfused path does.

No parameters of its own: the state dict (and so every checkpoint) is ``MLP``'s. The builder uses it only
where train.fused_kernels is usable (``builder.fused_kernels_usable``).
"""
from __future__ import annotations

import contextlib
import logging

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _DropUnknownMLPWarning(logging.Filter):
    """megatron's TransformerLayer logs 'Unknown MLP type ... Using default kwargs' once per layer for any MLP
    class but its own. Ours (``FusedSwiGLUMLP``, the FP8 teacher's ``FP8SwiGLUMLP``) are ``MLP`` subclasses
    whose default TP group is the one megatron would pass: the model-parallel state's."""

    def filter(self, record):
        return not record.getMessage().startswith("Unknown MLP type")


@contextlib.contextmanager
def quiet_unknown_mlp_type():
    """Build layers whose MLP is one of our ``MLP`` subclasses without megatron's per-layer notice."""
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    quiet = _DropUnknownMLPWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def swiglu_kernel_covers(config) -> bool:
    """Whether ``FusedSwiGLUMLP`` computes this config's activation itself (else megatron's MLP does)."""
    return (bool(config.gated_linear_unit) and config.activation_func is F.silu
            and not getattr(config, "use_te_activation_func", False)
            and not getattr(config, "bias_activation_fusion", False)
            and getattr(config, "activation_func_clamp_value", None) is None
            and not getattr(config, "glu_linear_offset", 0.0))


class FusedSwiGLUMLP(MLP):
    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None or not swiglu_kernel_covers(self.config):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(self.swiglu(intermediate))

    def swiglu(self, intermediate):
        """silu(gate) * up of fc1's output [..., 2F] -> [..., F]: our kernel (benchmarks/bench_train.py's
        Liger variant overrides this to time Liger's kernel in the same MLP)."""
        from ..kernels.swiglu_triton import triton_swiglu

        return triton_swiglu(intermediate)
