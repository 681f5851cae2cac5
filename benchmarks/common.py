"""Shared bits for the GPU benchmarks: synthetic token data, timing of trainer steps, markdown rows."""
from __future__ import annotations

import datetime
import gc
import statistics
import sys
import time

import torch


class RandomTokens:
    """GPT samples of random tokens: throughput does not depend on the text."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.text = torch.randint(0, vocab_size, (num_samples, seq_length + 1), generator=g)
        self.seq_length = seq_length

    def __len__(self):
        return self.text.shape[0]

    def __getitem__(self, i):
        return {"tokens": self.text[i, :-1], "labels": self.text[i, 1:],
                "loss_mask": torch.ones(self.seq_length), "position_ids": torch.arange(self.seq_length)}


def timing_args(micro_batch_size: int) -> "argparse.ArgumentParser":
    """The flags every step benchmark takes; add your own, then parse."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that it runs, times nothing")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch-size", type=int, default=micro_batch_size)
    return p


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, warmup: int, iters: int) -> list:
    """Seconds per call of ``step()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def timed_median_ms(fn, iters: int, warmup: int) -> float:
    """Median ms of ``fn()`` over ``iters`` calls after ``warmup``: CUDA events around each call on a GPU
    (kernel time, no host sync in the window), wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# CUDA kernel name -> what it does, first match wins (cuBLAS Hopper GEMMs are "nvjet_*", cuDNN attention
# "cudnn_generated_*sdpa*", torch's foreach / fused Adam "multi_tensor_apply_kernel" / "*adam*")
KERNEL_CATEGORIES = (
    ("ours", r"^_(rms_norm|rope|swiglu|stats|grad|kl|norm_quantize|quantize_rows|attention_output)_?\w*kernel"),
    ("attention", r"flash|fmha|sdpa|attn|attention"),  # before gemm: cuDNN's attention kernels say "wgmma"
    ("gemm", r"gemm|nvjet|cutlass|xmma|wgmma|cublas|splitK"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("nccl", r"nccl"),
    ("copy", r"copy|memcpy|memset|CatArray|cat_"),
    ("reduce/softmax", r"reduce|softmax|norm|cross_entropy|nll|log_softmax"),
    ("elementwise", r"elementwise"),
)


def kernel_breakdown(kernels) -> dict:
    """ms per category (KERNEL_CATEGORIES, else "other") of (kernel name, microseconds) pairs."""
    import re

    totals = {name: 0.0 for name, _ in KERNEL_CATEGORIES}
    totals["other"] = 0.0
    for name, us in kernels:
        category = next((c for c, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")
        totals[category] += us / 1e3
    return totals


def profile_step(step) -> tuple:
    """One profiled call of ``step()``: (the SDPA kernels it ran - cudnn / flash / efficient / math /
    flash_for_cpu, from the aten op names - and on a GPU the kernel ms per category, else None), so an MFU
    row says whether attention was fused and where the step's GPU time went."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        synchronize()
    events = prof.key_averages()
    prefix = "aten::_scaled_dot_product_"
    names = {e.key[len(prefix):].replace("_backward", "").replace("attention_", "").replace("_attention", "")
             for e in events if e.key.startswith(prefix)}
    breakdown = None
    if torch.cuda.is_available():  # kernels (and memcpy / memset) are the events with self device time
        breakdown = kernel_breakdown((e.key, e.self_device_time_total) for e in events
                                     if e.self_device_time_total > 0 and not e.key.startswith("aten::"))
    return "+".join(sorted(names)) or "none", breakdown


def breakdown_table(rows) -> str:
    """Markdown: one row per (label, breakdown dict) with the categories that took any time."""
    rows = [(label, b) for label, b in rows if b]
    if not rows:
        return ""
    columns = [c for c in rows[0][1] if any(b[c] > 0 for _, b in rows)]
    lines = ["| step | GPU kernel ms | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for label, b in rows:
        lines.append(f"| {label} | {sum(b.values()):.1f} | " + " | ".join(f"{b[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def median_ms(times: list) -> float:
    return 1000 * statistics.median(times)


def peak_memory_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def release_memory() -> None:
    """Free a dropped Trainer's memory now, before the next one is built: its model is held in reference
    cycles (megatron's DDP keeps grad hooks that refer back to it; the model config keeps DDP's no_sync), which
    only Python's cyclic collector frees, at a time of its choosing; on a GPU the old model, grads and optimizer
    states would still be allocated while the next variant allocates its own. Collected until nothing more is
    found: freeing one pass's Python objects drops C++ references (autograd nodes hold parameters) that make
    more of the model collectable only in the next pass."""
    for _ in range(10):
        if not gc.collect():
            break
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def header(title: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"### {title}\n\n{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}\n"
            f"command: `python {' '.join(sys.argv)}`\n")
