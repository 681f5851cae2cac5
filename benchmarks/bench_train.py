"""Training throughput of the foundation's GPT: SDPA core attention vs megatron's unfused local attention,
same model, same run (issue: >= 2x the local-spec throughput; baseline on one H100 measured earlier:
27.4k tok/s, 22% MFU, 48 GB for this shape at micro-batch 4).

    python benchmarks/bench_train.py             # ~886M GPT: 16 layers, hidden 2048, GQA 16/8, seq 2048, bf16
    python benchmarks/bench_train.py --smoke     # tiny, CPU, checks that it runs
    python benchmarks/bench_train.py --fused-kernels --backends sdpa   # train.fused_kernels off vs on (GPU)

--fused-kernels runs every backend twice in the same process, train.fused_kernels false then true (RMSNorm
through kernels/rmsnorm_triton.py); the "fused norms" column counts the norms that really took the fused
path, which is none on CPU (the builder keeps the torch path there), so on CPU only --smoke runs it.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (RandomTokens, header, timing_args, median_ms, peak_memory_gb, reset_peak_memory,  # noqa: E402
                    time_steps)


def main():
    p = timing_args(micro_batch_size=4)
    p.add_argument("--backends", default="unfused,sdpa")
    p.add_argument("--fused-kernels", action="store_true",
                   help="time each backend with train.fused_kernels off and on (needs a GPU, or --smoke)")
    args = p.parse_args()
    import torch

    if args.fused_kernels and not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_train --fused-kernels times Triton kernels and needs a CUDA GPU; "
                 "on CPU run it with --smoke (checks that both variants run; the fused one falls back to torch)")

    from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig
    from megatron_minitron.train.loop import Trainer
    from megatron_minitron.model.layers import FusedRMSNorm
    from megatron_minitron.train.progress import peak_flops, training_flops_per_token

    if args.smoke:
        arch = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         num_query_groups=2, vocab_size=512, seq_length=64)
        mbs, iters, warmup = 2, 2, 1
    else:
        arch = ModelArch(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                         num_query_groups=8, vocab_size=32000, seq_length=2048)
        mbs, iters, warmup = args.micro_batch_size, args.iters, args.warmup
    tokens_per_step = mbs * arch.seq_length
    data = RandomTokens(mbs * (iters + warmup + 2), arch.seq_length, arch.vocab_size)
    rows = []
    variants = [(backend, fused) for backend in args.backends.split(",")
                for fused in ((False, True) if args.fused_kernels else (False,))]
    for backend, fused in variants:
        cfg = TrainConfig(model=arch, parallel=Parallel(),
                          data=Data(micro_batch_size=mbs, global_batch_size=mbs),
                          train=Train(train_iters=iters + warmup, lr=1e-4, min_lr=1e-5, lr_warmup_iters=1,
                                      eval_iters=0, eval_interval=0, attention_backend=backend,
                                      fused_kernels=fused, progress_bar=False))
        trainer = Trainer(cfg, datasets=(data, None)).setup()
        fused_norms = sum(isinstance(m, FusedRMSNorm) for m in trainer.model[0].modules())
        batches = trainer._batches(data, 0)
        reset_peak_memory()
        times = time_steps(lambda: trainer.train_step(batches), warmup, iters)
        seconds = median_ms(times) / 1000
        tok_s = tokens_per_step / seconds
        peak = peak_flops(trainer.rt.device)
        mfu = training_flops_per_token(arch) * tok_s / peak if peak else float("nan")
        label = f"{backend}, fused_kernels={str(fused).lower()}" if args.fused_kernels else backend
        rows.append((label, fused_norms, median_ms(times), tok_s, mfu, peak_memory_gb()))
        del trainer
    print(header(f"bench_train: GPT {arch.num_parameters() / 1e6:.0f}M, seq {arch.seq_length}, "
                 f"micro-batch {mbs}"))
    print("| variant | fused norms | ms/step | tokens/s | MFU | peak GB |\n|---|---|---|---|---|---|")
    for label, fused_norms, ms, tok_s, mfu, gb in rows:
        print(f"| {label} | {fused_norms} | {ms:.1f} | {tok_s:,.0f} | {mfu:.1%} | {gb:.1f} |")
    pairs = list(zip(rows[::2], rows[1::2])) if args.fused_kernels else [tuple(rows)] if len(rows) == 2 else []
    for before, after in pairs:
        print(f"\nspeed-up {before[0]} -> {after[0]}: {before[2] / after[2]:.2f}x")


if __name__ == "__main__":
    main()
