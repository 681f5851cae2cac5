"""Benchmark the forward-KL distillation loss, forward + backward, at Llama-3 vocabulary size.

Variants (all compute mean over tokens of KL(p_teacher || p_student), gradient w.r.t. the student logits):
  naive   fp32 log_softmax of both + F.kl_div(log_target=True), plain autograd (the usual implementation)
  torch   megatron_minitron.distill.losses, backend="torch" (chunked, analytic backward)
  triton  megatron_minitron.distill.losses, backend="triton" (fused online-softmax kernels)
  liger   liger_kernel's LigerKLDIVLoss on bf16 log_softmax outputs (skipped when liger_kernel does not import)

Reports the median of --iters timed iterations (CUDA events around forward + backward) and the peak extra
memory of one iteration: torch.cuda.max_memory_allocated() minus the memory held before it (inputs
included in the baseline; the bf16 student gradient, 2 bytes x tokens x vocab, is counted as extra for
every variant, and a second column gives the extra beyond that gradient, which is the loss's own cost). Prints one markdown table row per (variant, tokens).

H100:    python benchmarks/bench_kd_loss.py                      (tokens 8192 and 32768, V = 128256)
CPU run: python benchmarks/bench_kd_loss.py --smoke              (tiny sizes, Triton via its interpreter;
                                                                   checks that every variant executes)
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
from common import timed_median_ms

VARIANTS = ("naive", "torch", "triton", "liger")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--chunk-tokens", type=int, default=None, help="torch path chunk (default: 2^24 elements)")
    p.add_argument("--triton-block", type=int, default=None, help="Triton vocab block (default 2048)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: check that everything runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.vocab, args.iters, args.warmup = [16], 300, 2, 1
    return args


def make_inputs(tokens, vocab, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    teacher = torch.randn(tokens, vocab, device=device, dtype=dtype, generator=gen) * 2
    noise = torch.randn(tokens, vocab, device=device, dtype=dtype, generator=gen)
    student = (teacher + noise).requires_grad_(True)
    return student, teacher


def loss_fn(variant, args):
    from megatron_minitron.distill.losses import logit_kd_loss

    tau = args.temperature
    if variant == "naive":
        def naive(student, teacher):
            log_p_s = F.log_softmax(student.float() / tau, dim=-1)
            log_p_t = F.log_softmax(teacher.float() / tau, dim=-1)
            return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1).mean() * tau ** 2
        return naive
    if variant in ("torch", "triton"):
        def ours(student, teacher):
            return logit_kd_loss(student, teacher, "forward_kl", temperature=tau, group=None, backend=variant,
                                 chunk_tokens=args.chunk_tokens, triton_block=args.triton_block).mean()
        return ours
    if variant == "liger":
        from liger_kernel.transformers import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def liger(student, teacher):
            # Liger takes log-probabilities; its kernel fuses only the KL, not the softmax
            return kl(F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1)) * tau ** 2
        return liger
    raise ValueError(variant)


def max_abs_diff(a, b, rows=1024):
    """max |a - b| in fp32, a block of rows at a time (no fp32 copy of [tokens, vocab])."""
    return max((a[i:i + rows].float() - b[i:i + rows].float()).abs().max().item() for i in range(0, a.shape[0], rows))


def time_variant(fn, student, teacher, iters, warmup, device):
    def step():
        student.grad = None
        fn(student, teacher).backward()

    ms = timed_median_ms(step, iters, warmup)
    peak_gb = float("nan")
    if device.type == "cuda":
        student.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_gb = (torch.cuda.max_memory_allocated() - baseline) / 1e9
    return ms, peak_gb


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.smoke:
            sys.exit("no GPU: timings on CPU are meaningless; use --smoke to check that the script runs")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernel module is imported
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    date = datetime.date.today().isoformat()
    print("| date | device | variant | tokens | vocab | dtype | median ms (fwd+bwd) | peak extra GB | "
          "beyond the gradient GB | loss - naive loss | max abs grad - naive grad | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        student, teacher = make_inputs(tokens, args.vocab, dtype, device)
        reference = reference_grad = None
        grad_gb = student.numel() * student.element_size() / 1e9  # every variant must return this gradient
        for variant in args.variants:
            note = ""
            try:
                fn = loss_fn(variant, args)
            except ImportError as exc:
                print(f"| {date} | {device_name} | {variant} | {tokens} | {args.vocab} | {args.dtype} | - | - | - | - | - | "
                      f"skipped: {exc} |", flush=True)
                continue
            try:
                student.grad = None
                loss = fn(student, teacher)
                loss.backward()
                value, grad = loss.item(), student.grad
                student.grad = None
                if variant == "naive":
                    reference, reference_grad = value, grad
                grad_diff = (f"{max_abs_diff(grad, reference_grad):.2e}" if reference_grad is not None else "-")
                del loss, grad
                ms, peak_gb = time_variant(fn, student, teacher, args.iters, args.warmup, device)
            except torch.cuda.OutOfMemoryError:
                student.grad = None
                torch.cuda.empty_cache()
                print(f"| {date} | {device_name} | {variant} | {tokens} | {args.vocab} | {args.dtype} | OOM | OOM "
                      f"| OOM | - | - | |", flush=True)
                continue
            diff = f"{value - reference:+.2e}" if reference is not None else "-"
            if variant == "liger":
                note = "bf16 log_softmax outside the kernel" if dtype == torch.bfloat16 else ""
            print(f"| {date} | {device_name} | {variant} | {tokens} | {args.vocab} | {args.dtype} | {ms:.2f} | "
                  f"{peak_gb:.2f} | {peak_gb - grad_gb:.2f} | {diff} | {grad_diff} | {note} |", flush=True)
        del student, teacher, reference_grad
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
