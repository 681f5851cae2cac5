"""`minitron prune --load SRC (--save OUT | --in-place) [--data PREFIX] --target key=value ...` (works under
torchrun), or `minitron prune --config prune.yaml [key=value ...] [flags]`.

Every argument is checked before a model is built or a file is written. Then: load the source, importance
scores (a calibration pass, or ``--scores`` when that file exists), plan, trim each rank's shards, save the
pruned model (loadable at any layout) with the source's tokenizer, ``prune_plan.json`` (kept indices) and
``prune_summary.yaml``. ``--in-place`` replaces SRC crash-safely (see prune/rewrite.py).

A config file is a PruneConfig in YAML (load, save, scores, targets, calibration, importance, parallel, ...;
see docs/pruning.md); `key=value` overrides (e.g. save=OUT calibration.num_samples=64 targets.num_layers=16)
apply on top of it, and the flags on top of both. The same run from Python:
``megatron_minitron.prune.run(PruneConfig(...))``. See docs/pruning.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional

import yaml

from .config import Calibration, PruneConfig
from .scores import ImportanceSettings

_IMPORTANCE = ImportanceSettings()
_CALIBRATION = Calibration()


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="Minitron structured pruning of a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # valued flags default to None: a flag left out keeps the config file's value (or PruneConfig's default,
    # named in the help line)
    p.add_argument("--config", help="YAML file holding a PruneConfig (docs/pruning.md); flags override it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="PruneConfig overrides, e.g. save=OUT calibration.num_samples=64 targets.num_layers=16 "
                        "(applied on top of --config; flags win)")
    p.add_argument("--load", help="source checkpoint (a directory, or a root with `latest`); required here "
                                  "or as `load:` in --config")
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
    p.add_argument("--num-samples", type=int, help=f"calibration samples (paper: 1024) "
                                                   f"(default: {_CALIBRATION.num_samples})")
    p.add_argument("--micro-batch-size", type=int, help=f"calibration samples per forward pass "
                                                        f"(default: {_CALIBRATION.micro_batch_size})")
    p.add_argument("--seq-length", type=int, help="calibration sequence length (default: the checkpoint's "
                                                  "seq_length, its maximum context)")
    p.add_argument("--batch-agg", choices=("mean", "l2", "var"),
                   help="how activations aggregate over the batch axis (2407.14679 Table 13: l2 best) "
                        f"(default: {_IMPORTANCE.batch_aggregation})")
    p.add_argument("--seq-agg", choices=("mean", "l2", "var"),
                   help="how activations aggregate over the sequence axis (mean best) "
                        f"(default: {_IMPORTANCE.sequence_aggregation})")
    p.add_argument("--depth-metrics", help="comma list: bi, lm_loss, accuracy (with --depth-task), or "
                                           f"registered metrics (default: {','.join(_IMPORTANCE.depth_metrics)})")
    p.add_argument("--block-sizes", help="comma list of contiguous block sizes to score (default: none)")
    p.add_argument("--depth-batches", type=int, help="batches for removal metrics (default: all)")
    p.add_argument("--depth-task", help="multiple-choice task (local jsonl) for the 'accuracy' depth metric")
    p.add_argument("--depth-task-shots", type=int, default=0, help="few-shot examples for --depth-task")
    p.add_argument("--depth-task-limit", type=int, help="evaluate only the first N examples of --depth-task")
    p.add_argument("--no-head-merge", action="store_true", help="do not fold pruned heads into kept ones")
    p.add_argument("--tp", type=int, help="tensor-parallel size of this run (default: 1)")
    p.add_argument("--pp", type=int, help="pipeline-parallel size of this run (default: 1)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="auto: the dtype the checkpoint was saved in (default: auto)")
    p.add_argument("--seed", type=int, help=f"calibration sample seed (default: {_CALIBRATION.seed})")
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


def _target_values(items: list, base: Optional[dict] = None) -> dict:
    values = dict(base or {})
    for item in items:
        if "=" not in item:
            raise ValueError(f"--target {item!r} is not KEY=VALUE (e.g. hidden_size=3072)")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw)
    return values


def parse_targets(items: list, base: Optional[dict] = None):
    """``--target KEY=VALUE`` strings (over ``base``, e.g. a --targets-file) -> PruneTargets."""
    from ..config import from_dict
    from .plan import PruneTargets

    return from_dict(PruneTargets, _target_values(items, base), "target.")


def _split_swallowed_overrides(args) -> tuple:
    """(targets, overrides): `--target a=1 save=OUT` hands every KEY=VALUE after --target to it; those whose
    key is a PruneConfig field or a dotted path (targets are plain names) are config overrides."""
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    targets, overrides = [], list(args.overrides or [])
    for item in args.target or []:
        key = item.split("=", 1)[0].strip()
        (overrides if "=" in item and ("." in key or key in fields) else targets).append(item)
    return targets, overrides


def _comma_list(text: str) -> list:
    return [m.strip() for m in text.split(",") if m.strip()]


def config_from_args(args) -> PruneConfig:
    """--config FILE, then KEY=VALUE overrides, then the flags given -> PruneConfig (not validated yet)."""
    from ..config import apply_overrides, from_dict, load_yaml

    targets, overrides = _split_swallowed_overrides(args)
    data = apply_overrides(load_yaml(getattr(args, "config", None)), overrides)

    def put(path: str, value) -> None:
        if value is None:
            return
        node = data
        *sections, key = path.split(".")
        for name in sections:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name} in the prune config must be a mapping (a section)")
        node[key] = value

    for path, value in (
            ("load", args.load), ("save", args.save), ("save_format", args.save_format),
            ("scores", args.scores), ("plan_out", args.plan_out), ("precision", args.precision),
            ("calibration.data", args.data), ("calibration.num_samples", args.num_samples),
            ("calibration.micro_batch_size", args.micro_batch_size),
            ("calibration.seq_length", args.seq_length), ("calibration.seed", args.seed),
            ("importance.batch_aggregation", args.batch_agg), ("importance.sequence_aggregation", args.seq_agg),
            ("importance.depth_batches", args.depth_batches),
            ("parallel.tensor_model_parallel_size", args.tp), ("parallel.pipeline_model_parallel_size", args.pp)):
        put(path, value)
    if args.depth_metrics is not None:
        put("importance.depth_metrics", _comma_list(args.depth_metrics))
    if args.block_sizes is not None:
        put("importance.block_sizes", [int(k) for k in _comma_list(args.block_sizes)])
    for flag, path, value in ((args.in_place, "in_place", True), (args.scores_only, "scores_only", True),
                              (args.no_head_merge, "head_merge", False)):
        if flag:  # a store_true flag left out keeps the config's value
            put(path, value)
    base = data.get("targets") or {}
    if not isinstance(base, dict):
        raise ValueError("targets in the prune config must be a mapping such as {hidden_size: 3072}")
    if getattr(args, "targets_file", None):
        base = {**base, **read_targets_file(args.targets_file)}
    data["targets"] = _target_values(targets, base)
    return from_dict(PruneConfig, data)


def _depth_task_metrics(args, cfg: PruneConfig) -> Optional[dict]:
    """--depth-task: the 'accuracy' removal metric (built by the eval module), when a calibration pass will
    compute depth scores; None otherwise (an existing complete --scores file needs no task)."""
    if args.depth_task is None:
        return None
    if not os.path.isfile(args.depth_task):
        raise FileNotFoundError(f"--depth-task {args.depth_task} not found (a local jsonl task file)")
    try:
        from ..eval.depth import accuracy_depth_metric
    except ImportError as e:
        raise ValueError(f"--depth-task needs megatron_minitron.eval.depth (downstream accuracy), which is "
                         f"not available here ({e}); use --depth-metrics bi or lm_loss instead") from None
    from . import job

    prepared = job.prepare(cfg, extra_metrics=("accuracy",))  # writes nothing; run checks all of it again
    if prepared.scores is not None:
        return None
    # the tokenizer comes from the calibration data's sidecar or the checkpoint's record (eval's rules)
    return {"accuracy": accuracy_depth_metric(
        args.depth_task, num_fewshot=args.depth_task_shots, limit=args.depth_task_limit,
        data=cfg.calibration.data, load=cfg.load, seq_length=prepared.seq_length)}


def run(args) -> int:
    from . import job

    cfg = config_from_args(args)
    job.run(cfg, depth_metrics=_depth_task_metrics(args, cfg))
    return 0
