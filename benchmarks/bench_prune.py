"""Benchmark the two costs of `minitron prune` against their floors.

1. importance   estimate_importance (hooks on every head, neuron, norm; BI of every layer) over N tokens vs a
                plain forward of the same model over the same N tokens (megatron's forward-only schedule,
                no hooks). Goal: <= 1.2x.
2. rewrite      `prune --in-place` with precomputed scores and targets that keep every unit (so both sides
                move the same bytes): load + trim + staged save + read-back verification + swap, vs loading
                the checkpoint once and saving it once to a new directory. Goal: <= 2x.

Prints markdown rows: date, device, measurement, size, ms, floor ms, ratio, goal, command. On a GPU also the
peak memory each phase adds next to `minitron plan --job prune`'s parts for it (issue 15 item 5: within 10%), the
importance pass at three calibration shapes (the timed one, twice the micro-batch, half the sequence).

GPU:     python benchmarks/bench_prune.py                     (1.07B-parameter Llama-like model, bf16: item 4 asks >= 1B)
CPU run: python benchmarks/bench_prune.py --smoke             (tiny sizes: checks that everything runs)
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import breakdown_table, profile_step  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=20)  # 20 x 2048: 1.07B parameters (the 886M benchmark GPT has 16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tokens", type=int, default=131072, help="calibration tokens (N)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--skip", choices=["importance", "rewrite"], nargs="*", default=[])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: check that everything runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.ffn, args.heads, args.groups = 2, 64, 128, 4, 2
        args.vocab, args.seq, args.micro_batch_size, args.tokens, args.repeats = 256, 32, 2, 256, 1
    return args


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats):
    fn()  # warm-up (kernels, allocator, page cache)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def bench_importance(model, arch, args):
    from megatron_minitron.prune import ImportanceSettings, estimate_importance, run_forward

    g = torch.Generator().manual_seed(0)
    n_batches = max(args.tokens // (args.seq * args.micro_batch_size), 1)
    batches = [{"tokens": torch.randint(0, arch.vocab_size, (args.micro_batch_size, args.seq), generator=g)}
               for _ in range(n_batches)]
    tokens = n_batches * args.micro_batch_size * args.seq
    model.eval()
    with torch.no_grad():
        plain = timed(lambda: run_forward([model], batches), args.repeats)
        with PeakAbove() as peak:
            hooked = timed(lambda: estimate_importance([model], batches, ImportanceSettings()), args.repeats)
        # where the extra time goes (GPU only): one profiled call of each
        breakdown = [("plain forward", profile_step(lambda: run_forward([model], batches))[1]),
                     ("importance pass", profile_step(
                         lambda: estimate_importance([model], batches, ImportanceSettings()))[1])]
    return tokens, hooked, plain, peak.bytes, breakdown


def importance_memory_sweep(model, arch, args):
    """The importance pass's peak above the resident weights at two more calibration shapes than the timed one
    (issue 15 item 5 wants three configurations per job), one untimed batch each: rows of (what, measured,
    planned)."""
    from megatron_minitron.prune import ImportanceSettings, estimate_importance

    rows = []
    g = torch.Generator().manual_seed(1)
    for seq, mbs in ((args.seq, 2 * args.micro_batch_size), (max(args.seq // 2, 1), args.micro_batch_size)):
        batch = {"tokens": torch.randint(0, arch.vocab_size, (mbs, seq), generator=g)}
        with torch.no_grad(), PeakAbove() as peak:
            estimate_importance([model], [batch], ImportanceSettings())
        rows.append((f"importance pass, seq {seq} x mbs {mbs}, above the resident weights", peak.bytes,
                     planned_prune_bytes(arch, seq, mbs)[2]))
    return rows


class PeakAbove:
    """Peak CUDA allocation above what was allocated on entry (the benchmark's own model): the memory the
    measured step adds. 0 on CPU."""

    def __enter__(self):
        self.bytes = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        return False


def planned_prune_bytes(arch, seq, micro_batch_size):
    """`minitron plan --job prune`'s parts for this model (TP1 PP1, bf16): (weights + pruned copy, calibration
    activations + logits), to hold against the measured peaks of the rewrite and of the importance pass, each of
    which adds to the weights already resident (issue 15 item 5)."""
    from megatron_minitron.plan import Job, Layout, estimate

    est = estimate(Job("prune", arch, seq, micro_batch_size, param_bytes=2), Layout(micro_batch_size=micro_batch_size))
    copy = est.parts["pruned_copy"]
    calibration = est.total - est.parts["weights"] - copy
    return est.parts["weights"], copy, calibration


def bench_rewrite(model, arch, args, work):
    from megatron_minitron import checkpoint
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.prune import ImportanceScores, ImportanceSettings
    from megatron_minitron.config import Parallel
    from megatron_minitron.prune import cli as prune_cli

    src = os.path.join(work, "src")
    checkpoint.save_checkpoint_to(src, [model], arch=arch)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
    L, H, G, F, D = arch.num_layers, arch.num_attention_heads, arch.query_groups, arch.ffn_hidden_size, \
        arch.hidden_size
    scores = ImportanceScores(settings=ImportanceSettings(), heads=torch.ones(L, H, dtype=torch.float64),
                              groups=torch.ones(L, G, dtype=torch.float64),
                              neurons=torch.ones(L, F, dtype=torch.float64),
                              hidden=torch.ones(D, dtype=torch.float64), num_samples=1)
    scores_path = os.path.join(work, "scores.pt")
    scores.save(scores_path)
    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers())
    in_place = parser.parse_args(["prune", "--load", src, "--in-place", "--scores", scores_path])

    def rewrite():
        assert prune_cli.run(in_place) == 0

    def read_and_write():
        copy = os.path.join(work, "copy")
        fresh = build_gpt(arch, Parallel(), next(model.parameters()).dtype,
                          device=next(model.parameters()).device, initialize=False)  # as prune's builds
        checkpoint.load_weights(src, [fresh], arch=arch)
        checkpoint.save_checkpoint_to(copy, [fresh], arch=arch)
        shutil.rmtree(copy)

    floor = timed(read_and_write, args.repeats)
    with PeakAbove() as peak:
        ms = timed(rewrite, args.repeats)
    return size, ms, floor, peak.bytes


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("no GPU: timings on CPU are meaningless; use --smoke to check that the script runs")
    from megatron_minitron.config import ModelArch, Parallel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import init_distributed, set_seed

    rt = init_distributed(1, 1)
    set_seed(0)
    dtype = torch.bfloat16 if rt.on_gpu else torch.float32
    arch = ModelArch(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                     num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                     seq_length=args.seq)
    model = build_gpt(arch, Parallel(), dtype, device=rt.device)
    device = torch.cuda.get_device_name(rt.device) if rt.on_gpu else "cpu (smoke)"
    date = datetime.date.today().isoformat()
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    n = arch.num_parameters()
    params = f"{n / 1e9:.2f}B params" if n >= 1e9 else f"{n / 1e6:.2f}M params"
    print("| date | device | measurement | size | ms | floor ms | ratio | goal | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    weights, copy, calibration = planned_prune_bytes(arch, args.seq, args.micro_batch_size)
    memory_rows, importance_table = [], ""
    if "importance" not in args.skip:
        tokens, ms, floor, peak, breakdown = bench_importance(model, arch, args)
        print(f"| {date} | {device} | importance vs plain forward | {params}, {tokens} tokens | {ms:.1f} | "
              f"{floor:.1f} | {ms / floor:.2f}x | <= 1.2x | `{command}` |", flush=True)
        importance_table = breakdown_table(breakdown)
        memory_rows.append((f"importance pass, seq {args.seq} x mbs {args.micro_batch_size}, above the resident "
                            "weights", peak, calibration))
        memory_rows += importance_memory_sweep(model, arch, args)
    if "rewrite" not in args.skip:
        if args.dir:
            os.makedirs(args.dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="bench_prune_", dir=args.dir)
        try:
            size, ms, floor, peak = bench_rewrite(model, arch, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"| {date} | {device} | in-place rewrite vs read + write | {params}, {size / 2**20:.0f} MiB | "
              f"{ms:.1f} | {floor:.1f} | {ms / floor:.2f}x | <= 2x | `{command}` |", flush=True)
        # the rewrite loads its own source copy, trims it, and verifies: weights + pruned copy of the plan
        memory_rows.append(("prune --in-place (scores given), above the benchmark's model", peak, weights + copy))
    if importance_table:
        print("\nGPU kernel ms of one call each (benchmarks/common.py KERNEL_CATEGORIES):\n")
        print(importance_table)
    if memory_rows and torch.cuda.is_available():
        print("\n| prune phase | measured peak GiB | planned GiB | planned / measured |\n|---|---|---|---|")
        for what, measured, planned in memory_rows:
            ratio = f"{planned / measured:.2f}" if measured else "-"
            print(f"| {what} | {measured / 2**30:.2f} | {planned / 2**30:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
