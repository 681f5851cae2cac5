"""The FP8 teacher and the fused KD loss inside real distillation runs (the product path: prepare ->
KDObjective -> Trainer), two measurements:

1. accuracy   KD loss (forward KL) of a trained student against a trained teacher on held-out real text
              (Python standard-library source, a tokenizer trained on it), teacher in bf16 vs FP8.
              Goal: within 1% of the bf16 teacher's. Both models are trained in this run on the GPU
              (teacher 12 x 768, student 6 x 512), so it needs no downloaded checkpoint.
2. step time  one co-located distillation step at Llama-3 vocabulary (V = 128256) and Llama-3.1-8B layer
              shapes (teacher: --layers layers of hidden 4096 / ffn 14336 / GQA 32/8; student: the
              Minitron width-pruned 3072 / 9216 / 32 heads), 8192 tokens, bf16 student, for
              teacher_precision bf16|fp8 x kd_loss_backend torch|triton. "without" = bf16 + torch,
              "with both" = fp8 + triton.

    python benchmarks/bench_fp8_distill.py                 # H100
    python benchmarks/bench_fp8_distill.py --smoke         # tiny, CPU: checks that it runs
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (RandomTokens, header, median_ms, peak_memory_gb, release_memory, reset_peak_memory,  # noqa: E402
                    time_steps)


def kd_trainer(teacher_dir, student_dir, data, train, precision, backend, datasets=None, fast_accum=False):
    from megatron_minitron.config import Parallel
    from megatron_minitron.distill.config import Distill, DistillConfig
    from megatron_minitron.distill.job import prepare
    from megatron_minitron.distill.objective import KDObjective
    from megatron_minitron.train.loop import Trainer

    cfg = DistillConfig(parallel=Parallel(), data=dataclasses.replace(data), train=dataclasses.replace(train),
                        distill=Distill(teacher=teacher_dir, student=student_dir, teacher_precision=precision,
                                        kd_loss_backend=backend, teacher_fp8_fast_accum=fast_accum))
    teacher_arch = prepare(cfg)
    return Trainer(cfg, objective=KDObjective(cfg.distill, teacher_arch, teacher_dir), datasets=datasets).setup()


def accuracy(args, tmp):
    """Train a teacher and a student on real text, then the KD loss with the teacher in bf16 vs FP8."""
    from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig
    from megatron_minitron.data import build_stdlib_corpus, preprocess
    from megatron_minitron.train.loop import Trainer

    vocab = 1024 if args.smoke else 8192
    prefix = os.path.join(tmp, "stdlib")
    corpus = build_stdlib_corpus(prefix + "_corpus", 400_000 if args.smoke else 8_000_000, 5.0)
    tokenizer = preprocess([corpus.train], prefix + "_train", None, train_vocab_size=vocab).tokenizer
    preprocess([corpus.valid], prefix + "_valid", tokenizer)
    data = Data(train_data=[prefix + "_train"], valid_data=[prefix + "_valid"], micro_batch_size=8,
                global_batch_size=32)
    if args.smoke:
        teacher = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2, vocab_size=vocab, seq_length=64)
        student = dataclasses.replace(teacher, num_layers=1, hidden_size=48, kv_channels=16)
        iters = (4, 2)
    else:
        teacher = ModelArch(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
                            num_query_groups=4, vocab_size=vocab, seq_length=512)
        student = ModelArch(num_layers=6, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                            num_query_groups=4, vocab_size=vocab, seq_length=512)
        iters = (args.teacher_iters, args.teacher_iters // 2)
    for name, arch, n in (("teacher", teacher, iters[0]), ("student", student, iters[1])):
        train = Train(train_iters=n, lr=2e-3, min_lr=2e-4, lr_warmup_iters=max(n // 20, 1), eval_iters=0,
                      eval_interval=0, save=os.path.join(tmp, name), progress_bar=False)
        Trainer(TrainConfig(model=arch, parallel=Parallel(), data=dataclasses.replace(data), train=train)).setup().run()
    evaluation = Train(train_iters=1, lr=1e-4, min_lr=1e-5, lr_warmup_iters=1, eval_iters=args.eval_iters,
                       eval_interval=0, progress_bar=False)
    losses = {}
    for name, precision, fast in (("bf16", "bf16", False), ("fp8", "fp8", False),
                                  ("fp8, fast accum", "fp8", True)):
        trainer = kd_trainer(os.path.join(tmp, "teacher"), os.path.join(tmp, "student"), data, evaluation,
                             precision, "auto", fast_accum=fast)
        losses[name] = trainer.evaluate()["val_kd_loss"]
        del trainer
        release_memory()
    tokens = args.eval_iters * data.micro_batch_size * teacher.seq_length
    print(header(f"bench_fp8_distill accuracy: teacher {teacher.num_parameters() / 1e6:.0f}M "
                 f"({iters[0]} iterations), student {student.num_parameters() / 1e6:.0f}M ({iters[1]}), "
                 f"{tokens:,} held-out tokens of standard-library source"))
    print("| teacher precision | KD loss (forward KL, per token) |\n|---|---|")
    for precision, value in losses.items():
        print(f"| {precision} | {value:.5f} |")
    for name in ("fp8", "fp8, fast accum"):
        print(f"\n{name} vs bf16 teacher: {(losses[name] - losses['bf16']) / losses['bf16']:+.3%} "
              f"(goal: within 1%)", flush=True)


def step_time(args, tmp):
    """One KD step at Llama shapes: bf16/FP8 teacher x torch/Triton KD loss."""
    from megatron_minitron import checkpoint
    from megatron_minitron.config import Data, ModelArch, Parallel, Train
    from megatron_minitron.model.builder import build_gpt, resolve_dtype
    from megatron_minitron.runtime.distributed import init_distributed

    if args.smoke:
        teacher = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2, vocab_size=512, seq_length=64)
        student = dataclasses.replace(teacher, hidden_size=48, ffn_hidden_size=96, kv_channels=16)
        iters, warmup = 2, 1
    else:
        teacher = ModelArch(num_layers=args.layers, hidden_size=4096, ffn_hidden_size=14336,
                            num_attention_heads=32, num_query_groups=8, kv_channels=128, vocab_size=128256,
                            seq_length=args.seq_length, rotary_base=500000.0)
        student = dataclasses.replace(teacher, hidden_size=3072, ffn_hidden_size=9216)
        iters, warmup = args.iters, args.warmup
    rt = init_distributed(1, 1)
    dtype = resolve_dtype("auto")
    for name, arch in (("big_teacher", teacher), ("big_student", student)):
        checkpoint.save_checkpoint_to(os.path.join(tmp, name), [build_gpt(arch, Parallel(), dtype,
                                                                          device=rt.device)], arch=arch)
        reset_peak_memory()  # frees the cached blocks of the model just saved
    data = RandomTokens((iters + warmup + 2), teacher.seq_length, teacher.vocab_size)
    batch = Data(micro_batch_size=1, global_batch_size=1)
    train = Train(train_iters=1000, lr=1e-5, min_lr=1e-6, lr_warmup_iters=1, eval_iters=0, eval_interval=0,
                  progress_bar=False)
    rows = []
    for precision, backend, fast in (("bf16", "torch", False), ("bf16", "triton", False), ("fp8", "torch", False),
                                     ("fp8", "triton", False), ("fp8", "triton", True)):
        if args.smoke and (backend == "triton" or fast):
            continue  # the Triton loss needs a GPU (or the slow interpreter, which the unit tests use)
        trainer = kd_trainer(os.path.join(tmp, "big_teacher"), os.path.join(tmp, "big_student"), batch, train,
                             precision, backend, datasets=(data, None), fast_accum=fast)
        it = trainer._batches(data, 0)
        reset_peak_memory()
        times = time_steps(lambda: trainer.train_step(it), warmup, iters)
        rows.append((precision + (", fast accum" if fast else ""), backend, median_ms(times), peak_memory_gb()))
        del trainer, it
        release_memory()  # the trainer holds reference cycles: free its memory before the next variant's peak
        reset_peak_memory()
    print(header(f"bench_fp8_distill step: teacher {teacher.num_parameters() / 1e9:.2f}B "
                 f"({teacher.num_layers} Llama-3.1-8B layers, V={teacher.vocab_size}), student "
                 f"{student.num_parameters() / 1e9:.2f}B, {teacher.seq_length} tokens per step"))
    print("| teacher | KD loss | ms/step | speed-up | peak GB |\n|---|---|---|---|---|")
    base = rows[0][2]
    for precision, backend, ms, gb in rows:
        print(f"| {precision} | {backend} | {ms:.1f} | {base / ms:.2f}x | {gb:.1f} |")


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that it runs, times nothing")
    p.add_argument("--parts", default="accuracy,step")
    p.add_argument("--teacher-iters", type=int, default=600)
    p.add_argument("--eval-iters", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_fp8_distill_")
    if "accuracy" in args.parts:
        accuracy(args, tmp)
    if "step" in args.parts:
        step_time(args, tmp)


if __name__ == "__main__":
    main()
