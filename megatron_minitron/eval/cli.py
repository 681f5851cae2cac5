"""`minitron eval --load CKPT [--data PREFIX] [--tasks FILE ...]` (works under torchrun at any TP x PP;
DP shares the work): LM loss / perplexity on a dataset and multiple-choice accuracy on local jsonl tasks.
See docs/eval.md."""
from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="LM loss / perplexity and multiple-choice accuracy of a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (or root: follows `latest`)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="compute dtype; auto = bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("LM loss")
    g.add_argument("--data", help="dataset prefix (.bin/.idx) for LM loss / perplexity")
    g.add_argument("--split", help="e.g. 949,50,1: evaluate only the --split-name share of --data's documents "
                                   "(the split training used); default: all of --data")
    g.add_argument("--split-name", default="valid", choices=("train", "valid", "test"),
                   help="with --split: which part of the split to evaluate")
    g.add_argument("--num-samples", type=int, help="sequences to evaluate (default: the whole split)")
    g.add_argument("--seq-length", type=int, help="sequence length (default: the checkpoint's seq_length, its "
                                                  "maximum context)")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass")
    g = p.add_argument_group("multiple-choice tasks")
    g.add_argument("--tasks", nargs="*", default=[], metavar="FILE",
                   help="jsonl task files (winogrande / hellaswag / arc / mmlu / native rows)")
    g.add_argument("--task-format", default="auto",
                   choices=("auto", "native", "winogrande", "hellaswag", "arc", "mmlu"),
                   help="row format of the task files; auto = guessed from each file's fields")
    g.add_argument("--num-fewshot", type=int, default=0, help="examples from the same file put before each item")
    g.add_argument("--limit", type=int, help="score only the first N items of each task")
    g.add_argument("--batch-size", type=int, default=8, help="(context, continuation) requests per forward")
    g.add_argument("--tokenizer", help="tokenizer (.model / tokenizer.json / directory); default: the --data "
                                       "sidecar, else the one the checkpoint records")
    g.add_argument("--tokenizer-type", default="auto", choices=("auto", "sentencepiece", "huggingface"),
                   help="kind of --tokenizer; auto = from its file name")
    p.add_argument("--seed", type=int, default=1234, help="dataset shuffle and few-shot sampling seed")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="include per-item log-likelihoods in --output")
    p.set_defaults(handler=run)


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
    from .. import checkpoint
    from ..config import Parallel
    from ..model.builder import build_gpt, resolve_dtype
    from ..runtime.distributed import barrier, init_distributed, rank0_print
    from .inputs import eval_dataset, resolve_eval_tokenizer
    from .runner import eval_batches, evaluate_task, lm_loss
    from .tasks import load_task

    if not args.data and not args.tasks:
        raise ValueError("nothing to evaluate: give --data PREFIX (LM loss) and/or --tasks FILE ...")
    if args.split and not args.data:
        raise ValueError("--split applies to --data; give --data PREFIX too")
    tasks = [load_task(path, args.task_format) for path in args.tasks]  # bad files fail before the model
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"two task files share a name ({names}); rename one (results are keyed by file name)")
    metadata = checkpoint.read_metadata(args.load)
    arch = checkpoint.arch_from_metadata(metadata)
    tokenizer = None
    if tasks:
        tokenizer = resolve_eval_tokenizer(args.tokenizer, args.tokenizer_type, args.data, metadata)
        if tokenizer.vocab_size > arch.padded_vocab_size(args.tp):
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                             f"holds {arch.padded_vocab_size(args.tp)}: it is not this model's tokenizer")
    if args.data:
        from ..data import check_token_ids
        check_token_ids([args.data], arch.vocab_size, "--data")
    from ..job_arch import check_seq_length
    seq_length = arch.seq_length if args.seq_length is None else args.seq_length
    for warning in check_seq_length(seq_length, arch, "--seq-length", f"the checkpoint {args.load}"):
        rank0_print(f"[eval] warning: {warning}")
    par = Parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    par.validate(arch)
    rt = init_distributed(args.tp, args.pp)
    model = build_gpt(arch, par, resolve_dtype(args.precision), device=rt.device)
    checkpoint.load_weights(args.load, [model], arch=arch)
    chunks = [model]

    results = {"checkpoint": metadata["checkpoint_dir"], "iteration": metadata.get("iteration"),
               "parallel": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp}, "seq_length": seq_length}
    if args.data:
        dataset = eval_dataset(args.data, seq_length, args.seed, args.split, args.split_name)
        batches = eval_batches(dataset, args.num_samples, args.micro_batch_size)
        lm = lm_loss(chunks, batches)
        results["lm"] = {"data": args.data, "split": args.split, "split_name": args.split_name,
                         "seq_length": seq_length, **lm}
    if tasks:
        results["tasks"] = {}
        for task in tasks:
            r = evaluate_task(chunks, task, tokenizer, args.num_fewshot, args.limit, args.batch_size,
                              seq_length, args.seed)
            if not args.log_samples:
                r.pop("items")
            results["tasks"][task.name] = r
    rank0_print(format_table(results))
    if args.output and rt.is_rank0:
        directory = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.output)
        rank0_print(f"results written to {args.output}")
    barrier()
    return 0
