"""Depth: skipping layers, forward passes through megatron's schedule (any PP), removal metrics.

A removal metric scores a layer or contiguous block by what is lost when it is skipped. Skipping replaces
``TransformerLayer.forward`` of the skipped layers (on whichever pipeline stage owns them) with the identity
for the duration of a ``with skip_layers(...)`` block. Metrics are pluggable: ``register_depth_metric(name,
fn)`` with ``fn(ctx: DepthContext, layers: tuple) -> float`` (higher = more important; every rank calls it
collectively and must get the same float). Built in: ``lm_loss`` = loss with the layers skipped - loss of the
full model, over the cached calibration batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

# one home for layer skipping and the forward-only schedule call (runtime/forward.py); re-exported here, the
# names pruning code and its users have always imported from megatron_minitron.prune
from ..runtime.forward import forward_only, skip_layers, transformer_layers  # noqa: F401

DepthMetric = Callable[["DepthContext", tuple], float]
DEPTH_METRICS: Dict[str, DepthMetric] = {}


def register_depth_metric(name: str, fn: DepthMetric) -> None:
    """Add a removal metric (e.g. downstream accuracy drop, from the eval module)."""
    if name == "bi":
        raise ValueError("'bi' is computed in the calibration pass itself; pick another metric name")
    DEPTH_METRICS[name] = fn


def batch_fields(batch) -> dict:
    """Accept a dict with ``tokens`` (+ ``position_ids``, ``labels``, ``loss_mask``) or a tokens tensor."""
    if isinstance(batch, torch.Tensor):
        batch = {"tokens": batch}
    if "tokens" not in batch:
        raise ValueError("calibration batches must be tensors of token ids [b, s] or dicts with 'tokens'")
    tokens = batch["tokens"]
    if tokens.dim() == 1:
        batch = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch


def run_forward(model_chunks, batches: Sequence, with_loss: bool = False,
                after_batch: Optional[Callable[[], None]] = None) -> Optional[torch.Tensor]:
    """Forward every batch through megatron's schedule (forward only), one micro-batch per schedule call so
    per-batch state (hooks, ``after_batch``) sees one batch at a time on every stage.

    Returns, with ``with_loss``, the masked token-mean LM loss over all batches and all DP ranks as a 0-d
    float64 tensor on every rank; else None.
    """
    from ..runtime.collectives import sum_to_all_ranks
    from ..runtime.forward import model_device

    device = model_device(model_chunks)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for raw in batches:
        b = batch_fields(raw)
        if with_loss and "labels" not in b:
            raise ValueError("the lm_loss depth metric needs 'labels' in the calibration batches")
        bsz, s = b["tokens"].shape
        mask = b.get("loss_mask")
        mask = torch.ones(bsz, s, device=device) if mask is None else mask.to(device)

        def collect(output, mask=mask):
            if not with_loss:
                return {}
            return {"loss": torch.stack([(output.double() * mask).sum(), mask.double().sum()])}

        inputs = {"tokens": b["tokens"], "position_ids": b.get("position_ids"),
                  "labels": b["labels"] if with_loss else None}
        for report in forward_only(model_chunks, inputs, collect):
            if "loss" in report:
                totals += report["loss"].to(totals)
        if after_batch is not None:
            after_batch()
    if not with_loss:
        return None
    return sum_to_all_ranks(totals)[0] / totals[1].clamp(min=1)


@dataclass
class DepthContext:
    """What a removal metric may use: the model stage(s) of this rank and the cached calibration batches."""

    model_chunks: list
    batches: list
    cache: dict = field(default_factory=dict)

    def loss(self, skipped: Iterable[int] = ()) -> float:
        with skip_layers(self.model_chunks, skipped):
            return float(run_forward(self.model_chunks, self.batches, with_loss=True))

    def base_loss(self) -> float:
        if "base_loss" not in self.cache:
            self.cache["base_loss"] = self.loss(())
        return self.cache["base_loss"]


def lm_loss_increase(ctx: DepthContext, layers: tuple) -> float:
    return ctx.loss(layers) - ctx.base_loss()


DEPTH_METRICS["lm_loss"] = lm_loss_increase


def known_depth_metrics(extra: Optional[Mapping[str, DepthMetric]] = None) -> Dict[str, DepthMetric]:
    """The registered removal metrics plus ``extra`` (a job's own, e.g. downstream accuracy; they win)."""
    return {**DEPTH_METRICS, **(extra or {})}


def unknown_depth_metric_message(metric: str, known: Iterable[str]) -> str:
    return (f"unknown depth metric {metric!r}; known: bi, {', '.join(sorted(known))} (register others with "
            "register_depth_metric, or pass them to the prune job as depth_metrics)")


def removal_scores(ctx: DepthContext, metric: str, num_layers: int, block_sizes: List[int],
                   metrics: Optional[Mapping[str, DepthMetric]] = None) -> Dict[int, torch.Tensor]:
    """{k: [L - k + 1]} scores of every contiguous block of k layers under ``metric`` (looked up in
    ``metrics``, then among the registered ones)."""
    known = known_depth_metrics(metrics)
    if metric not in known:
        raise ValueError(unknown_depth_metric_message(metric, known))
    fn = known[metric]
    out = {}
    for k in block_sizes:
        out[k] = torch.tensor([fn(ctx, tuple(range(i, i + k))) for i in range(num_layers - k + 1)],
                              dtype=torch.float64)
    return out
