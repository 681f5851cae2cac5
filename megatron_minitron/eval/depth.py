"""Depth importance by downstream accuracy (2407.14679 used Winogrande): the score of a layer or a
contiguous block is the accuracy lost when it is skipped,

    score(layers) = acc(full model) - acc(model with ``layers`` acting as the identity)

so, as prune.plan expects of every depth metric, a higher score means a more important layer, and the
lowest-scored layers / block are the ones dropped. A layer whose removal helps gets a negative score.
Accuracy moves in steps of 1/n, so many layers can tie on small task files; prune.plan then drops the
lowest layer index first. Use a few hundred items (--limit) for a usable ranking.
"""
from __future__ import annotations

from typing import Optional

from ..runtime.forward import skip_layers
from .runner import loglikelihoods
from .scoring import score_item, task_requests
from .tasks import load_task

MEASURES = ("acc", "acc_norm")


def task_accuracy(model_chunks, items, requests, spans, batch_size: int, seq_length: Optional[int],
                  measure: str = "acc") -> float:
    """Mean ``measure`` of already tokenised requests (collective; the same float on every rank)."""
    lls = loglikelihoods(model_chunks, requests, batch_size, seq_length).tolist()
    scores = [score_item(item, lls[s:e])[measure] for item, (s, e) in zip(items, spans)]
    return sum(scores) / len(scores)


def accuracy_depth_metric(task_path: str, num_fewshot: int = 0, limit: Optional[int] = None,
                          name: str = "accuracy", tokenizer=None, tokenizer_type: str = "auto",
                          data: Optional[str] = None, load: Optional[str] = None, batch_size: int = 8,
                          seq_length: Optional[int] = None, seed: int = 1234, measure: str = "acc"):
    """The depth metric "accuracy drop on the task file ``task_path`` when the scored layers are skipped"
    (see the module docstring), as ``fn(ctx, layers) -> float`` for pruning: pass it to the prune job
    (``depth_metrics={name: fn}``) or ``prune.register_depth_metric(name, fn)``. ``ctx`` is the prune
    job's DepthContext (``model_chunks``, ``cache``); nothing here imports the pruning code.

    The tokenizer: ``tokenizer`` (a Tokenizer or a path), else the sidecar of the dataset prefix ``data``,
    else the tokenizer recorded in the checkpoint ``load`` (the same rules as ``minitron eval``). The task
    file is read and tokenised here, once, so a bad file fails before any forward pass.
    """
    from .inputs import resolve_eval_tokenizer

    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r}: choose one of {MEASURES}")
    if name == "bi":
        raise ValueError("'bi' is computed in the calibration pass itself; pick another metric name")
    task = load_task(task_path)
    metadata = None
    if load is not None and tokenizer is None:
        from ..checkpoint import describe_checkpoint
        metadata = describe_checkpoint(load)
    tok = resolve_eval_tokenizer(tokenizer, tokenizer_type, data, metadata)
    requests, spans = task_requests(task.items, tok, num_fewshot, seed, limit)
    items = task.items[:len(spans)]
    cache_key = ("eval.accuracy", name)

    def accuracy_drop(ctx, layers: tuple) -> float:
        if cache_key not in ctx.cache:
            ctx.cache[cache_key] = task_accuracy(ctx.model_chunks, items, requests, spans, batch_size,
                                                 seq_length, measure)
        with skip_layers(ctx.model_chunks, layers):
            skipped = task_accuracy(ctx.model_chunks, items, requests, spans, batch_size, seq_length,
                                    measure)
        return ctx.cache[cache_key] - skipped

    return accuracy_drop
