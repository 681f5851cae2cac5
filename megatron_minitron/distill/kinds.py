"""The distillation loss kinds and KD-loss backends, each named once: the config validates against these,
the losses check their arguments against them (``losses.py``, ``kd_linear.py``, ``intermediate.py``)."""

KL_LOSSES = ("forward_kl", "reverse_kl")  # the kinds with Triton kernels and a fused output-layer path
LOGIT_LOSSES = KL_LOSSES + ("mse", "cosine")
HIDDEN_LOSSES = ("mse", "cosine")  # intermediate-state losses

# ``backend=`` of ``logit_kd_loss`` and ``linear_kd_loss`` (auto: Triton on CUDA tensors when it imports)
LOSS_BACKENDS = ("auto", "torch", "triton")
# ``distill.kd_loss_backend``: a loss backend, or fused_linear (KD + LM loss fused with both output layers)
KD_LOSS_BACKENDS = LOSS_BACKENDS + ("fused_linear",)
