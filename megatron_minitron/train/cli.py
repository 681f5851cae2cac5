"""`minitron train CONFIG [section.key=value ...]`."""
from __future__ import annotations

from ..config import add_config_args, split_config_args


def resolve_model_from_checkpoint(cfg) -> None:
    """When the weights come from a checkpoint (resumed from train.save, else train.load), the architecture is
    that checkpoint's and model.seq_length, if given, the run's window (job_arch.py); cfg.model becomes it."""
    from .. import checkpoint
    from ..job_arch import resolve_from_checkpoint, show_warnings

    t = cfg.train
    resumed = bool(t.save) and checkpoint.latest_iteration(t.save) is not None
    source, role = (t.save, "checkpoint being resumed") if resumed else (t.load, "train.load checkpoint")
    if not source:
        return
    job = resolve_from_checkpoint(cfg.model, source, role)
    show_warnings(job)
    cfg.model = job.window_arch


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train (or fine-tune) a GPT with megatron-core",
                              description="Train a GPT. Resumes from train.save when it holds a checkpoint.")
    add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..config import TrainConfig, dump_yaml, load_config, to_dict

    config, overrides = split_config_args(args)
    cfg = load_config(TrainConfig, config, overrides)
    resolve_model_from_checkpoint(cfg)
    cfg.model.validate()
    cfg.parallel.validate(cfg.model)
    cfg.train.validate()
    if args.print_config:
        import yaml
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    check_run_request(cfg)
    from .loop import Trainer

    trainer = Trainer(cfg).setup()
    if already_finished(trainer):
        return 0
    if trainer.rt.is_rank0 and cfg.train.save:
        import os
        os.makedirs(cfg.train.save, exist_ok=True)
        dump_yaml(cfg, os.path.join(cfg.train.save, "config.yaml"))
    trainer.run()
    return trainer.exit_code


def check_run_request(cfg) -> None:
    """What a `train` / `distill` command is asked to do, checked before any model is built: something to
    train, and a save root that can be one."""
    import os

    t = cfg.train
    if t.train_iters < 1:
        raise ValueError(f"train.train_iters={t.train_iters}: nothing to train. Give the number of iterations "
                         f"(e.g. train.train_iters=1000); to only evaluate a checkpoint use `minitron eval --load`")
    if t.save and os.path.exists(t.save) and not os.path.isdir(t.save):
        raise ValueError(f"train.save={t.save} is an existing file, not a directory: point train.save at a "
                         f"checkpoint root (a new or existing directory)")


def already_finished(trainer) -> bool:
    """A resumed run that already reached train.train_iters: say so and change nothing on disk."""
    done, target = trainer.state.iteration, trainer.cfg.train.train_iters
    if done < target:
        return False
    trainer.log0(f"{trainer.cfg.train.save} is already at iteration {done} >= train.train_iters={target}: "
                 f"nothing to do (raise train.train_iters to train further)")
    return True
