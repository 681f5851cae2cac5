"""The pure parts of multiple-choice scoring: prompts with k-shot examples, (context, continuation)
requests, their tokenisation, padded batches, and acc / acc_norm from per-request log-likelihoods.

Definitions (lm-evaluation-harness's, for its multiple-choice tasks):
  ll_i      = sum over the continuation's tokens of log p(token | everything before it)
  acc       = [argmax_i ll_i == answer]
  acc_norm  = [argmax_i ll_i / len(choice_i) == answer], len in characters of the choice text (without the
              " " delimiter; for partial scoring the shared continuation, so acc_norm equals acc there)
  acc_bytes = the same with the UTF-8 byte length (equal to acc_norm for ASCII text)
Ties go to the lowest index (numpy's argmax, as in the harness).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .tasks import MCItem

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def render_example(item: MCItem) -> str:
    """An item with its correct answer filled in, as a few-shot example."""
    if item.partial:
        return item.context + item.choices[item.answer] + TARGET_DELIMITER + item.continuation
    return item.context + TARGET_DELIMITER + item.choices[item.answer]


def fewshot_indices(items: Sequence[MCItem], index: int, k: int, seed: int) -> List[int]:
    """k example indices for item ``index``: never the item itself, drawn from the items of the same
    subject when there are at least k of those, else from the whole file. Deterministic in (seed, index)
    and independent of --limit, batch size and the parallel layout."""
    if k <= 0:
        return []
    others = [j for j in range(len(items)) if j != index]
    subject = items[index].subject
    if subject is not None:
        same = [j for j in others if items[j].subject == subject]
        if len(same) >= k:
            others = same
    if len(others) < k:
        raise ValueError(f"--num-fewshot {k} needs at least {k + 1} items in the task file, it has "
                         f"{len(items)}; lower --num-fewshot or add examples")
    return random.Random(seed * 1_000_003 + index).sample(others, k)


def build_context(items: Sequence[MCItem], index: int, k: int, seed: int) -> str:
    item = items[index]
    shots = [render_example(items[j]) for j in fewshot_indices(items, index, k, seed)]
    prefix = "".join(s + FEWSHOT_DELIMITER for s in shots)
    return item.description + prefix + item.context


def item_requests(items: Sequence[MCItem], index: int, k: int, seed: int) -> List[Tuple[str, str]]:
    """(context, continuation) per choice of item ``index``."""
    item = items[index]
    context = build_context(items, index, k, seed)
    if item.partial:
        return [(context + choice, TARGET_DELIMITER + item.continuation) for choice in item.choices]
    return [(context, TARGET_DELIMITER + choice) for choice in item.choices]


def _bos_prefix(tokenizer, text: str) -> List[int]:
    """[bos] when the tokenizer's convention adds it (``Tokenizer.add_bos``), as preprocess does for every
    document; none when the text already starts with the BOS token's text (lm-evaluation-harness's rule)."""
    if not getattr(tokenizer, "add_bos", False):
        return []
    bos = int(tokenizer.bos)
    piece = tokenizer.id_to_piece(bos)
    if piece and text.startswith(piece):
        return []
    return [bos]


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """Token ids of (context, continuation), as lm-evaluation-harness 0.4 encodes a loglikelihood
    request for a causal HF model: trailing spaces of the context move to the continuation; the context
    and the whole text are encoded as the tokenizer does by default (BOS in front when its convention adds
    one), and the continuation's ids are what the whole text adds after the context's. An empty context
    becomes the tokenizer's ``prefix_id`` (its BOS, else the EOD), unless the continuation starts with
    that token already."""
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    if not context:
        prefix = int(getattr(tokenizer, "prefix_id", tokenizer.eod))
        cont = [int(t) for t in tokenizer.encode(continuation)]
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    bos = _bos_prefix(tokenizer, context)
    whole = bos + [int(t) for t in tokenizer.encode(context + continuation)]
    ctx = bos + [int(t) for t in tokenizer.encode(context)]
    return ctx, whole[len(ctx):]


@dataclass
class Request:
    context: List[int]
    continuation: List[int]

    def window(self, seq_length: int) -> Tuple[List[int], List[int], int]:
        """(inputs, targets, number of scored positions at the end), left-truncated to seq_length."""
        if not self.continuation:
            raise ValueError("a continuation tokenised to nothing; check the task's choices")
        if len(self.continuation) > seq_length:
            raise ValueError(f"a continuation of {len(self.continuation)} tokens does not fit the "
                             f"sequence length {seq_length}; raise --seq-length or shorten the choices")
        full = (self.context + self.continuation)[-(seq_length + 1):]
        return full[:-1], full[1:], len(self.continuation)


def pad_batch(requests: Sequence[Request], seq_length: int, pad_id: int = 0) -> dict:
    """tokens / labels / position_ids [b, L] and score_mask [b, L] (1 on continuation targets), right-
    padded to the longest window of the batch (causal attention: padding never reaches real positions)."""
    windows = [r.window(seq_length) for r in requests]
    length = max(len(w[0]) for w in windows)
    b = len(windows)
    tokens = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.float32)
    for row, (inputs, targets, n) in enumerate(windows):
        m = len(inputs)
        tokens[row, :m] = torch.tensor(inputs, dtype=torch.long)
        labels[row, :m] = torch.tensor(targets, dtype=torch.long)
        mask[row, m - n:m] = 1.0
    positions = torch.arange(length).expand(b, length).clone()
    return {"tokens": tokens, "labels": labels, "position_ids": positions, "score_mask": mask}


def plan_batches(requests: Sequence[Request], batch_size: int, seq_length: int) -> List[List[int]]:
    """Request indices grouped into batches, longest windows first (less padding, and an out-of-memory
    shows up in the first batch rather than the last)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    for r in requests:  # every rank checks every request, so all of them fail together, before any forward
        r.window(seq_length)
    order = sorted(range(len(requests)),
                   key=lambda i: (-min(len(requests[i].context) + len(requests[i].continuation) - 1,
                                       seq_length), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def normalisation_lengths(item: MCItem, unit: str = "chars") -> List[int]:
    texts = [item.continuation] * len(item.choices) if item.partial else item.choices
    if unit == "bytes":
        return [max(1, len(t.encode("utf-8"))) for t in texts]
    return [max(1, len(t)) for t in texts]


def score_item(item: MCItem, lls: Sequence[float]) -> dict:
    """acc / acc_norm / acc_bytes (0 or 1) and the predictions for one item."""
    if len(lls) != len(item.choices):
        raise AssertionError(f"{len(lls)} log-likelihoods for {len(item.choices)} choices")
    chars = normalisation_lengths(item, "chars")
    nbytes = normalisation_lengths(item, "bytes")
    pred = _argmax(lls)
    pred_norm = _argmax([ll / n for ll, n in zip(lls, chars)])
    pred_bytes = _argmax([ll / n for ll, n in zip(lls, nbytes)])
    return {"acc": float(pred == item.answer), "acc_norm": float(pred_norm == item.answer),
            "acc_bytes": float(pred_bytes == item.answer), "pred": pred, "pred_norm": pred_norm}


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def aggregate(items: Sequence[MCItem], per_item: Sequence[dict]) -> dict:
    """Task-level numbers: n, acc, acc_norm, acc_bytes and their standard errors; per-subject acc when
    the items carry subjects."""
    out = {"n": len(per_item)}
    for key in ("acc", "acc_norm", "acc_bytes"):
        values = [r[key] for r in per_item]
        out[key] = sum(values) / max(len(values), 1)
        out[f"{key}_stderr"] = mean_stderr(values)
    subjects = {}
    for item, r in zip(items, per_item):
        if item.subject is not None:
            subjects.setdefault(item.subject, []).append(r)
    if subjects:
        out["subjects"] = {s: {"n": len(rs), "acc": sum(r["acc"] for r in rs) / len(rs),
                               "acc_norm": sum(r["acc_norm"] for r in rs) / len(rs)}
                           for s, rs in sorted(subjects.items())}
    return out


def task_requests(items: Sequence[MCItem], tokenizer, num_fewshot: int, seed: int,
                  limit: Optional[int] = None) -> Tuple[List[Request], List[Tuple[int, int]]]:
    """Tokenised requests for the first ``limit`` items (all when None) and, per item, the [start, end)
    range of its requests in the list."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit} must be >= 1")
    if num_fewshot < 0:
        raise ValueError(f"--num-fewshot {num_fewshot} must be >= 0")
    count = len(items) if limit is None else min(limit, len(items))
    requests, spans = [], []
    for i in range(count):
        start = len(requests)
        for context, continuation in item_requests(items, i, num_fewshot, seed):
            requests.append(Request(*encode_pair(tokenizer, context, continuation)))
        spans.append((start, len(requests)))
    return requests, spans
