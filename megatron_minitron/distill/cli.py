"""`minitron distill CONFIG [section.key=value ...]`."""
from __future__ import annotations

from ..config import add_config_args, split_config_args
from ..train.cli import check_run_request


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="distill a (pruned) student from a frozen teacher on the same GPUs",
        description="Knowledge distillation: distill.teacher and distill.student are checkpoints; the student "
                    "is trained (and checkpointed to train.save, resumed from there) with the KD loss.")
    add_config_args(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..config import load_config
    from .config import DistillConfig
    from .job import run as run_distillation

    config, overrides = split_config_args(args)
    cfg = load_config(DistillConfig, config, overrides)
    check_run_request(cfg)
    trainer, _ = run_distillation(cfg)
    return trainer.exit_code
