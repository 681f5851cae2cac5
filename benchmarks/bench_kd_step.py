"""The headline number (issue 15 item 8): one full co-located KD step at Llama-3.1-8B -> Llama-3.1-Minitron-4B-Width
shapes on one GPU: random weights, seq 8192, micro-batch 1, the bf16 student with its Adam optimizer, a bf16 or
FP8 teacher. Reported as tokens/s and as MFU over teacher forward + student forward/backward (the count the
training loop logs: train/progress.py's forward_flops_per_token, 2 FLOPs per matmul weight plus causal
attention; dense bf16 peak 989 TFLOP/s for H100/H200). Anchor: ModelOpt's published 9B -> 7B distillation ran
~2.9k tokens/s per H100, ~23% MFU by the same count. Goal: >= 40%.

The planner's estimate for the same job and layout is printed next to the measured peak (issue 15 item 5).

    python benchmarks/bench_kd_step.py                            # bf16 teacher, KD fused with the output layers
    python benchmarks/bench_kd_step.py --teacher-precision fp8 --teacher-fp8-fast-accum
    python benchmarks/bench_kd_step.py --fused-kernels --fused-adam   # the opt-in student kernels and Adam
    python benchmarks/bench_kd_step.py --kd-loss-backend triton   # logits + the Triton KL kernel (more memory)
    python benchmarks/bench_kd_step.py --smoke                    # tiny sizes on CPU: checks that it runs

No checkpoint is written: the teacher is built uninitialised and filled with N(0, 0.02) on the GPU (its speed
does not depend on the values); the student gets the training loop's ordinary initialisation.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RandomTokens, breakdown_table, header, median_ms, peak_memory_gb, profile_step, \
    reset_peak_memory, time_steps, timing_args  # noqa: E402

ANCHOR = "ModelOpt 9B -> 7B: ~2.9k tokens/s per H100, ~23% MFU"


def shapes(smoke: bool, seq: int, teacher_layers: int):
    from megatron_minitron.config import ModelArch

    if smoke:
        teacher = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2, vocab_size=512, seq_length=64)
        student = ModelArch(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4,
                            num_query_groups=2, kv_channels=16, vocab_size=512, seq_length=64)
        return teacher, student
    llama = dict(num_attention_heads=32, num_query_groups=8, kv_channels=128, vocab_size=128256, seq_length=seq,
                 rotary_base=500000, rope_scaling=True, rope_scaling_factor=8.0)
    teacher = ModelArch(num_layers=teacher_layers, hidden_size=4096, ffn_hidden_size=14336, **llama)  # 3.1-8B
    student = ModelArch(num_layers=32, hidden_size=3072, ffn_hidden_size=9216, **llama)  # Minitron-4B-Width
    return teacher, student


def random_teacher_objective(distill, teacher_arch):
    """KDObjective whose teacher weights are drawn on the device instead of read from a checkpoint."""
    import torch

    from megatron_minitron.distill.objective import KDObjective

    class RandomTeacherKD(KDObjective):
        def set_teacher_weights(self, teacher) -> None:
            g = torch.Generator(device=next(teacher.parameters()).device).manual_seed(0)
            with torch.no_grad():
                for name, p in teacher.named_parameters():
                    if name.endswith("weight") and p.dim() == 1:  # norms
                        p.fill_(1.0)
                    elif p.dim() == 1:
                        p.zero_()
                    else:
                        p.normal_(0.0, 0.02, generator=g)

    return RandomTeacherKD(distill, teacher_arch, teacher_path="(random weights)")


def main():
    p = timing_args(micro_batch_size=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--teacher-layers", type=int, default=32, help="Llama-3.1-8B has 32")
    p.add_argument("--teacher-precision", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--teacher-fp8-fast-accum", action="store_true")
    p.add_argument("--kd-loss-backend", default="fused_linear", help="distill.kd_loss_backend")
    p.add_argument("--recompute", action="store_true", help="train.recompute (full, uniform, 1 layer)")
    p.add_argument("--fused-kernels", action="store_true", help="train.fused_kernels")
    p.add_argument("--fused-adam", action="store_true", help="train.fused_adam")
    p.set_defaults(iters=5, warmup=2)
    args = p.parse_args()

    import torch

    from megatron_minitron.config import Data, Parallel, Train, TrainConfig
    from megatron_minitron.distill.config import Distill
    from megatron_minitron.plan import Job, Layout, estimate
    from megatron_minitron.plan.memory import GIB
    from megatron_minitron.train.loop import Trainer
    from megatron_minitron.train.optim import steps_with_foreach_adam
    from megatron_minitron.train.progress import forward_flops_per_token, peak_flops, training_flops_per_token

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no GPU: this benchmark times a GPU step; use --smoke to check that it runs")
    teacher, student = shapes(args.smoke, args.seq, args.teacher_layers)
    mbs = args.micro_batch_size
    iters, warmup = (1, 1) if args.smoke else (args.iters, args.warmup)
    distill = Distill(teacher="(random weights)", kd_loss_backend=args.kd_loss_backend,
                      teacher_precision=args.teacher_precision, teacher_fp8_fast_accum=args.teacher_fp8_fast_accum)
    distill.validate()
    train = Train(train_iters=1000, lr=1e-4, min_lr=1e-5, lr_warmup_iters=1, eval_iters=0, eval_interval=0,
                  progress_bar=False, recompute=args.recompute, fused_kernels=args.fused_kernels,
                  fused_adam=args.fused_adam)
    cfg = TrainConfig(model=student, parallel=Parallel(), data=Data(micro_batch_size=mbs, global_batch_size=mbs),
                      train=train)
    data = RandomTokens(mbs * (iters + warmup + 2), student.seq_length, student.vocab_size)
    kd = Trainer(cfg, objective=random_teacher_objective(distill, teacher), datasets=(data, None)).setup()
    it = kd._batches(data, 0)
    reset_peak_memory()
    times = time_steps(lambda: kd.train_step(it), warmup, iters)
    peak_gb = peak_memory_gb()
    kernels, breakdown = profile_step(lambda: kd.train_step(it))  # after the peak: the profiler holds memory

    ms = median_ms(times)
    tokens = mbs * student.seq_length
    flops = (training_flops_per_token(student) + forward_flops_per_token(teacher, student.seq_length)) * tokens
    device = kd.rt.device
    peak = peak_flops(device)
    mfu = flops / (ms / 1e3) / peak if peak else float("nan")
    planned = estimate(Job("distill", student, student.seq_length, mbs, teacher=teacher,
                           param_bytes=4 if args.smoke else 2,
                           teacher_bytes=1 if args.teacher_precision == "fp8" else (4 if args.smoke else 2),
                           kd_loss="fused_linear" if kd.objective.fused_output else "chunked",
                           foreach_adam=steps_with_foreach_adam(train)),
                       Layout(tp=1, pp=1, dp=1, micro_batch_size=mbs, recompute=args.recompute))
    teacher_desc = f"{args.teacher_precision}" + (" fast-accum" if args.teacher_fp8_fast_accum else "")
    print(header(f"bench_kd_step: teacher {teacher.num_parameters() / 1e9:.2f}B ({teacher.num_layers} layers, "
                 f"{teacher_desc}) -> student {student.num_parameters() / 1e9:.2f}B, seq {student.seq_length}, "
                 f"micro-batch {mbs}, kd_loss_backend={args.kd_loss_backend}, recompute={args.recompute}, "
                 f"fused_kernels={args.fused_kernels}, fused_adam={args.fused_adam}"))
    print("| step ms (median of %d) | tokens/s | MFU (teacher fwd + student fwd/bwd) | peak GiB | planned GiB |"
          % iters)
    print("|---|---|---|---|---|")
    print(f"| {ms:.1f} | {tokens / (ms / 1e3):,.0f} | {mfu:.1%} | {peak_gb:.1f} | "
          f"{planned.total / GIB:.1f} |")
    print(f"\nFLOPs per step {flops / 1e12:.1f} TFLOP; SDPA kernels: {kernels}; anchor: {ANCHOR}; goal >= 40% MFU")
    if breakdown:
        print("\n" + breakdown_table([("KD step", breakdown)]))


if __name__ == "__main__":
    main()
