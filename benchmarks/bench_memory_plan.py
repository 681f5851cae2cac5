"""Measured peak GPU memory of real train / distill steps next to `minitron plan`'s estimate.

    torchrun --nproc-per-node 8 benchmarks/bench_memory_plan.py --job distill      # on an H100 node
    torchrun --nproc-per-node 1 benchmarks/bench_memory_plan.py --job train --layouts 1,1,1,0 1,1,2,0 1,1,1,1
    python benchmarks/bench_memory_plan.py --smoke                                  # CPU: structure only
    torchrun --nproc-per-node 1 benchmarks/bench_memory_plan.py --job train --qk-layernorm   # Qwen3's q/k norms

Each layout "TP,PP,MBS,RECOMPUTE" runs ``--iters`` steps of the real Trainer on synthetic tokens (bf16 on GPU)
and reports ``torch.cuda.max_memory_allocated`` (max over ranks) against the planner's estimate without the
runtime overhead term (the CUDA context and NCCL buffers are not allocations of the caching allocator). The
issue's goal (15, item 5) is agreement within 10%; on one GPU the default layouts are four (micro-batch 1 or 2, with or
without recompute). On CPU (--smoke) nothing is measured; the rows show the estimates.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist

from megatron_minitron import checkpoint
from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig
from megatron_minitron.distill.config import Distill, DistillConfig
from megatron_minitron.model.builder import build_gpt, resolve_dtype
from megatron_minitron.plan import Job, Layout, estimate
from megatron_minitron.plan.memory import GIB
from megatron_minitron.runtime.distributed import init_distributed
from megatron_minitron.train.loop import Trainer
from megatron_minitron.train.optim import steps_with_foreach_adam

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import release_memory  # noqa: E402


class SyntheticTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        t = self.tokens[i]
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(len(t) - 1),
                "position_ids": torch.arange(len(t) - 1)}


def archs(args):
    student = ModelArch(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                        num_attention_heads=args.heads, num_query_groups=args.groups, kv_channels=args.head_dim,
                        vocab_size=args.vocab, seq_length=args.seq, qk_layernorm=args.qk_layernorm)
    teacher = ModelArch(**{**student.__dict__, "hidden_size": args.hidden * 5 // 4,
                           "ffn_hidden_size": args.ffn * 5 // 4})
    return student, teacher


def save_initial(arch, path, dtype):
    """A checkpoint at TP1 PP1 (loadable at any layout) for the distillation teacher and student."""
    rt = init_distributed(1, 1)
    model = build_gpt(arch, Parallel(), dtype, device=rt.device)
    checkpoint.save_checkpoint_to(path, [model], arch=arch, parallel=Parallel())
    del model


def run_layout(args, layout, student, teacher, root, ds):
    tp, pp, mbs, recompute = layout
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gbs = args.global_batch
    par = Parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=tp > 1)
    train = Train(train_iters=args.iters, lr=1e-4, min_lr=1e-5, lr_warmup_iters=1, eval_iters=0, eval_interval=0,
                  recompute=bool(recompute), progress_bar=False, log_interval=1000,
                  precision="fp32" if args.smoke else "bf16")
    data = Data(micro_batch_size=mbs, global_batch_size=gbs)
    objective = None
    if args.job == "distill":
        from megatron_minitron.distill.job import prepare
        from megatron_minitron.distill.objective import KDObjective
        cfg = DistillConfig(model=student, parallel=par, data=data, train=train,
                            distill=Distill(teacher=os.path.join(root, "teacher"),
                                            student=os.path.join(root, "student")))
        teacher_arch = prepare(cfg)
        objective = KDObjective(cfg.distill, teacher_arch, cfg.distill.teacher)
    else:
        cfg = TrainConfig(model=student, parallel=par, data=data, train=train)
    release_memory()  # the previous layout's trainer sits in reference cycles: not in this layout's peak
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, objective=objective, datasets=(ds, None)).setup()
    trainer.run()
    measured = None
    if torch.cuda.is_available():
        peak = torch.tensor([torch.cuda.max_memory_allocated()], dtype=torch.float64, device="cuda")
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        measured = peak.item()
    dp = world // (tp * pp)
    kd_loss = "fused_linear" if objective is not None and objective.fused_output else "chunked"  # what ran
    job = Job(args.job, student, student.seq_length, gbs, teacher=teacher if args.job == "distill" else None,
              param_bytes=4 if args.smoke else 2, teacher_bytes=4 if args.smoke else 2, kd_loss=kd_loss,
              foreach_adam=steps_with_foreach_adam(train))
    est = estimate(job, Layout(tp=tp, pp=pp, dp=dp, micro_batch_size=mbs, recompute=bool(recompute),
                               sequence_parallel=tp > 1))
    del trainer
    return measured, est


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=("train", "distill"), default="train")
    p.add_argument("--layouts", nargs="*", default=None, help="TP,PP,MBS,RECOMPUTE entries")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (no measurement)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--qk-layernorm", action="store_true",
                   help="Qwen3's per-head q/k norms (checks the planner's term for their saved inputs)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.ffn, args.heads, args.groups, args.head_dim = 2, 32, 64, 4, 2, 8
        args.vocab, args.seq, args.global_batch, args.iters = 256, 16, 4, 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layouts = [tuple(int(x) for x in s.split(",")) for s in args.layouts] if args.layouts else \
        [(tp, pp, mbs, rc) for tp in (1, 2, 4, 8) for pp in (1, 2) for mbs in (1, 2) for rc in (0, 1)
         if world % (tp * pp) == 0 and args.global_batch % (mbs * (world // (tp * pp))) == 0]
    student, teacher = archs(args)
    dtype = resolve_dtype("fp32" if args.smoke else "bf16")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.environ.get("BENCH_DIR", tmp)
        if args.job == "distill":
            save_initial(teacher, os.path.join(root, "teacher"), dtype)
            save_initial(student, os.path.join(root, "student"), dtype)
        ds = SyntheticTokens(args.global_batch * (args.iters + 1), args.seq, args.vocab)
        rows = []
        for layout in layouts:
            measured, est = run_layout(args, layout, student, teacher, root, ds)
            rows.append((est.layout.describe(), measured, est))
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{args.job}: {student.num_parameters() / 1e6:.0f}M params, seq {args.seq}, vocab {args.vocab}")
            print(f"{'layout':<36} {'measured':>9} {'estimate':>9} {'est/meas':>9}  largest parts")
            for name, measured, est in rows:
                top = sorted(est.parts.items(), key=lambda kv: -kv[1])[:4]
                parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in top)
                if measured:
                    print(f"{name:<36} {measured / GIB:9.2f} {est.total / GIB:9.2f} {est.total / measured:9.2f}  {parts}")
                else:
                    print(f"{name:<36} {'-':>9} {est.total / 2**20:6.2f}MiB {'-':>9}  (no GPU: estimate only)")


if __name__ == "__main__":
    main()
