"""`prune --in-place` under crashes and at TP2.

`python prune_inplace_worker.py crash WORKDIR`: one process. Forked children (the parent does no torch work
before forking) build a source checkpoint, the scores and the reference pruned checkpoint (`--save`), then run
`--in-place` on copies of the source, each killed at one crash point. The parent then checks that every
copy loads (architecture from its own metadata, strict shapes) with weights equal to the source's or the
reference's, the ones expected for that point, and that a re-run (or the recovery step) leaves exactly the
pruned checkpoint and no staged/aside/trash directory.

`torchrun --nproc-per-node 2 prune_inplace_worker.py tp2 WORKDIR`: --in-place on a checkpoint root at TP2;
the result, loaded at TP2, equals this rank's trimmed shard computed in-process.
"""
import argparse
import os
import shutil
import sys
import traceback

import torch

from megatron_minitron import checkpoint
from megatron_minitron.checkpoint.layout import CRASH_ENV
from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune import (ImportanceScores, ImportanceSettings, PruneTargets, make_plan,
                                     prune_model_state)
from megatron_minitron.prune import cli as prune_cli
from megatron_minitron.prune.rewrite import recover_interrupted_rewrite, rewrite_paths
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ARCH = ModelArch(num_layers=3, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=16)
TARGETS = ["hidden_size=24", "ffn_hidden_size=32", "num_attention_heads=2", "num_layers=2"]
# crash point -> which checkpoint SRC must hold afterwards ("before_rename" is the staged save's own point)
POINTS = {"before_rename": "old", "prune_after_write": "old", "prune_after_aside": "old",
          "prune_before_delete": "new", None: "new"}


def entries(path):
    """A directory's entries without our lock files (they stay behind by design, see checkpoint/lock.py)."""
    from megatron_minitron.checkpoint.lock import is_lock_file

    return sorted(name for name in os.listdir(path) if not is_lock_file(name))


def parse(argv):
    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers())
    return parser.parse_args(["prune", *argv])


def preimport() -> None:
    """Import, once in the parent, what the children would otherwise each import lazily (seconds each);
    imports start no threads, so forking afterwards is safe (the parent runs no torch ops before forking)."""
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.parallel_state  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    from megatron_minitron.model import layers  # noqa: F401
    from megatron_minitron.prune import importance, rewrite, summary, trim  # noqa: F401


def in_child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def make_source(work):
    init_distributed(1, 1)
    set_seed(5)
    model = build_gpt(ARCH, Parallel())
    checkpoint.save_checkpoint_to(os.path.join(work, "src"), [model], arch=ARCH)
    g = torch.Generator().manual_seed(1)
    scores = ImportanceScores(settings=ImportanceSettings(),
                              heads=torch.rand(3, 4, generator=g, dtype=torch.float64),
                              groups=torch.zeros(3, 2, dtype=torch.float64),  # make_plan recomputes
                              neurons=torch.rand(3, 48, generator=g, dtype=torch.float64),
                              hidden=torch.rand(32, generator=g, dtype=torch.float64),
                              layers={"bi": torch.rand(3, generator=g, dtype=torch.float64)}, num_samples=4)
    scores.save(os.path.join(work, "scores.pt"))
    assert prune_cli.run(parse(["--load", os.path.join(work, "src"), "--save", os.path.join(work, "ref"),
                                "--scores", os.path.join(work, "scores.pt"), "--target", *TARGETS])) == 0


def run_in_place(src, scores, point):
    if point is not None:
        os.environ[CRASH_ENV] = point
    init_distributed(1, 1)
    prune_cli.run(parse(["--load", src, "--in-place", "--scores", scores, "--target", *TARGETS]))


def run_with_a_bad_write(src, scores):
    """The staged copy is written from the pruned model with its first weight perturbed (the model itself
    keeps its values), so it cannot read back equal: the run must refuse it before the swap."""
    real_save = checkpoint.save_checkpoint_to

    def perturbed_save(path, model_chunks, **kwargs):
        weight = next(model_chunks[0].parameters())
        kept = weight.detach().clone()
        with torch.no_grad():
            weight.add_(1.0)
        try:
            return real_save(path, model_chunks, **kwargs)
        finally:
            with torch.no_grad():
                weight.copy_(kept)

    checkpoint.save_checkpoint_to = perturbed_save
    init_distributed(1, 1)
    try:
        prune_cli.run(parse(["--load", src, "--in-place", "--scores", scores, "--target", *TARGETS]))
    except OSError as error:
        assert "does not read back equal to the pruned model" in str(error), error
        print(f"read-back refused: {error}", flush=True)
        return
    raise AssertionError("prune --in-place swapped in a staged copy that differs from the pruned model")


def loaded_state(path):
    arch = checkpoint.read_arch(path)
    model = build_gpt(arch, Parallel())
    checkpoint.load_weights(path, [model], arch=arch)  # strict: metadata and tensors must agree
    return arch, {k: v for k, v in model.state_dict().items()
                  if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def crash(work):
    preimport()
    assert in_child(lambda: make_source(work)) == 0, "building the source failed"
    scores = os.path.join(work, "scores.pt")
    dirs = {}
    for point in POINTS:
        parent = os.path.join(work, f"case_{point}")
        os.makedirs(parent)
        dirs[point] = os.path.join(parent, "SRC")
        shutil.copytree(os.path.join(work, "src"), dirs[point])
        code = in_child(lambda: run_in_place(dirs[point], scores, point))
        assert code == (0 if point is None else 86), f"{point}: exit code {code}"
    mismatch = os.path.join(work, "case_mismatch", "SRC")
    shutil.copytree(os.path.join(work, "src"), mismatch)
    assert in_child(lambda: run_with_a_bad_write(mismatch, scores)) == 0, "the bad write was not refused"
    init_distributed(1, 1)
    old_arch, old = loaded_state(os.path.join(work, "src"))
    assert same(loaded_state(mismatch)[1], old), "a refused rewrite changed SRC"
    assert prune_cli.run(parse(["--load", mismatch, "--in-place", "--scores", scores, "--target", *TARGETS])) == 0
    assert entries(os.path.dirname(mismatch)) == ["SRC"], entries(os.path.dirname(mismatch))
    print("read-back mismatch: SRC untouched; a re-run replaced it and left nothing behind", flush=True)
    new_arch, new = loaded_state(os.path.join(work, "ref"))
    for point, expect in POINTS.items():
        arch, state = loaded_state(dirs[point])
        assert (arch, state.keys()) == ((old_arch, old.keys()) if expect == "old" else (new_arch, new.keys()))
        assert same(state, old if expect == "old" else new), f"{point}: SRC does not hold the {expect} weights"
        if expect == "old":  # a re-run settles the interrupted swap and finishes the job
            assert prune_cli.run(parse(["--load", dirs[point], "--in-place", "--scores", scores,
                                        "--target", *TARGETS])) == 0
        else:
            recover_interrupted_rewrite(rewrite_paths(dirs[point]))
        assert same(loaded_state(dirs[point])[1], new), point
        leftovers = entries(os.path.dirname(dirs[point]))
        assert leftovers == ["SRC"], f"{point}: left {leftovers}"
        print(f"crash at {point}: SRC held the {expect} checkpoint; settled to the pruned one", flush=True)


def tp2(work):
    rt = init_distributed(2, 1)
    set_seed(7)
    model = build_gpt(ARCH, Parallel(tensor_model_parallel_size=2))
    root = os.path.join(work, "root")
    checkpoint.save_checkpoint(root, 3, [model], arch=ARCH, save_rng=False)
    scores_path = os.path.join(work, "scores_tp2.pt")
    g = torch.Generator().manual_seed(2)
    scores = ImportanceScores(settings=ImportanceSettings(), heads=torch.rand(3, 4, generator=g).double(),
                              groups=torch.zeros(3, 2).double(), neurons=torch.rand(3, 48, generator=g).double(),
                              hidden=torch.rand(32, generator=g).double(),
                              layers={"bi": torch.rand(3, generator=g).double()}, num_samples=4)
    if rt.is_rank0:
        scores.save(scores_path)
    torch.distributed.barrier()
    plan = make_plan(scores, ARCH, PruneTargets(hidden_size=24, ffn_hidden_size=32, num_attention_heads=2,
                                                num_layers=2), tp=2)
    expected = prune_model_state(model, plan)
    assert prune_cli.run(parse(["--load", root, "--in-place", "--tp", "2", "--scores", scores_path,
                                "--target", *TARGETS])) == 0
    pruned = build_gpt(plan.target, Parallel(tensor_model_parallel_size=2))
    checkpoint.load_weights(root, [pruned], arch=plan.target)
    for k, v in pruned.state_dict().items():
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state"):
            assert torch.equal(v, expected[k]), k
    assert entries(root) == ["iter_0000003", "latest"], os.listdir(root)
    print(f"rank {rt.rank}: TP2 in-place rewrite of {root} holds the trimmed shards", flush=True)


if __name__ == "__main__":
    mode, work = sys.argv[1], sys.argv[2]
    {"crash": crash, "tp2": tp2}[mode](work)
