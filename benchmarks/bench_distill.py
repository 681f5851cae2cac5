"""Co-located distillation step vs its parts, same run (issue goal: KD step <= 1.10 x (student training step +
teacher forward)); peak memory of teacher + student.

    python benchmarks/bench_distill.py            # teacher ~886M (16 x 2048, GQA 16/8), student ~half, seq 2048
    python benchmarks/bench_distill.py --smoke    # tiny, CPU
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (RandomTokens, header, timing_args, median_ms, peak_memory_gb, release_memory,  # noqa: E402
                    reset_peak_memory, time_steps)


def main():
    p = timing_args(micro_batch_size=2)
    args = p.parse_args()

    import torch

    from megatron_minitron import checkpoint
    from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig
    from megatron_minitron.distill.config import Distill, DistillConfig
    from megatron_minitron.distill.job import prepare
    from megatron_minitron.distill.objective import KDObjective
    from megatron_minitron.model.builder import build_gpt, resolve_dtype
    from megatron_minitron.runtime.distributed import init_distributed
    from megatron_minitron.train.loop import Trainer

    if args.smoke:
        teacher = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2, vocab_size=512, seq_length=64)
        student = ModelArch(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, kv_channels=16, vocab_size=512, seq_length=64)
        mbs, iters, warmup = 2, 2, 1
    else:
        teacher = ModelArch(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                            num_query_groups=8, vocab_size=32000, seq_length=2048)
        student = ModelArch(num_layers=12, hidden_size=1536, ffn_hidden_size=4096, num_attention_heads=16,
                            num_query_groups=8, kv_channels=128, vocab_size=32000, seq_length=2048)
        mbs, iters, warmup = args.micro_batch_size, args.iters, args.warmup
    data = RandomTokens(mbs * (iters + warmup + 2) * 3, teacher.seq_length, teacher.vocab_size)
    rt = init_distributed(1, 1)
    dtype = resolve_dtype("auto")
    tmp = tempfile.mkdtemp(prefix="bench_distill_")
    for name, arch in (("teacher", teacher), ("student", student)):
        checkpoint.save_checkpoint_to(os.path.join(tmp, name), [build_gpt(arch, Parallel(), dtype,
                                                                          device=rt.device)], arch=arch)
    train = Train(train_iters=1000, lr=1e-4, min_lr=1e-5, lr_warmup_iters=1, eval_iters=0, eval_interval=0,
                  progress_bar=False)
    batch = Data(micro_batch_size=mbs, global_batch_size=mbs)

    # 1. the co-located distillation step
    import dataclasses
    cfg = DistillConfig(parallel=Parallel(), data=batch, train=dataclasses.replace(train),
                        distill=Distill(teacher=os.path.join(tmp, "teacher"), student=os.path.join(tmp, "student")))
    teacher_arch = prepare(cfg)
    kd = Trainer(cfg, objective=KDObjective(cfg.distill, teacher_arch, cfg.distill.teacher),
                 datasets=(data, None)).setup()
    it = kd._batches(data, 0)
    reset_peak_memory()
    kd_times = time_steps(lambda: kd.train_step(it), warmup, iters)
    kd_peak = peak_memory_gb()
    del kd
    release_memory()  # before the student alone is built: the KD trainer is held in reference cycles

    # 2. the student's plain training step, 3. the teacher's forward, each alone
    student_trainer = Trainer(TrainConfig(model=student, parallel=Parallel(), data=batch, train=train),
                              datasets=(data, None)).setup()
    it = student_trainer._batches(data, 0)
    student_times = time_steps(lambda: student_trainer.train_step(it), warmup, iters)
    del student_trainer
    release_memory()
    teacher_trainer = Trainer(TrainConfig(model=teacher, parallel=Parallel(), data=batch, train=train),
                              datasets=(data, None)).setup()
    it = teacher_trainer._batches(data, 0)
    teacher_trainer.model[0].eval()

    def teacher_forward():
        with torch.no_grad():
            teacher_trainer._forward_backward(it, forward_only=True)
    teacher_times = time_steps(teacher_forward, warmup, iters)

    kd_ms, s_ms, t_ms = median_ms(kd_times), median_ms(student_times), median_ms(teacher_times)
    print(header(f"bench_distill: teacher {teacher.num_parameters() / 1e6:.0f}M, student "
                 f"{student.num_parameters() / 1e6:.0f}M, seq {teacher.seq_length}, micro-batch {mbs}"))
    print("| what | ms/step |\n|---|---|")
    print(f"| co-located KD step (teacher fwd + student fwd/bwd + KD loss) | {kd_ms:.1f} |")
    print(f"| student training step alone | {s_ms:.1f} |")
    print(f"| teacher forward alone | {t_ms:.1f} |")
    print(f"\nKD step / (student step + teacher forward) = {kd_ms / (s_ms + t_ms):.3f} (goal <= 1.10); "
          f"peak memory of the KD run {kd_peak:.1f} GB")


if __name__ == "__main__":
    main()
