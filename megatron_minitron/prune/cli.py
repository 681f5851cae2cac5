"""`minitron prune --load SRC (--save OUT | --in-place) [--data PREFIX] --target key=value ...` (works under
torchrun).

Every argument is checked before a model is built or a file is written. Then: load the source, importance
scores (a calibration pass, or ``--scores`` when that file exists), plan, trim each rank's shards, save the
pruned model (loadable at any layout) with the source's tokenizer, ``prune_plan.json`` (kept indices) and
``prune_summary.yaml``. ``--in-place`` replaces SRC crash-safely (see prune/rewrite.py). See docs/pruning.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import yaml


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="Minitron structured pruning of a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="source checkpoint (a directory, or a root with `latest`)")
    p.add_argument("--save", help="where to write the pruned checkpoint (or --in-place)")
    p.add_argument("--in-place", action="store_true",
                   help="replace --load by the pruned checkpoint (crash-safe; a root: its latest iteration)")
    p.add_argument("--save-format", choices=("minitron", "megatron-lm"), default=None,
                   help="layout of the output: minitron, or megatron-lm (a Megatron-LM root: SAVE/release + "
                        "latest_checkpointed_iteration.txt). Default: the input's format (--in-place keeps it)")
    p.add_argument("--data", help="calibration dataset prefix (.bin/.idx); needed unless --scores exists")
    p.add_argument("--scores", help="importance scores file: read if it exists, else computed and written")
    p.add_argument("--scores-only", action="store_true", help="compute/write --scores and stop")
    p.add_argument("--target", nargs="*", default=[], metavar="KEY=VALUE",
                   help="targets, e.g. hidden_size=3072 ffn_hidden_size=9216 num_attention_heads=24 "
                        "num_query_groups=8 num_layers=16 contiguous=true drop_range=[16,31] depth_metric=bi")
    p.add_argument("--targets-file", help="YAML mapping of targets (or one under `targets:`, e.g. `minitron "
                                          "search`'s best_prune.yaml); --target entries override it")
    p.add_argument("--num-samples", type=int, default=1024, help="calibration samples (paper: 1024)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="calibration samples per forward pass")
    p.add_argument("--seq-length", type=int, help="calibration sequence length (default: the checkpoint's "
                                                  "seq_length, its maximum context)")
    p.add_argument("--batch-agg", default="l2", choices=("mean", "l2", "var"),
                   help="how activations aggregate over the batch axis (2407.14679 Table 13: l2 best)")
    p.add_argument("--seq-agg", default="mean", choices=("mean", "l2", "var"),
                   help="how activations aggregate over the sequence axis (mean best)")
    p.add_argument("--depth-metrics", default="bi", help="comma list: bi, lm_loss, accuracy (with "
                                                         "--depth-task), or registered metrics")
    p.add_argument("--block-sizes", default="", help="comma list of contiguous block sizes to score")
    p.add_argument("--depth-batches", type=int, help="batches for removal metrics (default: all)")
    p.add_argument("--depth-task", help="multiple-choice task (local jsonl) for the 'accuracy' depth metric")
    p.add_argument("--depth-task-shots", type=int, default=0, help="few-shot examples for --depth-task")
    p.add_argument("--depth-task-limit", type=int, help="evaluate only the first N examples of --depth-task")
    p.add_argument("--no-head-merge", action="store_true", help="do not fold pruned heads into kept ones")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: the dtype the checkpoint was saved in")
    p.add_argument("--seed", type=int, default=1234, help="calibration sample seed")
    p.add_argument("--plan-out", help="also write the plan (kept indices) as JSON here")
    p.set_defaults(handler=run)


def read_targets_file(path: str) -> dict:
    """Targets from a YAML file: a mapping, or the mapping under its `targets:` key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--targets-file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data = data.get("targets", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ValueError(f"--targets-file {path}: expected a mapping such as `hidden_size: 3072` (or one under "
                         "`targets:`)")
    return data


def parse_targets(items: list, base: Optional[dict] = None):
    from ..config import from_dict
    from .plan import PruneTargets

    values = dict(base or {})
    for item in items:
        if "=" not in item:
            raise ValueError(f"--target {item!r} is not KEY=VALUE (e.g. hidden_size=3072)")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw)
    return from_dict(PruneTargets, values, "target.")


def _settings(args):
    from .scores import ImportanceSettings

    return ImportanceSettings(
        batch_aggregation=args.batch_agg, sequence_aggregation=args.seq_agg,
        depth_metrics=[m.strip() for m in args.depth_metrics.split(",") if m.strip()],
        block_sizes=[int(k) for k in args.block_sizes.split(",") if k.strip()],
        depth_batches=args.depth_batches)


@dataclass
class PruneJob:
    """Everything ``run`` needs, checked before any model is built or any file written."""
    arch: object
    metadata: dict
    targets: object
    settings: object
    scores: Optional[object]  # loaded ImportanceScores when --scores exists
    plan: Optional[object]  # made up front when the scores are known
    parallel: object
    rewrite: Optional[object]  # layout.SavePaths for --in-place
    save: Optional[str]
    notes: list
    seq_length: int  # the calibration window (--seq-length, else the checkpoint's seq_length)
    save_format: str = "minitron"  # "minitron" | "megatron-lm"


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _save_format(args, metadata: dict) -> str:
    from ..checkpoint import checkpoint_format

    source = checkpoint_format(metadata)
    wanted = getattr(args, "save_format", None)
    if args.in_place and wanted is not None and wanted != source:
        raise ValueError(f"--in-place keeps the input's format ({source}); drop --save-format {wanted}, or "
                         f"write the {wanted} copy to a new directory with --save")
    return wanted or source


def _check_output(args, metadata: dict, save_format: str = "minitron") -> Optional[str]:
    from ..checkpoint import layout

    if args.scores_only:
        if args.in_place or args.save:
            raise ValueError("--scores-only writes only --scores; drop --save/--in-place")
        return None
    if args.in_place:
        if args.save and not _same_path(args.save, args.load):
            raise ValueError("--in-place rewrites --load itself; drop --save (or drop --in-place to write "
                             "the pruned checkpoint to --save)")
        return None
    if not args.save:
        raise ValueError("give --save OUT for the pruned checkpoint, or --in-place to replace --load "
                         "(or --scores-only with --scores PATH)")
    if _same_path(args.save, args.load) or _same_path(args.save, metadata["checkpoint_dir"]):
        raise ValueError(f"--save {args.save} is the source checkpoint; pass --in-place to replace it "
                         "(crash-safe), or choose another --save directory")
    out = os.path.abspath(args.save)
    if save_format == "megatron-lm":
        if os.path.exists(out) and (not os.path.isdir(out) or (
                os.listdir(out) and not layout.is_megatron_lm_root(out))):
            raise ValueError(f"--save {out} exists and is not a Megatron-LM checkpoint root (no "
                             f"{layout.TRACKER_FILE}); choose a new directory or remove it first")
        return out
    if os.path.exists(out) and (not os.path.isdir(out)
                                or (os.listdir(out) and not layout.looks_like_checkpoint(out))):
        raise ValueError(f"--save {out} exists and is not a megatron-minitron checkpoint; refusing to "
                         "overwrite it. Choose a new directory or remove it first")
    return out


def _check_data(prefix: str, num_samples: int, seq: int, micro_batch_size: int) -> None:
    """The calibration set holds at least ``num_samples`` windows of ``seq`` (+1) tokens (one epoch, as
    ``data.calibration_batches`` cuts it); read from the .idx alone."""
    for ext in (".bin", ".idx"):
        if not os.path.exists(prefix + ext):
            raise FileNotFoundError(f"calibration data {prefix}{ext} not found; pass the prefix of a dataset "
                                    "built by `minitron preprocess` (without .bin/.idx)")
    if num_samples < 1 or micro_batch_size < 1:
        raise ValueError("--num-samples and --micro-batch-size must be >= 1")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix)  # keep it alive: its mmap closes when it is collected
    tokens = int(index.sequence_lengths.sum())
    del index
    available = max(tokens - 1, 0) // seq
    if available < num_samples:
        raise ValueError(f"{prefix} holds {tokens} tokens = {available} sequences of {seq} (+1) tokens, fewer "
                         f"than --num-samples {num_samples}; lower --num-samples or --seq-length, or give "
                         "more data")


def _register_depth_task(args, settings, notes: list, seq_length: int) -> None:
    if args.depth_task is None:
        return
    if not os.path.isfile(args.depth_task):
        raise FileNotFoundError(f"--depth-task {args.depth_task} not found (a local jsonl task file)")
    try:
        from ..eval.depth import accuracy_depth_metric
    except ImportError as e:
        raise ValueError(f"--depth-task needs megatron_minitron.eval.depth (downstream accuracy), which is "
                         f"not available here ({e}); use --depth-metrics bi or lm_loss instead") from None
    # the tokenizer comes from the calibration data's sidecar or the checkpoint's record (eval's rules)
    from .depth import register_depth_metric
    register_depth_metric("accuracy", accuracy_depth_metric(
        args.depth_task, num_fewshot=args.depth_task_shots, limit=args.depth_task_limit, data=args.data,
        load=args.load, seq_length=seq_length))
    if "accuracy" not in settings.depth_metrics:
        settings.depth_metrics.append("accuracy")
        notes.append(f"depth metric 'accuracy' on {args.depth_task} added")


def _depth_needs(arch, targets, resolved, settings, notes: list) -> None:
    """When a metric picks the layers, make the calibration pass compute exactly what the plan reads."""
    if resolved.drop is not None or resolved.num_layers == arch.num_layers:
        return
    metric = targets.depth_metric
    if metric not in settings.depth_metrics:
        settings.depth_metrics.append(metric)
        notes.append(f"depth metric {metric!r} added (the num_layers target ranks layers by it)")
    k = arch.num_layers - resolved.num_layers
    if targets.contiguous and k > 1 and k not in settings.block_sizes:
        settings.block_sizes.append(k)
        notes.append(f"block size {k} added (a contiguous block of {k} layers is dropped)")


def _depth_what(metric: str, size: int) -> str:
    return f"{metric!r} scores for {'single layers' if size == 1 else f'blocks of {size} layers'}"


def _lacking_depth_message(path: str, scores, arch, targets, lacking: tuple) -> str:
    metric, size = lacking
    flags = f"--depth-metrics {metric}" + (f" --block-sizes {size}" if size > 1 else "")
    contiguous = " contiguous=true" if targets.contiguous else ""
    return (f"--scores {path} has no {_depth_what(metric, size)} (it has {scores.depth_inventory()}), which "
            f"--target num_layers={targets.num_layers}{contiguous} ranks the {arch.num_layers} layers by. Give "
            f"--data PREFIX (calibration data) to compute them - the file is rewritten with them - or recompute "
            f"the file with `minitron prune --load ... --data PREFIX --scores {path} --scores-only {flags}`")


def _extend_settings(saved, wanted):
    """The settings a file was computed with, plus the depth metrics / block sizes asked for now (the new file
    keeps what the old one held, except a metric that is not registered now, e.g. 'accuracy' without
    --depth-task)."""
    from .depth import DEPTH_METRICS

    old = [m for m in saved.depth_metrics if m == "bi" or m in DEPTH_METRICS]
    return dataclasses.replace(saved, depth_metrics=list(dict.fromkeys([*old, *wanted.depth_metrics])),
                               block_sizes=sorted({*map(int, saved.block_sizes), *wanted.block_sizes}))


def prepare(args) -> PruneJob:
    """Validate every argument; reads metadata (and the scores / data index), writes nothing."""
    from .. import checkpoint
    from ..config import Parallel
    from .plan import depth_scores_needed, make_plan, validate_targets
    from .scores import ImportanceScores

    targets = parse_targets(args.target, read_targets_file(args.targets_file)
                            if getattr(args, "targets_file", None) else None)
    metadata = checkpoint.read_metadata(args.load)  # FileNotFoundError / ValueError when not a checkpoint
    arch = checkpoint.arch_from_metadata(metadata)
    save_format = _save_format(args, metadata)
    save = _check_output(args, metadata, save_format)
    from ..job_arch import check_seq_length
    seq_length = arch.seq_length if args.seq_length is None else args.seq_length
    notes: list = [f"warning: {w}" for w in check_seq_length(seq_length, arch, "--seq-length",
                                                              f"the checkpoint {args.load}")]
    par = Parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    par.validate(arch)
    resolved = validate_targets(arch, targets, tp=args.tp)
    settings = _settings(args)
    settings.validate(arch.num_layers)
    have_scores = bool(args.scores) and os.path.exists(args.scores)
    if args.scores_only and not args.scores:
        raise ValueError("--scores-only needs --scores PATH to write the scores to")
    scores = plan = None
    if have_scores:
        scores = ImportanceScores.load(args.scores)
        lacking = depth_scores_needed(arch, targets)
        if lacking is not None and not scores.has_depth(*lacking):
            if not args.data:
                raise ValueError(_lacking_depth_message(args.scores, scores, arch, targets, lacking))
            # one calibration pass computes them; the file is rewritten with everything it held plus them
            notes.append(f"{args.scores} has no {_depth_what(*lacking)}: computing importance again on "
                         f"{args.data} (its settings, with the depth scores added) and rewriting it")
            settings = _extend_settings(scores.settings, settings)
            scores = None
        elif not args.scores_only:
            plan = make_plan(scores, arch, targets, tp=args.tp, merge_heads=not args.no_head_merge)
    if scores is None:
        if not args.data:
            raise ValueError("give --data PREFIX (calibration data) or an existing --scores file")
        _register_depth_task(args, settings, notes, seq_length)
        _depth_needs(arch, targets, resolved, settings, notes)
        settings.validate(arch.num_layers)
        _check_data(args.data, args.num_samples, seq_length, args.micro_batch_size)
        from ..data import check_token_ids
        check_token_ids([args.data], arch.vocab_size, "--data (calibration)")
    if args.pp > 1 and not args.scores_only:
        kept = (plan.kept_layers if plan is not None else
                None if resolved.drop is None else [i for i in range(arch.num_layers) if i not in resolved.drop])
        if kept is not None:  # a stage left without layers fails now rather than after calibration
            from .plan import PrunePlan
            layers_only = PrunePlan(arch, arch, kept, hidden=[], neurons=[], groups=[], heads=[])
            layers_only.target_pipeline_split(par.layers_per_stage(arch.num_layers))
    rewrite = None
    if args.in_place:
        from .rewrite import rewrite_paths
        rewrite = rewrite_paths(args.load, save_format)
    return PruneJob(arch=arch, metadata=metadata, targets=targets, settings=settings, scores=scores, plan=plan,
                    parallel=par, rewrite=rewrite, save=save, notes=notes, seq_length=seq_length,
                    save_format=save_format)


def _dtype(precision: str, metadata: dict):
    import torch

    from ..model.builder import resolve_dtype

    if precision == "auto":
        stored = str((metadata.get("contents") or {}).get("params_dtype", "")).replace("torch.", "")
        if stored in ("bfloat16", "float32", "float16"):
            return getattr(torch, stored)
    return resolve_dtype(precision)


def _tokenizer_for(metadata: dict, final_dir: str):
    """The source's tokenizer record; a path pointing into the source checkpoint now points into ours."""
    tok = metadata.get("tokenizer")
    if isinstance(tok, dict) and tok.get("path") and _same_path(tok["path"], metadata["checkpoint_dir"]):
        return {**tok, "path": final_dir}
    return tok


def run(args) -> int:
    from megatron.core import parallel_state as ps

    from .. import checkpoint
    from ..hf.io import copy_tokenizer_files
    from ..model.builder import build_gpt
    from ..runtime.distributed import barrier, init_distributed, rank0_print
    from .importance import estimate_importance
    from .plan import make_plan
    from .rewrite import on_rank0, recover_interrupted_rewrite, save_and_swap
    from .summary import PLAN_FILE, PhaseTimer, build_summary, format_summary, importance_record, write_summary
    from .trim import prune_model_state

    timer = PhaseTimer()
    with timer("validate"):
        job = prepare(args)
    rt = init_distributed(args.tp, args.pp)
    from ..checkpoint.lock import lock_output_on_rank0
    if job.rewrite is not None:  # one writer per output: a second prune into the same place fails at once
        output_lock = lock_output_on_rank0(job.rewrite.root or job.rewrite.final, job.rewrite.root is not None,
                                           "--in-place checkpoint")
    elif job.save:  # --scores-only writes no checkpoint
        output_lock = lock_output_on_rank0(job.save, False, "--save directory")
    where = f"in place ({job.rewrite.final})" if job.rewrite is not None else f"-> {job.save}"
    source = "--scores file" if job.scores is not None else (
        f"{args.num_samples} calibration samples x {job.seq_length} tokens from {args.data}")
    rank0_print(f"[prune] {args.load}: {job.arch.num_parameters():,} parameters, {job.arch.num_layers} layers, "
                f"hidden {job.arch.hidden_size}, ffn {job.arch.ffn_hidden_size}, {job.arch.num_attention_heads} "
                f"heads / {job.arch.query_groups} groups; TP{rt.tp} PP{rt.pp}; importance from {source}; {where}")
    for note in job.notes:
        rank0_print(f"[prune] {note}")
    if job.rewrite is not None:
        on_rank0(lambda: recover_interrupted_rewrite(job.rewrite), "settling an interrupted --in-place run")
        if job.rewrite.root is not None:
            rank0_print(f"[prune] --in-place on {job.rewrite.root}: rewriting {job.rewrite.final} (the "
                        "iteration `latest` names); other iterations keep the source architecture")
    arch, par, metadata = job.arch, job.parallel, job.metadata
    dtype = _dtype(args.precision, metadata)
    with timer("load"):
        model = build_gpt(arch, par, dtype, device=rt.device)
        metadata = checkpoint.load_weights(args.load, [model], arch=arch)
    source_dir = metadata["checkpoint_dir"]

    scores = job.scores
    with timer("calibration"):
        if scores is not None:
            rank0_print(f"[prune] importance scores from {args.scores}")
        else:
            from ..data import calibration_batches

            batches = calibration_batches(args.data, args.num_samples, job.seq_length,
                                          args.micro_batch_size, ps.get_data_parallel_rank(),
                                          ps.get_data_parallel_world_size(), seed=args.seed)
            scores = estimate_importance([model], batches, job.settings)
            if args.scores:
                on_rank0(lambda: scores.save(args.scores), f"writing {args.scores}")
            rank0_print(f"[prune] importance from {scores.num_samples} samples" +
                        (f", written to {args.scores}" if args.scores else ""))
    if args.scores_only:
        return 0

    with timer("plan"):
        plan = job.plan or make_plan(scores, arch, job.targets, tp=args.tp, merge_heads=not args.no_head_merge)
        if args.plan_out:
            on_rank0(lambda: _write_text(args.plan_out, plan.to_json()), f"writing {args.plan_out}")
    with timer("trim"):
        state = prune_model_state(model, plan)
        split = plan.target_pipeline_split(par.layers_per_stage(arch.num_layers)) if args.pp > 1 else None
        target_par = dataclasses.replace(par, pipeline_split=split)
        del model
        pruned = build_gpt(plan.target, target_par, dtype, device=rt.device)
        pruned.load_state_dict(state, strict=True)
        del state

    final = job.rewrite.final if job.rewrite is not None else job.save
    if job.rewrite is None and job.save_format == "megatron-lm":
        final = os.path.join(job.save, checkpoint.RELEASE_DIR)  # where the weights and files go in that root
    tokenizer = _tokenizer_for(metadata, final)
    provenance = {"pruned_from": source_dir, "source_architecture": dataclasses.asdict(arch),
                  "targets": dataclasses.asdict(job.targets), "importance": dataclasses.asdict(scores.settings),
                  "head_merge": not args.no_head_merge, "kept_layers": plan.kept_layers,
                  "in_place": bool(args.in_place)}

    def add_files(directory: str) -> None:
        copy_tokenizer_files(source_dir, directory)
        _write_text(os.path.join(directory, PLAN_FILE), plan.to_json())

    if job.rewrite is not None:
        out = save_and_swap(job.rewrite, pruned, arch=plan.target, parallel=target_par, dtype=dtype,
                            device=rt.device, iteration=int(metadata.get("iteration", 0)),
                            provenance=provenance, tokenizer=tokenizer, add_files=add_files, timer=timer,
                            format=job.save_format)
    else:
        with timer("save"):
            out = checkpoint.save_checkpoint_to(job.save, [pruned], arch=plan.target, parallel=target_par,
                                                provenance=provenance, tokenizer=tokenizer,
                                                format=job.save_format)
            on_rank0(lambda: add_files(out), f"adding the tokenizer files and plan to {out}")
    summary = build_summary(plan, importance=importance_record(scores.settings, scores.num_samples),
                            seconds=timer.seconds, source=source_dir, output=out, in_place=bool(args.in_place),
                            head_merge=not args.no_head_merge, scores_file=args.scores, tokenizer=tokenizer)
    on_rank0(lambda: write_summary(out, summary), f"writing the summary into {out}")
    barrier()
    rank0_print("[prune] " + format_summary(summary).replace("\n", "\n[prune] "))
    return 0


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.writing"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
