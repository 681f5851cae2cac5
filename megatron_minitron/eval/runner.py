"""Distributed evaluation at any TP x PP x DP: per-token negative log-likelihoods through megatron's
forward-only schedule, the LM loss of a dataset, and the log-likelihoods of multiple-choice requests.

Every rank builds the same list of batches; batch ``j`` runs on data-parallel rank ``j % DP`` (its TP and
PP peers run it with it); the results are summed over DP on the last pipeline stage and broadcast to the
other stages, so every rank returns the same numbers. Vocab-parallel cross-entropy gives the per-token
losses without gathering full-vocabulary logits.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from ..runtime.collectives import sum_to_all_ranks
from ..runtime.forward import eval_mode, forward_only, model_device, unwrap_model
from .scoring import Request, aggregate, pad_batch, plan_batches, score_item, task_requests
from .tasks import Task

__all__ = ["eval_batches", "eval_mode", "evaluate_task", "lm_loss", "loglikelihoods", "model_seq_length",
           "token_nll"]  # eval_mode: runtime.forward's, importable from here as before


def _data_parallel():
    """(dp rank, dp size, is last pipeline stage) or the single-process answer."""
    if not dist.is_initialized():
        return 0, 1, True
    from megatron.core import parallel_state as ps
    return (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
            ps.is_pipeline_last_stage(ignore_virtual=True))


def model_seq_length(model_chunks) -> int:
    return int(unwrap_model(model_chunks[0]).max_sequence_length)


@torch.no_grad()
def token_nll(model_chunks, batch: dict) -> Optional[torch.Tensor]:
    """-log p(labels) per position [b, s] (float32) on the last pipeline stage, None on the others.
    Collective over the TP x PP group of this rank."""
    reports = forward_only(model_chunks, batch, lambda nll: {"nll": nll.detach()})
    if not _data_parallel()[2]:
        return None
    return reports[0]["nll"].float()


def loglikelihoods(model_chunks, requests: Sequence[Request], batch_size: int = 8,
                   seq_length: Optional[int] = None) -> torch.Tensor:
    """Summed log-likelihood of each request's continuation given its context, float64 [N], the same on
    every rank. Requests are left-truncated to ``seq_length`` (default: the model's)."""
    seq_length = model_seq_length(model_chunks) if seq_length is None else seq_length
    dp_rank, dp, last = _data_parallel()
    device = model_device(model_chunks)
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
    return sum_to_all_ranks(out).cpu()


def evaluate_task(model_chunks, task: Task, tokenizer, num_fewshot: int = 0, limit: Optional[int] = None,
                  batch_size: int = 8, seq_length: Optional[int] = None, seed: int = 1234,
                  requests: Optional[tuple] = None) -> dict:
    """Score a task; returns aggregate() numbers plus ``format``, ``num_fewshot`` and ``items`` (per item:
    answer, prediction, per-choice log-likelihoods). ``requests``: its (requests, spans) already tokenised
    with these settings (``EvalInputs.requests``), else they are made here."""
    requests, spans = requests or task_requests(task.items, tokenizer, num_fewshot, seed, limit)
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
    dp_rank, dp, last = _data_parallel()
    device = model_device(model_chunks)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with eval_mode(model_chunks):
        for j, batch in enumerate(batches):
            if j % dp != dp_rank:
                continue
            nll = token_nll(model_chunks, batch)
            if last:
                mask = batch["loss_mask"].to(nll.device).double()
                totals += torch.stack([(nll.double() * mask).sum(), mask.sum()]).to(device)
    totals = sum_to_all_ranks(totals).cpu()
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
