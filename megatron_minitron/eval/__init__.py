"""Evaluation: LM loss / perplexity on a dataset and multiple-choice accuracy on local jsonl tasks, at any
TP x PP x DP (`minitron eval`, or ``run_eval(EvalConfig(...))`` from Python), and depth importance by downstream
accuracy. See docs/eval.md."""
from .config import EvalConfig, EvalInputs
from .depth import accuracy_depth_metric, task_accuracy
from .inputs import eval_dataset, resolve_eval_tokenizer
from .job import run as run_eval
from .runner import eval_batches, evaluate_task, lm_loss, loglikelihoods, token_nll
from .scoring import (Request, aggregate, build_context, encode_pair, fewshot_indices, item_requests, pad_batch,
                      plan_batches, score_item, task_requests)
from .tasks import MCItem, READERS, Task, bundled_task_dir, detect_format, load_task

__all__ = [
    "EvalConfig", "EvalInputs", "MCItem", "READERS", "Request", "Task", "accuracy_depth_metric", "aggregate",
    "build_context", "bundled_task_dir", "detect_format", "encode_pair", "eval_batches", "eval_dataset",
    "evaluate_task", "fewshot_indices", "item_requests", "lm_loss", "load_task", "loglikelihoods", "pad_batch",
    "plan_batches", "resolve_eval_tokenizer", "run_eval", "score_item", "task_accuracy", "task_requests",
    "token_nll",
]
