"""`minitron plan CONFIG [overrides] --nodes N --gpus-per-node G`: per-GPU memory and a suggested layout.

CONFIG is a train or distill YAML (a ``distill`` section makes it a distillation). For distillation the
student is the config's ``model`` section (or ``distill.student`` when that checkpoint exists) and the
teacher comes from ``--teacher`` (a checkpoint directory or a YAML with a ``model`` section), else from
``distill.teacher`` when that checkpoint exists. ``--job prune`` plans the calibration + trimming pass on
the config's model. Nothing is allocated: this is arithmetic (docs/memory_planner.md).
"""
from __future__ import annotations

import argparse
import os

from ..train.optim import steps_with_foreach_adam
from .memory import GIB, KD_LOSSES, Job, Layout, estimate, num_microbatches

PRECISION_BYTES = {"bf16": 2, "fp32": 4, "fp8": 1}
COLUMNS = (("weights", "weights"), ("grads", "grads"), ("optimizer", "optim"), ("activations", "activ"),
           ("teacher_weights", "teacher"), ("teacher_activations", "t.act"), ("logits", "logits"),
           ("kd_loss_buffers", "kd buf"), ("optimizer_step", "opt.stp"), ("pruned_copy", "pruned"))


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="estimate per-GPU memory and suggest TP / PP / micro-batch",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="train or distill YAML config")
    p.add_argument("overrides", nargs="*", help="overrides such as data.global_batch_size=768")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB (H100: 80)")
    p.add_argument("--margin", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    p.add_argument("--overhead-gb", type=float, default=3.0,
                   help="CUDA context, NCCL buffers, allocator slack per GPU in GiB (default 3)")
    p.add_argument("--job", choices=("auto", "train", "distill", "prune"), default="auto",
                   help="what to plan (auto: distill when the config has a distill section)")
    p.add_argument("--teacher", help="teacher checkpoint directory or YAML with a model section")
    p.add_argument("--teacher-precision", choices=("auto", "bf16", "fp8", "fp32"), default="auto",
                   help="teacher weight storage (auto: distill.teacher_precision, else the student's)")
    p.add_argument("--kd-loss", choices=("auto",) + KD_LOSSES, default="auto",
                   help="auto: what distill runs on GPUs for the config (fused_linear for forward/reverse KL "
                        "unless distill.kd_loss_backend is triton/torch, else chunked); chunked: the KD loss on "
                        "both models' logits; naive: fp32 log_softmax copies of the full logits; fused_linear: "
                        "KD fused with the output layers (no [T, V] logits)")
    p.add_argument("--top", type=int, default=8, help="rows of the table (default 8)")
    p.set_defaults(handler=run)


def _arch_from(path: str, what: str):
    from ..config import ModelArch, from_dict, load_yaml

    if os.path.isdir(path):
        from ..checkpoint import read_arch
        return read_arch(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} not found: give a checkpoint directory or a YAML file")
    data = load_yaml(path)
    if "model" not in data:
        raise ValueError(f"{what} {path} has no `model` section")
    return from_dict(ModelArch, data["model"], "model.")


def planned_kd_loss(choice: str, distill) -> str:
    """The planner's KD-loss memory model for ``--kd-loss`` (auto: what ``distill`` runs on a GPU, where
    Triton is part of torch's CUDA wheels)."""
    if choice != "auto":
        return choice
    from ..distill.objective import wants_fused_output_layer

    return "fused_linear" if distill is not None and wants_fused_output_layer(distill) else "chunked"


def load_job(args):
    """(Job, config) from the CLI arguments."""
    from ..config import TrainConfig, apply_overrides, from_dict, load_yaml
    from ..distill.config import DistillConfig
    from ..config import split_config_args

    config, overrides = split_config_args(args)
    raw = apply_overrides(load_yaml(config), overrides)
    kind = args.job if args.job != "auto" else ("distill" if "distill" in raw else "train")
    cfg = from_dict(DistillConfig if "distill" in raw else TrainConfig, raw)
    student = cfg.model
    teacher = None
    teacher_precision = args.teacher_precision
    if kind == "distill":
        d = getattr(cfg, "distill", None)
        if d is not None and d.student and os.path.isdir(d.student):
            student = _arch_from(d.student, "distill.student")
        teacher_path = args.teacher or (d.teacher if d is not None and d.teacher and os.path.isdir(d.teacher)
                                        else None)
        if not teacher_path:
            raise ValueError("planning a distillation needs the teacher's architecture: give --teacher "
                             "CHECKPOINT_OR_YAML (e.g. the teacher's train config)")
        teacher = _arch_from(teacher_path, "--teacher")
        if teacher_precision == "auto" and d is not None and d.teacher_precision != "auto":
            teacher_precision = d.teacher_precision
    student.validate()
    param_bytes = 4 if cfg.train.precision == "fp32" else 2
    job = Job(kind=kind, model=student, teacher=teacher, seq_length=student.seq_length,
              global_batch_size=cfg.data.global_batch_size, param_bytes=param_bytes,
              teacher_bytes=param_bytes if teacher_precision == "auto" else PRECISION_BYTES[teacher_precision],
              distributed_optimizer=cfg.parallel.use_distributed_optimizer,
              foreach_adam=steps_with_foreach_adam(cfg.train),
              kd_loss=planned_kd_loss(args.kd_loss, getattr(cfg, "distill", None)),
              lm_loss=bool(kind == "distill" and getattr(cfg, "distill", None) and cfg.distill.lm_loss_weight))
    job.validate()
    return job, cfg


def parameter_count_text(n: int) -> str:
    """A parameter count as a reader takes it in: 8.41B, 262.72M, or exact below a million (a tiny CPU
    model would otherwise read "0.00B")."""
    if n >= 10 ** 9:
        return f"{n / 1e9:.2f}B"
    if n >= 10 ** 6:
        return f"{n / 1e6:.2f}M"
    return f"{n:,}"


def _row(cand_est, relative_time=None) -> str:
    parts = cand_est.parts
    cells = [f"{parts.get(name, 0) / GIB:7.1f}" for name, _ in COLUMNS]
    rel = f"{relative_time:6.2f}" if relative_time is not None else "     -"
    return f"{cand_est.layout.describe():<34} {cand_est.total / GIB:7.1f} " + " ".join(cells) + f" {rel}"


def _header() -> str:
    return f"{'layout':<34} {'total':>7} " + " ".join(f"{label:>7}" for _, label in COLUMNS) + "  rel.t"


def config_layout(cfg, world: int):
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if world % (tp * pp):
        return None
    return Layout(tp=tp, pp=pp, dp=world // (tp * pp), micro_batch_size=cfg.data.micro_batch_size,
                  recompute=cfg.train.recompute, sequence_parallel=par.sequence_parallel)


def run(args) -> int:
    from .layouts import best_layout, rank_layouts

    job, cfg = load_job(args)
    world = args.nodes * args.gpus_per_node
    m = job.model
    print(f"{job.kind}: {parameter_count_text(m.num_parameters())} params (layers {m.num_layers}, hidden {m.hidden_size}, "
          f"ffn {m.ffn_hidden_size}, heads {m.num_attention_heads}/{m.query_groups}, vocab {m.vocab_size})"
          + (f", teacher {parameter_count_text(job.teacher.num_parameters())} ({job.teacher_bytes} B/param), KD loss "
             f"{job.kd_loss}" if job.teacher else "")
          + f"; seq {job.seq_length}, global batch {job.global_batch_size}; {args.nodes} x {args.gpus_per_node}"
          f" GPUs of {args.gpu_memory_gb:g} GiB, margin {args.margin:.0%}, overhead {args.overhead_gb:g} GiB")
    own = config_layout(cfg, world)
    overhead = int(args.overhead_gb * GIB)
    print("GiB per GPU on the most loaded pipeline stage; rel.t = heuristic relative step time")
    print(_header())
    if own is not None:
        try:
            num_microbatches(job, own)
            print(_row(estimate(job, own, overhead)) + "   (the config's layout)")
        except ValueError as e:
            print(f"the config's layout {own.describe()}: {e}")
    candidates = rank_layouts(job, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.margin,
                              args.overhead_gb)
    for cand in [c for c in candidates if c.fits][:args.top]:
        print(_row(cand.estimate, cand.relative_time))
    best = best_layout(job, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.margin, args.overhead_gb)
    lay = best.layout
    print(f"\nsuggested: {lay.describe()}, {best.estimate.total / GIB:.1f} GiB of "
          f"{args.gpu_memory_gb * (1 - args.margin):.1f} usable")
    overrides = [f"parallel.tensor_model_parallel_size={lay.tp}", f"parallel.pipeline_model_parallel_size={lay.pp}",
                 f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()}",
                 f"data.micro_batch_size={lay.micro_batch_size}", f"train.recompute={str(lay.recompute).lower()}"]
    if job.kind == "prune":
        overrides = [f"--tp {lay.tp}", f"--pp {lay.pp}", f"--micro-batch-size {lay.micro_batch_size}"]
    print("  " + " ".join(overrides))
    return 0
