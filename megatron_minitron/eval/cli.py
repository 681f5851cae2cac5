"""`minitron eval --load CKPT [--data PREFIX] [--tasks FILE ...]` (works under torchrun at any TP x PP;
DP shares the work): LM loss / perplexity on a dataset and multiple-choice accuracy on local jsonl tasks.

Options can also come from a YAML file (`--config FILE`, keys are the flags' names with `_`: num_fewshot,
split_name, ...) and `key=value` overrides (e.g. `limit=100 tasks=[a.jsonl,b.jsonl]`); a flag given on the
command line overrides both. The same run from Python: `megatron_minitron.eval.run_eval(EvalConfig(...))`.
See docs/eval.md."""
from __future__ import annotations

import argparse
import dataclasses

from .config import PRECISIONS, SPLIT_NAMES, TASK_FORMATS, TOKENIZER_TYPES, EvalConfig

FIELDS = tuple(f.name for f in dataclasses.fields(EvalConfig))


def _default(name: str) -> str:
    return f" (default: {getattr(EvalConfig(), name)})"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="LM loss / perplexity and multiple-choice accuracy of a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              argument_default=argparse.SUPPRESS)  # only given flags override --config
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of eval options (keys as the flags, with _ for -); flags override it")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides such as num_fewshot=5 limit=100, all in one run of words (e.g. "
                        "right after --config FILE); flags win over them")
    p.add_argument("--load", help="checkpoint directory (or root: follows `latest`); required here or in --config")
    p.add_argument("--tp", type=int, help="tensor-parallel size of this run" + _default("tp"))
    p.add_argument("--pp", type=int, help="pipeline-parallel size of this run" + _default("pp"))
    p.add_argument("--precision", choices=PRECISIONS,
                   help="compute dtype; auto = bf16 on GPU, fp32 on CPU" + _default("precision"))
    g = p.add_argument_group("LM loss")
    g.add_argument("--data", help="dataset prefix (.bin/.idx) for LM loss / perplexity")
    g.add_argument("--split", help="e.g. 949,50,1: evaluate only the --split-name share of --data's documents "
                                   "(the split training used); default: all of --data")
    g.add_argument("--split-name", choices=SPLIT_NAMES,
                   help="with --split: which part of the split to evaluate" + _default("split_name"))
    g.add_argument("--num-samples", type=int, help="sequences to evaluate (default: the whole split)")
    g.add_argument("--seq-length", type=int, help="sequence length (default: the checkpoint's seq_length, its "
                                                  "maximum context)")
    g.add_argument("--micro-batch-size", type=int,
                   help="sequences per forward pass" + _default("micro_batch_size"))
    g = p.add_argument_group("multiple-choice tasks")
    g.add_argument("--tasks", nargs="*", metavar="FILE",
                   help="jsonl task files (winogrande / hellaswag / arc / mmlu / native rows)")
    g.add_argument("--task-format", choices=TASK_FORMATS,
                   help="row format of the task files; auto = guessed from each file's fields" +
                        _default("task_format"))
    g.add_argument("--num-fewshot", type=int,
                   help="examples from the same file put before each item" + _default("num_fewshot"))
    g.add_argument("--limit", type=int, help="score only the first N items of each task")
    g.add_argument("--batch-size", type=int,
                   help="(context, continuation) requests per forward" + _default("batch_size"))
    g.add_argument("--tokenizer", help="tokenizer (.model / tokenizer.json / directory); default: the --data "
                                       "sidecar, else the one the checkpoint records")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                   help="kind of --tokenizer; auto = from its file name" + _default("tokenizer_type"))
    p.add_argument("--seed", type=int, help="dataset shuffle and few-shot sampling seed" + _default("seed"))
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="include per-item log-likelihoods in --output")
    p.set_defaults(handler=run)


def _is_override(word: str) -> bool:
    return "=" in word and word.split("=", 1)[0].strip() in FIELDS


def config_from_args(args) -> EvalConfig:
    """--config FILE, then its key=value overrides, then the flags given on the command line."""
    from ..config import apply_overrides, from_dict, load_yaml

    given = {name: value for name, value in vars(args).items() if name in FIELDS}
    overrides = list(getattr(args, "overrides", []) or [])
    if "tasks" in given:  # `--tasks a.jsonl limit=5`: argparse hands the override to --tasks
        overrides += [w for w in given["tasks"] if _is_override(w)]
        given["tasks"] = [w for w in given["tasks"] if not _is_override(w)]
    data = apply_overrides(load_yaml(getattr(args, "config", None)), overrides)
    data.update(given)
    return from_dict(EvalConfig, data)


def format_table(results: dict) -> str:
    lines = []
    lm = results.get("lm")
    if lm:
        lines.append(f"LM  {lm['data']}{' [' + lm['split_name'] + ']' if lm.get('split') else ''}: "
                     f"loss {lm['loss']:.4f}  perplexity {lm['perplexity']:.3f}  "
                     f"({lm['tokens']:,} tokens, {lm['num_samples']} x {lm['seq_length']})")
    tasks = results.get("tasks") or {}
    if tasks:
        width = max(12, *(len(n) for n in tasks))
        lines.append(f"{'task':<{width}}  {'format':<10} {'shots':>5} {'n':>6}  {'acc':>15}  {'acc_norm':>15}")
        for name, r in tasks.items():
            lines.append(f"{name:<{width}}  {r['format']:<10} {r['num_fewshot']:>5} {r['n']:>6}  "
                         f"{r['acc']:>7.4f} ±{r['acc_stderr']:.4f}  "
                         f"{r['acc_norm']:>7.4f} ±{r['acc_norm_stderr']:.4f}")
    return "\n".join(lines)


def run(args) -> int:
    from ..runtime.distributed import rank0_print
    from .job import run as run_eval

    cfg = config_from_args(args)
    results = run_eval(cfg)
    rank0_print(format_table(results))
    if cfg.output:
        rank0_print(f"results written to {cfg.output}")
    return 0
