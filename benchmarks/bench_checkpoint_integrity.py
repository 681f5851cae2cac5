"""What checkpoint checksums cost (CPU): a save and a load of a ~1B-parameter GPT with our checkpoint code,
and the share of each spent on the manifest (hashing the written files at save, verifying them at load).

    python benchmarks/bench_checkpoint_integrity.py --out /tmp/ckpt_bench         # ~1B parameters, fp32
    python benchmarks/bench_checkpoint_integrity.py --smoke --out /tmp/ckpt_bench # tiny, checks that it runs

The goal (issue: reliability at the edges) is under 10% of save and of load time. Runs in one process (gloo).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="a scratch directory (its contents are replaced)")
    p.add_argument("--smoke", action="store_true", help="a tiny model: checks that it runs")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from megatron_minitron import checkpoint
    from megatron_minitron.checkpoint import integrity
    from megatron_minitron.config import ModelArch, Parallel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import init_distributed

    arch = (ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=512)
            if args.smoke else
            ModelArch(num_layers=20, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                      num_query_groups=4, vocab_size=32000, seq_length=2048))
    init_distributed(1, 1)
    model = build_gpt(arch, Parallel())
    params = sum(p.numel() for p in model.parameters())

    timings = {"hash": 0.0, "verify": 0.0}
    for name, key in (("shard_hashes", "hash"), ("finish_manifest", "hash"), ("verify_before_load", "verify")):
        original = getattr(integrity, name)

        def timed(*a, _original=original, _key=key, **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                timings[_key] += time.perf_counter() - start
        setattr(integrity, name, timed)

    rows = []
    for repeat in range(args.repeats):
        target = os.path.join(args.out, "ckpt")
        shutil.rmtree(args.out, ignore_errors=True)
        os.makedirs(args.out)
        timings.update(hash=0.0, verify=0.0)
        start = time.perf_counter()
        checkpoint.save_checkpoint_to(target, [model], arch=arch)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        checkpoint.load_weights(target, [model], arch=arch)
        load_s = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(target) for f in fs)
        rows.append((repeat, save_s, timings["hash"], load_s, timings["verify"], size))
    print(f"{params / 1e9:.3f}B parameters, fp32, checksum {integrity.hash_algorithm()}")
    print("| run | save s | of which hashing s | share | load s | of which verifying s | share | GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for repeat, save_s, hash_s, load_s, verify_s, size in rows:
        print(f"| {repeat} | {save_s:.2f} | {hash_s:.2f} | {hash_s / save_s:.1%} | {load_s:.2f} | {verify_s:.2f} | "
              f"{verify_s / load_s:.1%} | {size / 2**30:.2f} |")


if __name__ == "__main__":
    main()
