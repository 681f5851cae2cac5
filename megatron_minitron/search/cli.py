"""`minitron search --load CKPT --param-budget N --data PREFIX --output DIR [--tolerance 0.05] [--steps 400]
[--space YAML] [--scores FILE] [CONFIG] [section.key=value ...]` (works under torchrun; see docs/search.md)."""
from __future__ import annotations

import re

from ..config import add_config_args, split_config_args

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # section.key=value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="lightweight architecture search: prune + short distillation per candidate",
        description="Enumerate architectures within a parameter budget, prune each from one importance file, "
                    "distill each briefly, rank them; results persist per candidate (rerun to resume).")
    add_config_args(p)
    p.add_argument("--load", help="source checkpoint (search.load)")
    p.add_argument("--param-budget", type=float, help="target parameter count, e.g. 4.5e9 (search.param_budget)")
    p.add_argument("--tolerance", type=float, help="relative tolerance (search.tolerance, default 0.05)")
    p.add_argument("--data", nargs="+", help="training/calibration data prefixes (data.train_data)")
    p.add_argument("--valid-data", nargs="+", help="validation data prefixes (data.valid_data)")
    p.add_argument("--output", help="search directory (search.output)")
    p.add_argument("--steps", type=int, help="distillation steps per candidate (search.steps, default 400)")
    p.add_argument("--space", help="YAML file with the search space (search.space: per-axis value lists)")
    p.add_argument("--scores", help="importance file from `minitron prune --scores-only` (search.scores; "
                                    "default OUTPUT/importance.pt, computed from the first --data prefix "
                                    "when missing)")
    p.add_argument("--count", choices=("total", "non_embedding"),
                   help="what the budget counts (search.count, default total)")
    p.add_argument("--max-candidates", type=int, help="keep the N closest to the budget (search.max_candidates)")
    p.add_argument("--seq-length", type=int, help="sequence length of the calibration and of every candidate's "
                                                  "distillation (search.seq_length; default: the source's "
                                                  "seq_length, its maximum context)")
    p.set_defaults(handler=run)


def run(args) -> int:
    import yaml

    from ..config import load_config
    from .run import SearchConfig, run_search

    config, overrides = split_config_args(args)
    for name in ("data", "valid_data"):  # `--data PREFIX train.lr=1e-4`: nargs="+" swallowed the override
        values = getattr(args, name)
        if values:
            setattr(args, name, [v for v in values if not _OVERRIDE.match(v)] or None)
            overrides += [v for v in values if _OVERRIDE.match(v)]
    flags = {"search.load": args.load, "search.tolerance": args.tolerance, "search.output": args.output,
             "search.steps": args.steps, "search.scores": args.scores, "search.count": args.count,
             "search.max_candidates": args.max_candidates,
             "search.param_budget": int(args.param_budget) if args.param_budget else None,
             "data.train_data": args.data, "data.valid_data": args.valid_data, "search.seq_length": args.seq_length}
    if args.space:
        with open(args.space) as f:
            space = yaml.safe_load(f) or {}
        flags["search.space"] = space.get("space", space)  # the axes, at the top level or under `space:`
    flag_overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                      for k, v in flags.items() if v is not None]
    cfg = load_config(SearchConfig, config, flag_overrides + overrides)
    run_search(cfg)  # None when stopped by a signal: saved, and a rerun resumes (exit 0, e.g. for requeue)
    return 0
