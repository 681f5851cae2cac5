"""What a training step optimises. The loop is generic; an objective supplies megatron's forward step.

An objective turns a micro-batch into ``(output_tensor, loss_func)`` as megatron-core's pipeline
schedules expect. ``loss_func`` returns ``(loss_sum, num_tokens, report)`` so the schedules run in
per-token mode: gradients are divided by the number of loss tokens in the whole global batch (across
micro-batches and DP ranks), which makes a step independent of how the batch is split. ``report`` maps a
metric name to ``tensor([sum, count])``; the loop sums those over micro-batches and DP and logs sum/count.

The contract is ``Objective``; ``BaseObjective`` gives the optional hooks their do-nothing defaults.
Distillation plugs in here with a second, frozen model held by its objective (see ``distill/``).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class Objective(Protocol):
    """What the Trainer uses of an objective (``BaseObjective`` implements the hooks as no-ops)."""

    metric_names: Tuple[str, ...]  # the report keys the loop averages and logs, in this order

    def forward_step(self, data_iterator, model) -> Tuple[torch.Tensor, Callable]:
        """megatron-core's forward step: (output tensor, loss_func(output) -> (loss sum, tokens, report))."""
        ...

    def wrap_model(self, trainer, model):
        """The model chunk to train (before DDP), e.g. the student with a frozen teacher beside it."""
        ...

    def schedule_kwargs(self, pipeline_parallel: bool) -> dict:
        """Extra keyword arguments for megatron's forward-backward schedule."""
        ...

    def describe(self, arch) -> str:
        """What is trained, for the run's first line (``arch``: the trained model's ModelArch)."""
        ...

    def extra_flops_per_token(self, seq_length: int) -> float:
        """Model FLOPs per trained token beyond the trained model's forward + backward (e.g. a teacher's
        forward), counted into the logged MFU."""
        ...


class BaseObjective:
    """The optional hooks of ``Objective`` as no-ops; a subclass supplies metric_names and forward_step."""

    def wrap_model(self, trainer, model):
        return model

    def schedule_kwargs(self, pipeline_parallel: bool) -> dict:
        return {}

    def describe(self, arch) -> str:
        return f"train: {arch.num_parameters():,} parameters"

    def extra_flops_per_token(self, seq_length: int) -> float:
        return 0.0


def per_token_report(name: str, per_token: torch.Tensor, loss_mask: torch.Tensor) -> dict:
    mask = loss_mask.reshape(-1).float()
    return {name: torch.stack([(per_token.reshape(-1).float() * mask).sum().detach(), mask.sum()])}


class LMObjective(BaseObjective):
    """Next-token cross-entropy (vocab-parallel, computed by megatron's GPTModel)."""

    metric_names = ("lm_loss",)

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, labels = batch["tokens"], batch["labels"]
        per_token = model(tokens, batch["position_ids"], None, labels=labels)
        return per_token, partial(self.loss_func, batch["loss_mask"])

    @staticmethod
    def loss_func(loss_mask, per_token):
        mask = loss_mask.reshape(-1).float()
        loss_sum = (per_token.reshape(-1).float() * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        return loss_sum, num_tokens, per_token_report("lm_loss", per_token, loss_mask)
