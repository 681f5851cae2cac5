"""Benchmark the KD loss fused with the output layer, forward + backward, at Llama-3.1-8B -> 4B shapes.

Every variant takes the student's and the teacher's final hidden states ([T, H_s], [T, H_t], bf16) and
both [V, H] output weights, and returns mean over tokens of KL(p_teacher || p_student) with gradients for
the student hidden states and output weight:
  gemms         the three logit GEMMs alone, no loss: student forward, teacher forward, student dgrad +
                wgrad (the floor any output-layer KD pays; it stores both [T, V] logits)
  unfused       F.linear logits (autograd) + the Triton KD loss (distill/kl_triton.py): today's path
  fused         distill/kd_linear.py, Triton tile epilogue (never stores [T, V] logits)
  fused_torch   the same tiled algorithm with the torch epilogue (fp32 chunk temporaries)
  fused_lm      fused, plus the student's LM (cross-entropy) loss on the same tiles (labels, weight 1)
  liger         liger_kernel's LigerFusedLinearJSD with jsd_beta = 0 (forward KL); skipped when
                liger_kernel does not import

Reports the median of --iters timed iterations (CUDA events around forward + backward), the ratio to
`gemms`, and the peak extra memory of one iteration: torch.cuda.max_memory_allocated() minus the memory
held before it (inputs in the baseline). A second memory column subtracts the two gradients every variant
returns (hidden [T, H_s] and weight [V, H_s], bf16), leaving the loss's own cost. Loss and gradient
columns compare with `unfused` (relative norm of the difference).

GPU:     python benchmarks/bench_kd_linear.py              (T = 8192, V = 128256, H_s = 3072, H_t = 4096)
         python benchmarks/bench_kd_linear.py --chunk-tokens 512 1024 2048   (fused at several chunk sizes)
CPU run: python benchmarks/bench_kd_linear.py --smoke      (tiny sizes, Triton via its interpreter; checks
                                                             that every variant executes, times nothing)
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
from common import timed_median_ms

VARIANTS = ("gemms", "unfused", "fused", "fused_torch", "fused_lm", "liger")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--student-hidden", type=int, default=3072)
    p.add_argument("--teacher-hidden", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--chunk-tokens", type=int, nargs="+", default=[None],
                   help="tokens per chunk of the fused variants (default: 2^27 logits elements per chunk)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: check that everything runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.vocab, args.student_hidden, args.teacher_hidden = 64, 300, 32, 48
        args.iters, args.warmup = 1, 0
        args.chunk_tokens = [24 if c is None else c for c in args.chunk_tokens]
    return args


def make_inputs(args, dtype, device, seed=0):
    """Hidden states / weights giving logits of O(1-3) whose student is a noisy copy of the teacher."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t, v, hs, ht = args.tokens, args.vocab, args.student_hidden, args.teacher_hidden

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, generator=gen, dtype=torch.float32).mul_(scale)

    teacher_hidden = randn(t, ht).to(dtype)
    teacher_weight = randn(v, ht, scale=2.0 / ht ** 0.5).to(dtype)
    student_hidden = randn(t, hs).to(dtype).requires_grad_(True)
    student_weight = randn(v, hs, scale=2.0 / hs ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (t,), device=device, generator=gen)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def step_fn(variant, args, chunk):
    """fn(student_hidden, student_weight, teacher_hidden, teacher_weight, labels) -> scalar loss to backward,
    or None for `gemms` (which does its own 'backward')."""
    tau = args.temperature
    if variant == "gemms":
        def gemms(h_s, w_s, h_t, w_t, labels):
            with torch.no_grad():
                z_s = h_s @ w_s.t()
                z_t = h_t @ w_t.t()
                grad_logits = z_s  # any [T, V] values: only the GEMM shapes matter here
                h_s.grad = grad_logits @ w_s
                w_s.grad = grad_logits.t() @ h_s
                del z_t
            return None
        return gemms
    if variant == "unfused":
        from megatron_minitron.distill.losses import logit_kd_loss

        def unfused(h_s, w_s, h_t, w_t, labels):
            z_s = F.linear(h_s, w_s)
            with torch.no_grad():
                z_t = F.linear(h_t, w_t)
            return logit_kd_loss(z_s, z_t, "forward_kl", temperature=tau, group=None, backend="triton").mean()
        return unfused
    if variant in ("fused", "fused_torch", "fused_lm"):
        from megatron_minitron.distill.kd_linear import linear_kd_loss

        backend = "torch" if variant == "fused_torch" else "triton"
        lm_weight = 1.0 if variant == "fused_lm" else 0.0

        def fused(h_s, w_s, h_t, w_t, labels):
            out = linear_kd_loss(h_s, w_s, h_t, w_t, "forward_kl", temperature=tau, group=None, backend=backend,
                                 labels=labels if lm_weight else None, lm_weight=lm_weight, chunk_tokens=chunk)
            return out.loss / h_s.shape[0]
        return fused
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=tau)

        def liger(h_s, w_s, h_t, w_t, labels):
            return jsd(h_s, w_s, h_t, w_t, None)  # shift_labels has no default (liger-kernel 0.8.5): no labels
        return liger
    raise ValueError(variant)


def run_step(fn, inputs):
    h_s, w_s = inputs[0], inputs[1]
    h_s.grad = w_s.grad = None
    loss = fn(*inputs)
    if loss is not None:
        loss.backward()
    return loss


def relative_diff(a, b, rows=4096):
    """||a - b|| / ||b|| in fp32, a block of rows at a time (no fp32 copy of a [V, H] tensor)."""
    num = den = 0.0
    for i in range(0, a.shape[0], rows):
        x, y = a[i:i + rows].float(), b[i:i + rows].float()
        num += (x - y).pow(2).sum().item()
        den += y.pow(2).sum().item()
    return (num / max(den, 1e-30)) ** 0.5


def peak_extra_gb(fn, inputs, device):
    if device.type != "cuda":
        return float("nan")
    inputs[0].grad = inputs[1].grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    run_step(fn, inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 1e9


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.smoke:
            sys.exit("no GPU: timings on CPU are meaningless; use --smoke to check that the script runs")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernel modules are imported
    dtype = torch.bfloat16
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    date = datetime.date.today().isoformat()
    inputs = make_inputs(args, dtype, device)
    grads_gb = (inputs[0].numel() + inputs[1].numel()) * inputs[0].element_size() / 1e9
    shape = f"T={args.tokens} V={args.vocab} Hs={args.student_hidden} Ht={args.teacher_hidden}"
    print(f"{shape}, bf16, tau={args.temperature}; the two returned gradients are {grads_gb:.2f} GB")
    print("| date | device | variant | chunk | median ms (fwd+bwd) | x gemms | peak extra GB | beyond the gradients GB "
          "| loss - unfused | grad h rel. diff | grad W rel. diff | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    reference = None
    gemms_ms = None
    measured = {}  # (variant, chunk) -> (ms, beyond-the-gradients GB)
    rows = [(v, c) for v in args.variants for c in (args.chunk_tokens if v.startswith("fused") else [None])]
    for variant, chunk in rows:
        prefix = f"| {date} | {device_name} | {variant} | {chunk or 'default'} |"
        try:
            fn = step_fn(variant, args, chunk)
        except (ImportError, AssertionError, ValueError) as exc:  # e.g. a Liger release that rejects beta = 0
            print(f"{prefix} - | - | - | - | - | - | - | skipped: {exc} |", flush=True)
            continue
        try:
            loss = run_step(fn, inputs)
            value = loss.item() if loss is not None else None
            grads = (inputs[0].grad, inputs[1].grad)
            if variant == "unfused":
                reference = (value, grads)
            if reference is not None and value is not None and variant not in ("unfused", "fused_lm"):
                diffs = (f"{value - reference[0]:+.2e}", f"{relative_diff(grads[0], reference[1][0]):.2e}",
                         f"{relative_diff(grads[1], reference[1][1]):.2e}")
            else:
                diffs = ("-", "-", "-")
            del loss, grads
            ms = timed_median_ms(lambda: run_step(fn, inputs), args.iters, args.warmup)
            peak_gb = peak_extra_gb(fn, inputs, device)
        except torch.cuda.OutOfMemoryError:
            inputs[0].grad = inputs[1].grad = None
            torch.cuda.empty_cache()
            print(f"{prefix} OOM | - | OOM | OOM | - | - | - | |", flush=True)
            continue
        except Exception as exc:  # a third-party kernel failing at run time costs its row, not the summary
            if variant != "liger":
                raise
            inputs[0].grad = inputs[1].grad = None
            print(f"{prefix} - | - | - | - | - | - | - | failed: {type(exc).__name__}: {exc} |", flush=True)
            continue
        if variant == "gemms":
            gemms_ms = ms
        ratio = f"{ms / gemms_ms:.3f}" if gemms_ms else "-"
        note = "adds the LM loss on the same tiles (not compared)" if variant == "fused_lm" else ""
        if variant == "liger":
            note = "jsd_beta=0; its loss is its own JSD(beta=0) normalisation"
        print(f"{prefix} {ms:.2f} | {ratio} | {peak_gb:.2f} | {peak_gb - grads_gb:.2f} | {diffs[0]} | {diffs[1]} | "
              f"{diffs[2]} | {note} |", flush=True)
        measured[(variant, chunk)] = (ms, peak_gb - grads_gb)
    summarize(measured, gemms_ms)


def summarize(measured: dict, gemms_ms):
    """The issue's goals for the fused variant, from this run's rows (nothing printed for missing baselines)."""
    liger = measured.get(("liger", None))
    for (variant, chunk), (ms, extra_gb) in measured.items():
        if variant != "fused":
            continue
        goals = []
        if gemms_ms:
            goals.append(f"{ms / gemms_ms:.3f}x the GEMMs (goal <= 1.15)")
        goals.append(f"{extra_gb:.2f} GB beyond the gradients (goal < 1)")
        if liger:
            goals.append(f"{liger[0] / ms:.2f}x faster than Liger (goal > 1)")
        print(f"fused, chunk {chunk or 'default'}: " + ", ".join(goals))


if __name__ == "__main__":
    main()
