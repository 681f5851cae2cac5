"""Shared bits for the GPU benchmarks: synthetic token data, timing of trainer steps, markdown rows."""
from __future__ import annotations

import datetime
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


def attention_kernels(step) -> str:
    """Which SDPA kernels one call of ``step()`` ran (cudnn / flash / efficient / math / flash_for_cpu): the
    profiler's aten op names, so an MFU row says whether attention was fused."""
    from torch.profiler import profile

    with profile() as prof:
        step()
        synchronize()
    prefix = "aten::_scaled_dot_product_"
    names = {e.key[len(prefix):].replace("_backward", "").replace("attention_", "").replace("_attention", "")
             for e in prof.key_averages() if e.key.startswith(prefix)}
    return "+".join(sorted(names)) or "none"


def median_ms(times: list) -> float:
    return 1000 * statistics.median(times)


def peak_memory_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def header(title: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"### {title}\n\n{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}\n"
            f"command: `python {' '.join(sys.argv)}`\n")
