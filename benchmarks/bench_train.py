"""Training throughput of the foundation's GPT: SDPA core attention vs megatron's unfused local attention,
same model, same run (issue: >= 2x the local-spec throughput; baseline on one H100 measured earlier:
27.4k tok/s, 22% MFU, 48 GB for this shape at micro-batch 4), and the ways to speed up the layer without
Transformer Engine, each timed against the plain step of the same backend in the same process.

    python benchmarks/bench_train.py             # ~886M GPT: 16 layers, hidden 2048, GQA 16/8, seq 2048, bf16
    python benchmarks/bench_train.py --smoke     # tiny, CPU, checks that it runs
    python benchmarks/bench_train.py --backends sdpa --fused-kernels --compile --liger   # all variants (GPU)
    python benchmarks/bench_train.py --shape llama8b --backends sdpa --fused-kernels  # Llama-3.1-8B layers

Shapes: ``886m`` (the default above) and ``llama8b``: Llama-3.1-8B's layer (hidden 4096, FFN 14336, GQA 32/8,
RoPE theta 500000), its vocabulary (128256) and seq 8192 at micro-batch 1, with ``--layers`` of them (default 8:
the whole 32 with optimizer states do not fit one GPU; the output layer's share of the FLOPs grows as layers
drop). The "attention" column names the SDPA kernels that ran (profiler op names: cudnn, flash, efficient,
math), so a slow row shows whether attention was fused; on a GPU a second table splits one profiled step's
kernel time into GEMM, attention, our Triton kernels, optimizer, copies, reductions and elementwise.

Variants (each flag adds rows; the plain step of every backend always runs first):
  --fused-kernels  train.fused_kernels=true: RMSNorm, RoPE and SwiGLU through our Triton kernels
                   (kernels/rmsnorm_triton.py, rope_triton.py, swiglu_triton.py); also a row with megatron's own
                   fused SwiGLU (config.bias_activation_fusion: its torch.compile'd ``bias_swiglu_impl``) and a
                   table of each kernel alone (forward + backward) against the torch path it replaces.
  --compile        torch.compile of each transformer layer (``nn.Module.compile``), torch path inside. megatron's
                   RowParallelLinear (linear_proj, fc2) calls its GEMM with tp_group=None, whose lookup warns on
                   every call (megatron/core/utils.py, get_tensor_model_parallel_group_if_none); dynamo cannot
                   trace the warning, so each layer's graph breaks there (TORCH_LOGS=graph_breaks shows them).
  --fused-adam     train.fused_adam: torch's fused Adam (one kernel per group) instead of the foreach Adam megatron uses when
                   neither Apex nor TE is installed (the optimizer step is memory-bound: ~28 bytes per parameter)
  --liger          liger-kernel's RMSNorm (fp32 "gemma" casting, like ours) and fused gate-up SwiGLU in the same
                   modules (needs ``liger_kernel`` importable: ``pip install --no-deps liger-kernel``, pure Python).
                   Not its RoPE: Liger's kernel takes HF's q/k layout ([b, heads, s, d] viewing [b, s, heads, d]
                   storage) with [s, d] cos/sin and rotates q and k together, so megatron's [s, b, heads, d] would
                   need a transposed copy of q and k each way; megatron's RoPE runs in that row.
The "modules" column counts the modules that really took each path. On CPU (--smoke) the builder keeps the torch
path for --fused-kernels (no fused modules are counted) and --liger refuses (Liger's kernels need CUDA: they do
not run under Triton's interpreter); the kernel table runs our kernels on CPU only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (RandomTokens, breakdown_table, header, timed_median_ms, timing_args, median_ms,  # noqa: E402
                    peak_memory_gb, profile_step, release_memory, reset_peak_memory, time_steps)


def liger_modules():
    """(RMSNorm class, MLP class) running Liger's kernels in our Norm / megatron's MLP (same parameters)."""
    from liger_kernel.ops import LigerFusedGateUpSiLUMulFunction, LigerRMSNormFunction

    from megatron_minitron.model.layers import Norm
    from megatron_minitron.model.mlp import FusedSwiGLUMLP

    class LigerRMSNorm(Norm):
        def forward(self, x):
            if self.kind != "RMSNorm":
                return super().forward(x)
            offset = 1.0 if self.zero_centered_gamma else 0.0  # Liger's offset is our zero-centred gamma's +1
            return LigerRMSNormFunction.apply(x, self.weight, self.eps, offset, "gemma", False)

    class LigerSwiGLUMLP(FusedSwiGLUMLP):
        def swiglu(self, intermediate):
            rows = intermediate.reshape(-1, intermediate.shape[-1])  # its backward returns the 2-D shape
            return LigerFusedGateUpSiLUMulFunction.apply(rows).view(*intermediate.shape[:-1], -1)

    return LigerRMSNorm, LigerSwiGLUMLP


def prepare_variant(variant: str, trainer) -> str:
    """Turn the built (plain or train.fused_kernels) model into ``variant``; say which modules took its path."""
    from megatron.core.transformer.mlp import MLP

    from megatron_minitron.model.attention import FusedRoPESelfAttention
    from megatron_minitron.model.layers import FusedRMSNorm, Norm
    from megatron_minitron.model.mlp import FusedSwiGLUMLP, swiglu_kernel_covers

    model = trainer.unwrapped()[0]
    if variant == "fused adam":  # built with train.fused_adam=true
        from megatron_minitron.train.optim import fused_adam_in_use

        return f"torch Adam fused: {fused_adam_in_use(trainer.optimizer)}"
    modules = list(model.modules())

    def count(cls):
        return sum(isinstance(m, cls) for m in modules)

    if variant == "fused kernels":
        return (f"RMSNorm {count(FusedRMSNorm)}, RoPE {count(FusedRoPESelfAttention)}, "
                f"SwiGLU {count(FusedSwiGLUMLP)}")
    if variant == "megatron fused swiglu":
        model.config.bias_activation_fusion = True  # read by MLP.forward at every call
        return f"bias_swiglu_impl {sum(type(m) is MLP and m.config.gated_linear_unit for m in modules)}"
    if variant == "compile":
        for layer in model.decoder.layers:
            layer.compile()
        return f"{len(model.decoder.layers)} layers compiled"
    if variant == "liger":
        liger_norm, liger_mlp = liger_modules()
        for m in modules:
            if type(m) is Norm and m.kind == "RMSNorm":
                m.__class__ = liger_norm
            elif type(m) is MLP and swiglu_kernel_covers(m.config):
                m.__class__ = liger_mlp
        return f"RMSNorm {count(liger_norm)}, SwiGLU {count(liger_mlp)}"
    return "-"


def kernel_rows(arch, mbs, dtype, device, with_liger, iters, warmup):
    """(kernel, implementation, ms fwd+bwd) for each of the three kernels alone at this model's shapes."""
    import torch
    import torch.nn.functional as F
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    ours_runs = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    s, h, d, ffn = arch.seq_length, arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    rot = int(d * arch.rotary_percent)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s, mbs, h, device=device, generator=g).to(dtype).requires_grad_(True)
    weight = torch.ones(h, device=device, dtype=dtype, requires_grad=True)
    q = torch.randn(s, mbs, arch.num_attention_heads, d, device=device, generator=g).to(dtype).requires_grad_(True)
    freqs = torch.randn(s, 1, 1, rot, device=device, generator=g)
    y = torch.randn(s, mbs, 2 * ffn, device=device, generator=g).to(dtype).requires_grad_(True)

    def swiglu_torch(t):
        gate, up = torch.chunk(t, 2, dim=-1)
        return F.silu(gate) * up

    impls = {
        "RMSNorm": (x, [("torch F.rms_norm", lambda t: F.rms_norm(t, (h,), weight, arch.norm_epsilon))]),
        "RoPE (q of one layer)": (q, [("megatron unfused", lambda t: _apply_rotary_pos_emb_bshd(t, freqs))]),
        "SwiGLU": (y, [("torch chunk + silu * up", swiglu_torch),
                       ("megatron bias_swiglu_impl", lambda t: bias_swiglu_impl(t, None))]),
    }
    if ours_runs:
        from megatron_minitron.kernels.rmsnorm_triton import triton_rms_norm
        from megatron_minitron.kernels.rope_triton import triton_apply_rotary_pos_emb
        from megatron_minitron.kernels.swiglu_triton import triton_swiglu

        impls["RMSNorm"][1].append(("ours", lambda t: triton_rms_norm(t, weight, arch.norm_epsilon)))
        impls["RoPE (q of one layer)"][1].append(("ours", lambda t: triton_apply_rotary_pos_emb(t, freqs)))
        impls["SwiGLU"][1].append(("ours", triton_swiglu))
    if with_liger:
        from liger_kernel.ops import LigerFusedGateUpSiLUMulFunction, LigerRMSNormFunction

        impls["RMSNorm"][1].append(("liger", lambda t: LigerRMSNormFunction.apply(t, weight, arch.norm_epsilon, 0.0,
                                                                                    "gemma", False)))
        impls["SwiGLU"][1].append(("liger", lambda t: LigerFusedGateUpSiLUMulFunction.apply(t.view(-1, 2 * ffn))))
    rows = []
    for kernel, (inp, fns) in impls.items():
        for name, fn in fns:
            upstream = torch.randn(fn(inp.detach()).shape, device=device, generator=g).to(dtype)

            def step(fn=fn, inp=inp, upstream=upstream):
                inp.grad = weight.grad = None  # each call writes fresh grads (no accumulation in the timing)
                fn(inp).backward(upstream)
            rows.append((kernel, name, timed_median_ms(step, iters, warmup)))
    if not ours_runs:
        rows.append(("all", "ours (not run: CPU without TRITON_INTERPRET=1)", float("nan")))
    return rows


def main():
    p = timing_args(micro_batch_size=4)
    p.add_argument("--backends", default="unfused,sdpa")
    p.add_argument("--shape", choices=("886m", "llama8b"), default="886m",
                   help="886m: the 886M GPT; llama8b: Llama-3.1-8B layers, vocabulary and seq 8192 (micro-batch 1)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: 16 for 886m, 8 for llama8b)")
    p.add_argument("--fused-kernels", action="store_true",
                   help="also time train.fused_kernels=true, megatron's fused SwiGLU, and each kernel alone")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of each transformer layer")
    p.add_argument("--liger", action="store_true", help="also time liger-kernel's RMSNorm and SwiGLU (GPU)")
    p.add_argument("--fused-adam", action="store_true",
                   help="also time torch's fused Adam in place of the foreach one megatron falls back to")
    args = p.parse_args()
    import torch

    on_gpu = torch.cuda.is_available()
    if args.fused_kernels and not args.smoke and not on_gpu:
        sys.exit("bench_train --fused-kernels times Triton kernels and needs a CUDA GPU; "
                 "on CPU run it with --smoke (checks that the variants run; the fused one falls back to torch)")
    if args.liger:
        try:
            import liger_kernel.ops  # noqa: F401
        except ImportError as exc:
            sys.exit(f"bench_train --liger: liger_kernel does not import ({exc}); "
                     "`pip install --no-deps liger-kernel` (pure Python), or drop --liger")
        if not on_gpu:
            sys.exit("bench_train --liger needs a CUDA GPU: Liger's Triton kernels do not run on CPU, not even "
                     "under TRITON_INTERPRET=1; drop --liger for the CPU smoke run")

    from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig
    from megatron_minitron.train.loop import Trainer
    from megatron_minitron.train.progress import peak_flops, training_flops_per_token

    if args.smoke:
        arch = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         num_query_groups=2, vocab_size=512, seq_length=64)
        mbs, iters, warmup = 2, 2, 1
    elif args.shape == "llama8b":
        arch = ModelArch(num_layers=args.layers or 8, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                         num_query_groups=8, vocab_size=128256, seq_length=8192, rotary_base=500000.0)
        mbs, iters, warmup = 1, args.iters, args.warmup
    else:
        arch = ModelArch(num_layers=args.layers or 16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                         num_query_groups=8, vocab_size=32000, seq_length=2048)
        mbs, iters, warmup = args.micro_batch_size, args.iters, args.warmup
    extra = ((["fused kernels", "megatron fused swiglu"] if args.fused_kernels else [])
             + (["compile"] if args.compile else []) + (["liger"] if args.liger else [])
             + (["fused adam"] if args.fused_adam else []))
    tokens_per_step = mbs * arch.seq_length
    data = RandomTokens(mbs * (iters + warmup + 2), arch.seq_length, arch.vocab_size)
    rows, breakdowns = [], []
    shape = "smoke" if args.smoke else args.shape
    # the header and each row as soon as it is measured: a run stopped by its time limit keeps what it measured
    print(header(f"bench_train: GPT {arch.num_parameters() / 1e6:.0f}M ({shape} shape, {arch.num_layers} "
                 f"layers), seq {arch.seq_length}, micro-batch {mbs}"))
    print("| backend | variant | modules | attention | ms/step | tokens/s | MFU | peak GB |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for backend in args.backends.split(","):
        for variant in ["plain"] + extra:
            cfg = TrainConfig(model=arch, parallel=Parallel(),
                              data=Data(micro_batch_size=mbs, global_batch_size=mbs),
                              train=Train(train_iters=iters + warmup, lr=1e-4, min_lr=1e-5, lr_warmup_iters=1,
                                          eval_iters=0, eval_interval=0, attention_backend=backend,
                                          fused_kernels=variant == "fused kernels",
                                          fused_adam=variant == "fused adam", progress_bar=False))
            trainer = Trainer(cfg, datasets=(data, None)).setup()
            modules = prepare_variant(variant, trainer)
            batches = trainer._batches(data, 0)
            reset_peak_memory()
            times = time_steps(lambda: trainer.train_step(batches), warmup, iters)
            seconds = median_ms(times) / 1000
            tok_s = tokens_per_step / seconds
            peak = peak_flops(trainer.rt.device)
            mfu = training_flops_per_token(arch) * tok_s / peak if peak else float("nan")
            peak_gb = peak_memory_gb()
            kernels, breakdown = profile_step(lambda: trainer.train_step(batches))
            breakdowns.append((f"{backend} {variant}", breakdown))
            rows.append((backend, variant, modules, kernels, median_ms(times), tok_s, mfu, peak_gb))
            print(f"| {backend} | {variant} | {modules} | {kernels} | {median_ms(times):.1f} | {tok_s:,.0f} | "
                  f"{mfu:.1%} | {peak_gb:.1f} |", flush=True)
            device, dtype = trainer.rt.device, trainer.dtype
            del trainer
            release_memory()  # else this variant's model and optimizer may still be allocated when the next builds
    plain = {backend: ms for backend, variant, _, _, ms, *_ in rows if variant == "plain"}
    table = breakdown_table(breakdowns)
    if table:
        print(f"\nWhere one profiled step's GPU time went (benchmarks/common.py KERNEL_CATEGORIES):\n\n{table}")
    print()
    for backend, variant, _, _, ms, *_ in rows:
        if variant != "plain":
            print(f"speed-up {backend}: plain -> {variant}: {plain[backend] / ms:.2f}x")
    if not extra and len(plain) == 2:
        (b1, ms1), (b2, ms2) = plain.items()
        print(f"speed-up {b1} -> {b2}: {ms1 / ms2:.2f}x")
    if args.fused_kernels:
        print(f"\nEach kernel alone, forward + backward ({dtype}, this model's shapes at micro-batch {mbs}):\n")
        print("| kernel | implementation | ms |\n|---|---|---|")
        for kernel, name, ms in kernel_rows(arch, mbs, dtype, device, args.liger, max(iters, 5), warmup):
            print(f"| {kernel} | {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
