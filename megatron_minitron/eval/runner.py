"""Distributed evaluation at any TP x PP x DP: per-token negative log-likelihoods through megatron's
forward-only schedule, the LM loss of a dataset, and the log-likelihoods of multiple-choice requests.

Every rank builds the same list of batches; batch ``j`` runs on data-parallel rank ``j % DP`` (its TP and
PP peers run it with it); the results are summed over DP on the last pipeline stage and broadcast to the
other stages, so every rank returns the same numbers. Vocab-parallel cross-entropy gives the per-token
losses without gathering full-vocabulary logits.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .scoring import Request, aggregate, pad_batch, plan_batches, score_item, task_requests
from .tasks import Task


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _parallel():
    """(dp rank, dp size, is last stage, pp size) or the single-process answer."""
    if not dist.is_initialized():
        return 0, 1, True, 1
    from megatron.core import parallel_state as ps
    return (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
            ps.is_pipeline_last_stage(ignore_virtual=True), ps.get_pipeline_model_parallel_world_size())


def _reduce_to_all(values: torch.Tensor) -> torch.Tensor:
    """Sum over DP on the last stage, then the last stage's sum to every stage."""
    if not dist.is_initialized():
        return values
    from megatron.core import parallel_state as ps
    _, dp, last, pp = _parallel()
    if last and dp > 1:
        dist.all_reduce(values, group=ps.get_data_parallel_group())
    if pp > 1:
        dist.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return values


@contextlib.contextmanager
def eval_mode(model_chunks):
    modes = [_unwrap(c).training for c in model_chunks]
    for c in model_chunks:
        _unwrap(c).eval()
    try:
        yield
    finally:
        for c, mode in zip(model_chunks, modes):
            _unwrap(c).train(mode)


def model_seq_length(model_chunks) -> int:
    return int(_unwrap(model_chunks[0]).max_sequence_length)


@torch.no_grad()
def token_nll(model_chunks, batch: dict) -> Optional[torch.Tensor]:
    """-log p(labels) per position [b, s] (float32) on the last pipeline stage, None on the others.
    Collective over the TP x PP group of this rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(_unwrap(model_chunks[0]).parameters()).device
    tokens = batch["tokens"].to(device)
    b, s = tokens.shape

    def forward_step(data_iterator, model):
        next(data_iterator)
        out = model(tokens, batch["position_ids"].to(device), None, labels=batch["labels"].to(device))
        return out, lambda o: (o.sum() * 0, {"nll": o.detach()})

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=list(model_chunks),
        num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if not _parallel()[2]:
        return None
    return reports[0]["nll"].float()


def loglikelihoods(model_chunks, requests: Sequence[Request], batch_size: int = 8,
                   seq_length: Optional[int] = None) -> torch.Tensor:
    """Summed log-likelihood of each request's continuation given its context, float64 [N], the same on
    every rank. Requests are left-truncated to ``seq_length`` (default: the model's)."""
    seq_length = model_seq_length(model_chunks) if seq_length is None else seq_length
    dp_rank, dp, last, _ = _parallel()
    device = next(_unwrap(model_chunks[0]).parameters()).device
    out = torch.zeros(len(requests), dtype=torch.float64, device=device)
    with eval_mode(model_chunks):
        for j, indices in enumerate(plan_batches(requests, batch_size, seq_length)):
            if j % dp != dp_rank:
                continue
            batch = pad_batch([requests[i] for i in indices], seq_length)
            nll = token_nll(model_chunks, batch)
            if last:
                sums = (nll.double() * batch["score_mask"].to(nll.device).double()).sum(dim=1)
                out[torch.tensor(indices, device=device)] = -sums.to(device)
    return _reduce_to_all(out).cpu()


def evaluate_task(model_chunks, task: Task, tokenizer, num_fewshot: int = 0, limit: Optional[int] = None,
                  batch_size: int = 8, seq_length: Optional[int] = None, seed: int = 1234) -> dict:
    """Score a task; returns aggregate() numbers plus ``format``, ``num_fewshot`` and ``items`` (per item:
    answer, prediction, per-choice log-likelihoods)."""
    requests, spans = task_requests(task.items, tokenizer, num_fewshot, seed, limit)
    lls = loglikelihoods(model_chunks, requests, batch_size, seq_length).tolist()
    items = task.items[:len(spans)]
    per_item = []
    for item, (start, end) in zip(items, spans):
        scored = score_item(item, lls[start:end])
        scored.update(answer=item.answer, loglikelihoods=lls[start:end])
        per_item.append(scored)
    result = aggregate(items, per_item)
    result.update(name=task.name, path=task.path, format=task.format, num_fewshot=num_fewshot,
                  items=per_item)
    return result


@torch.no_grad()
def lm_loss(model_chunks, batches: Sequence[dict]) -> dict:
    """Token-weighted mean LM loss over every loss-masked token of ``batches`` (the full list, the same
    on every rank; batch j runs on DP rank j % DP): {loss, perplexity, tokens, num_samples}."""
    import math

    if not batches:
        raise ValueError("no evaluation batches: the dataset gave no samples at this sequence length")
    dp_rank, dp, last, _ = _parallel()
    device = next(_unwrap(model_chunks[0]).parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with eval_mode(model_chunks):
        for j, batch in enumerate(batches):
            if j % dp != dp_rank:
                continue
            nll = token_nll(model_chunks, batch)
            if last:
                mask = batch["loss_mask"].to(nll.device).double()
                totals += torch.stack([(nll.double() * mask).sum(), mask.sum()]).to(device)
    totals = _reduce_to_all(totals).cpu()
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(totals[1]),
            "num_samples": sum(int(b["tokens"].shape[0]) for b in batches)}


def eval_batches(dataset, num_samples: Optional[int], micro_batch_size: int) -> List[dict]:
    """The first ``num_samples`` samples (all when None) of a GPT dataset as micro-batches; the last one
    may be smaller."""
    from ..data import collate

    if micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size {micro_batch_size} must be >= 1")
    total = len(dataset)
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"--num-samples {num_samples} must be >= 1")
        if num_samples > total:
            raise ValueError(f"the dataset holds {total} sequences at this sequence length, fewer than "
                             f"--num-samples {num_samples}; lower it or the sequence length")
        total = num_samples
    return [collate([dataset[i] for i in range(start, min(start + micro_batch_size, total))])
            for start in range(0, total, micro_batch_size)]
