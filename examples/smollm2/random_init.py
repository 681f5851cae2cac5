"""A checkpoint with the architecture of CKPT and fresh random weights: the same-size random-init baseline
that is distilled like the pruned student (does pruning keep what the teacher knew, or would any model of
that size get there with the same steps?).

    python examples/smollm2/random_init.py --like runs/smollm2/width --output runs/smollm2/random_init
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--like", required=True, help="checkpoint whose architecture to use")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args(argv)

    from megatron_minitron import checkpoint
    from megatron_minitron.config import Parallel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import destroy, init_distributed, set_seed

    arch = checkpoint.read_arch(args.like)  # init_method_std included: what megatron initialises with
    init_distributed(1, 1)
    try:
        set_seed(args.seed)
        model = build_gpt(arch, Parallel())
        checkpoint.save_checkpoint_to(args.output, [model], arch=arch,
                                      provenance={"random_init": True, "architecture_of": args.like,
                                                  "seed": args.seed})
    finally:
        destroy()
    print(f"wrote {args.output}: random init, {arch.num_parameters():,} parameters (architecture of {args.like})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
