"""Aggregation of per-token activation magnitudes into one importance score per unit.

An importance probe yields, for every calibration sample, a tensor ``x[s, n]`` (sequence position, unit:
head, neuron or hidden channel). The score of unit ``i`` reduces ``x[:, i]`` first over the sequence of
each sample, then over all samples (Minitron Table 13; best: batch = l2, sequence = mean):

    sequence step, per sample b (S tokens):   y[b, i] = mean_s x[s, b, i]                  (mean)
                                                        = sqrt(sum_s x[s, b, i]^2)         (l2)
                                                        = mean_s x^2 - (mean_s x)^2        (var, population)
    batch step, over all N samples:           score[i] = sum_b y[b, i] / N                  (mean)
                                                        = sqrt(sum_b y[b, i]^2)            (l2)
                                                        = sum_b y^2 / N - (sum_b y / N)^2  (var, population)

The batch step only needs the running sums ``N``, ``sum_b y`` and ``sum_b y^2``: ``RunningAggregate``
keeps exactly these (float64), so feeding the samples in any number of batches, or summing the states
of several data-parallel ranks, gives the same result as aggregating all samples at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

AGGREGATIONS = ("mean", "l2", "var")


def check_aggregation(name: str, axis: str) -> str:
    if name not in AGGREGATIONS:
        raise ValueError(f"{axis} aggregation {name!r} is unknown; choose one of {AGGREGATIONS}")
    return name


def aggregate_sequence(x: torch.Tensor, how: str, seq_dim: int = 0, magnitude: bool = False) -> torch.Tensor:
    """Reduce ``x`` (or ``|x|`` when ``magnitude``) over ``seq_dim`` with mean | l2 | var; float64 result.

    Half-precision activations (the GPU case) are reduced with fp32 accumulation and no float64 copy of the
    whole [s, b, n] tensor: that copy and float64 arithmetic on it were most of the probes' cost, and fp32
    sums of S values are exact to ~1e-7 relative, far below what a ranking notices. fp32/fp64 inputs are
    reduced in float64. ``magnitude`` reads ``x`` once instead of writing and re-reading an ``|x|`` copy as
    large as the activation: mean |x| is the L1 norm over S, and the L2 norm ignores the sign anyway (var
    still needs the copy: it is off the default path)."""
    check_aggregation(how, "sequence")
    acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else torch.float64
    if how == "mean":
        if magnitude:
            return (torch.linalg.vector_norm(x, 1, dim=seq_dim, dtype=acc) / x.shape[seq_dim]).double()
        return x.mean(dim=seq_dim, dtype=acc).double()
    if how == "l2":
        return torch.linalg.vector_norm(x, 2, dim=seq_dim, dtype=acc).double()
    x = x.abs() if magnitude else x
    return x.to(acc).var(dim=seq_dim, unbiased=False).double()


def finalize_batch(count: float, total: torch.Tensor, total_sq: torch.Tensor, how: str) -> torch.Tensor:
    """The batch step from running sums over ``count`` samples of the sequence aggregates."""
    check_aggregation(how, "batch")
    if count <= 0:
        raise ValueError("no calibration samples were seen; give at least one batch")
    if how == "mean":
        return total / count
    if how == "l2":
        return total_sq.clamp(min=0).sqrt()
    mean = total / count
    return (total_sq / count - mean * mean).clamp(min=0)


def aggregate(x: torch.Tensor, batch: str = "l2", sequence: str = "mean", seq_dim: int = 0,
              batch_dim: int = 1) -> torch.Tensor:
    """One-shot aggregation of ``x`` (e.g. ``[s, b, n]``) over sequence then batch -> ``[n]``."""
    y = aggregate_sequence(x, sequence, seq_dim)
    bdim = batch_dim - 1 if batch_dim > seq_dim else batch_dim
    y = y.movedim(bdim, 0)
    return finalize_batch(y.shape[0], y.sum(0), y.pow(2).sum(0), batch)


@dataclass
class RunningAggregate:
    """Running sums of the per-sample sequence aggregates for ``n`` units (float64)."""

    sequence: str = "mean"
    count: float = 0.0
    total: Optional[torch.Tensor] = None
    total_sq: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor, seq_dim: int = 0, batch_dim: int = 1, magnitude: bool = False) -> None:
        """Add the samples of one batch ``x`` (megatron layout ``[s, b, n]`` by default); of ``|x|`` when
        ``magnitude`` (see ``aggregate_sequence``)."""
        y = aggregate_sequence(x.detach(), self.sequence, seq_dim, magnitude)
        bdim = batch_dim - 1 if batch_dim > seq_dim else batch_dim
        y = y.movedim(bdim, 0).reshape(y.shape[bdim], -1)
        s, sq = y.sum(0), y.pow(2).sum(0)
        if self.total is None:
            self.total, self.total_sq = s, sq
        else:
            self.total, self.total_sq = self.total + s, self.total_sq + sq
        self.count += y.shape[0]

    def state(self) -> torch.Tensor:
        """``[2 n + 1]`` float64: (total, total_sq, count); states of ranks/batches add up."""
        assert self.total is not None, "update() was never called"
        count = torch.tensor([self.count], dtype=torch.float64, device=self.total.device)
        return torch.cat([self.total, self.total_sq, count])

    @staticmethod
    def finalize_state(state: torch.Tensor, batch: str) -> torch.Tensor:
        n = (state.numel() - 1) // 2
        return finalize_batch(float(state[-1]), state[:n], state[n:2 * n], batch)

    def result(self, batch: str = "l2") -> torch.Tensor:
        return self.finalize_state(self.state(), batch)
