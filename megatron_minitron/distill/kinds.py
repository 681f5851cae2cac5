"""The distillation loss kinds and KD-loss backends, each named once: the config validates against these,
the losses check their arguments against them (``losses.py``, ``kd_linear.py``, ``intermediate.py``)."""
from __future__ import annotations

from typing import Optional

KL_LOSSES = ("forward_kl", "reverse_kl")  # the kinds with Triton kernels and a fused output-layer path
LOGIT_LOSSES = KL_LOSSES + ("mse", "cosine")
HIDDEN_LOSSES = ("mse", "cosine")  # intermediate-state losses

# ``backend=`` of ``logit_kd_loss`` and ``linear_kd_loss`` (auto: Triton on CUDA tensors when it imports)
LOSS_BACKENDS = ("auto", "torch", "triton")
# ``distill.kd_loss_backend``: a loss backend, or fused_linear (KD + LM loss fused with both output layers)
KD_LOSS_BACKENDS = LOSS_BACKENDS + ("fused_linear",)


def stats_rows(lm_mode: Optional[str]) -> tuple[int, int]:
    """Rows of the fused output-layer loss's per-token statistics (running maxima, sums) for an LM-loss mode
    (None, "shared", "separate"): the layout both its torch and Triton epilogues write."""
    return {None: (2, 3), "shared": (3, 4), "separate": (4, 5)}[lm_mode]
