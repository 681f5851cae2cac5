"""Checkpoints in Megatron-LM's layout (format="megatron-lm"), real dist checkpoints on CPU.

`python checkpoint_megatron_lm_worker.py crash WORKDIR`: one process; each save runs in a forked child that
dies (MINITRON_TEST_CRASH_AT) at one point of the commit sequence, another child checks what loads.
  save    save_checkpoint(format="megatron-lm") with optimizer state: the tracker always names a complete
          iteration holding exactly the tensors saved there; keep_last purges; an interrupted replace loads
          through its aside copy
  prune   `prune --in-place` of a Megatron-LM-written root (our files stripped from a save in that layout):
          killed at every point, the root loads the source or the pruned weights; a re-run settles it to
          ROOT/release + tracker "release" and the source iteration is gone

`torchrun --nproc-per-node 2 checkpoint_megatron_lm_worker.py reshard WORKDIR`: a training state saved at
TP2 through the Trainer with train.save_format=megatron-lm resumes at TP1 (DP2) and at TP2: logits at save,
the next two losses of the run that never stopped (optimizer resharded), RNG restored at TP2 only; the same
checkpoint stripped of our files (as Megatron-LM writes it) and a weights-only release read at TP1 give equal
logits; common.pt holds what Megatron-LM's load_checkpoint reads.
"""
import os
import random
import shutil
import sys

import numpy as np
import torch

from megatron_minitron import checkpoint
from megatron_minitron.checkpoint import layout
from megatron_minitron.checkpoint import megatron_lm as mlm
from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed, set_seed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

ARCH = ModelArch(num_layers=3, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=16)
TRACKER = layout.TRACKER_FILE


def entries(path):
    """A directory's entries without our lock files (they stay behind by design, see checkpoint/lock.py)."""
    from megatron_minitron.checkpoint.lock import is_lock_file

    return sorted(name for name in os.listdir(path) if not is_lock_file(name))


def strip_ours(directory):
    """A directory as Megatron-LM writes it: without our minitron.yaml, COMMIT and MANIFEST.json."""
    from megatron_minitron.checkpoint.integrity import MANIFEST_FILE

    for name in (layout.METADATA_FILE, layout.COMMIT_FILE, MANIFEST_FILE):
        os.remove(os.path.join(directory, name))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def with_optimizer(arch, seed):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    set_seed(seed)
    model = build_gpt(arch, Parallel())
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False),
        model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                                                       params_dtype=torch.float32), [ddp])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=1,
                                        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=10, wd_incr_style="constant")
    return model, optimizer, scheduler


def loaded(path, arch=None):
    arch = arch or checkpoint.read_arch(path)
    model = build_gpt(arch, Parallel())
    checkpoint.load_weights(path, [model], arch=arch)  # strict shapes
    return arch, weights(model)


# ------------------------------------------------------------------------------------------ crash (1 process)
def check_save_crashes(work):
    from prune_inplace_worker import in_child

    root = os.path.join(work, "save_root")
    refs = os.path.join(work, "save_refs")
    os.makedirs(refs)

    def save(iteration, seed, keep_last=None):
        init_distributed(1, 1)
        model, optimizer, scheduler = with_optimizer(ARCH, seed)
        torch.save(weights(model), os.path.join(refs, f"{iteration}_{seed}.pt"))
        checkpoint.save_checkpoint(root, iteration, [model], arch=ARCH, optimizer=optimizer, scheduler=scheduler,
                                   keep_last=keep_last, format="megatron-lm")

    def expect(iteration, seed):
        init_distributed(1, 1)
        with open(os.path.join(root, TRACKER)) as f:
            assert f.read() == str(iteration)
        assert checkpoint.latest_iteration(root) == iteration
        model, optimizer, scheduler = with_optimizer(ARCH, seed + 1000)
        extra = checkpoint.load_checkpoint(root, [model], optimizer=optimizer, scheduler=scheduler, arch=ARCH)
        assert extra["iteration"] == iteration, extra
        assert same(weights(model), torch.load(os.path.join(refs, f"{iteration}_{seed}.pt"))), iteration

    def dirs():
        return entries(root)

    assert in_child(lambda: save(1, 11)) == 0
    survivor = (1, 11)
    for point, iteration, seed, after in [("before_rename", 2, 12, (1, 11)), ("before_latest", 2, 12, (1, 11)),
                                          ("before_purge", 3, 13, (3, 13)), ("after_aside", 3, 14, (3, 13))]:
        def check_then_crash():
            expect(*survivor)
            os.environ[layout.CRASH_ENV] = point
            save(iteration, seed)
        code = in_child(check_then_crash)
        assert code == 86, f"expected the injected crash at {point} (exit 86), got exit {code}"
        survivor = after
        print(f"megatron-lm save crash at {point}: root holds {dirs()}", flush=True)
    assert "iter_0000002" in dirs() and ".old.iter_0000003" in dirs() and "iter_0000003" not in dirs()

    def finish():
        expect(3, 13)  # through the aside copy of the interrupted replace
        save(4, 15, keep_last=1)
        expect(4, 15)
        assert dirs() == ["iter_0000004", TRACKER], dirs()
    assert in_child(finish) == 0
    print("megatron-lm save: every interrupted save left the previous checkpoint loadable", flush=True)


def check_prune_in_place_crashes(work):
    from prune_inplace_worker import ARCH as P_ARCH, TARGETS, in_child, parse

    from megatron_minitron.prune import ImportanceScores, ImportanceSettings
    from megatron_minitron.prune import cli as prune_cli
    from megatron_minitron.prune.rewrite import recover_interrupted_rewrite, rewrite_paths

    src = os.path.join(work, "mlm_src")
    scores = os.path.join(work, "scores.pt")

    def make_source():
        init_distributed(1, 1)
        model, optimizer, scheduler = with_optimizer(P_ARCH, 5)
        out = checkpoint.save_checkpoint(src, 100, [model], arch=P_ARCH, optimizer=optimizer,
                                         scheduler=scheduler, format="megatron-lm")
        strip_ours(out)  # now exactly what Megatron-LM leaves: tracker "100", iter_0000100 without our files
        g = torch.Generator().manual_seed(1)
        ImportanceScores(settings=ImportanceSettings(), heads=torch.rand(3, 4, generator=g).double(),
                         groups=torch.zeros(3, 2).double(), neurons=torch.rand(3, 48, generator=g).double(),
                         hidden=torch.rand(32, generator=g).double(),
                         layers={"bi": torch.rand(3, generator=g).double()}, num_samples=4).save(scores)
        ref = os.path.join(work, "mlm_ref")
        assert prune_cli.run(parse(["--load", src, "--save", ref, "--scores", scores, "--target", *TARGETS])) == 0
        assert entries(ref) == ["latest_checkpointed_iteration.txt", "release"], os.listdir(ref)

    assert in_child(make_source) == 0, "building the Megatron-LM source failed"
    # crash point -> (what the root then loads, what a later run must do)
    points = {"prune_after_write": "old", "prune_after_aside": "old", "prune_before_pointer": "old",
              "prune_before_delete": "new", None: "new"}
    roots = {}
    for point in points:
        roots[point] = os.path.join(work, f"mlm_case_{point}")
        shutil.copytree(src, roots[point])

        def run():
            if point is not None:
                os.environ[layout.CRASH_ENV] = point
            init_distributed(1, 1)
            prune_cli.run(parse(["--load", roots[point], "--in-place", "--scores", scores, "--target", *TARGETS]))
        code = in_child(run)
        assert code == (0 if point is None else 86), f"{point}: exit code {code}"

    def verify():
        init_distributed(1, 1)
        old_arch, old = loaded(src)
        new_arch, new = loaded(os.path.join(work, "mlm_ref"))
        assert checkpoint.read_metadata(os.path.join(work, "mlm_ref"))["format"] == "megatron-lm"
        for point, expect in points.items():
            root = roots[point]
            arch, state = loaded(root)
            assert same(state, old if expect == "old" else new), f"{point}: root does not hold the {expect} weights"
            if expect == "old":  # a re-run settles the interrupted rewrite and finishes the job
                assert prune_cli.run(parse(["--load", root, "--in-place", "--scores", scores,
                                            "--target", *TARGETS])) == 0
            else:
                recover_interrupted_rewrite(rewrite_paths(root, "megatron-lm"))
            arch, state = loaded(root)
            assert arch == new_arch and same(state, new), point
            with open(os.path.join(root, TRACKER)) as f:
                assert f.read() == "release", point
            left = entries(root)
            # a crash between moving the tracker and deleting the source leaves the source iteration behind
            want = ["iter_0000100", TRACKER, "release"] if point == "prune_before_delete" else [TRACKER, "release"]
            assert left == want, f"{point}: left {left}"
            meta = checkpoint.read_metadata(root)
            assert meta["format"] == "megatron-lm" and meta["contents"]["release"] and not meta["contents"]["optimizer"]
            print(f"megatron-lm prune crash at {point}: root held the {expect} weights; settled to release",
                  flush=True)
    assert in_child(verify) == 0


# ------------------------------------------------------------------------------------------ reshard (2 ranks)
def reshard(work):
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from torch.distributed.checkpoint import FileSystemReader

    from checkpoint_reshard_worker import ARCH as arch
    from checkpoint_reshard_worker import GLOBAL_BATCH, config, everywhere, rng_equal, steps
    from helpers import SyntheticTokens, full_logits
    from megatron_minitron.checkpoint.state import collect_rng_state
    from megatron_minitron.train.loop import Trainer

    root = os.path.join(work, "run")
    ds = SyntheticTokens(64, arch.seq_length, arch.vocab_size, seed=3)
    probe = torch.stack([ds[i]["tokens"] for i in range(3)])

    def cfg(tp):
        c = config(tp, 1, root)
        c.train.save_format = "megatron-lm"
        return c

    init_distributed(2, 1)
    set_seed(7)
    run = Trainer(cfg(2), datasets=(ds, None)).setup()
    steps(run, 1)
    random.random(), np.random.rand(), torch.rand(dist.get_rank() + 1)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(1)
    rng_at_save = collect_rng_state()
    saved = run.save()
    assert saved == os.path.join(os.path.abspath(root), "iter_0000001"), saved
    logits_at_save = everywhere(full_logits(run.unwrapped()[0], probe))
    release_root = os.path.join(work, "weights_only")
    release = checkpoint.save_checkpoint_to(release_root, run.unwrapped(), arch=arch, format="megatron-lm")
    continued = steps(run, 2)

    if dist.get_rank() == 0:  # what Megatron-LM's load_checkpoint reads
        with open(os.path.join(root, TRACKER)) as f:
            assert f.read() == "1"
        from megatron.core.dist_checkpointing import load_common_state_dict  # common.pt, or in the shards (>= 0.19)
        common = load_common_state_dict(saved)
        args = common["args"]
        assert common["checkpoint_version"] == 3.0 and common["iteration"] == 1
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.world_size,
                args.data_parallel_size) == (2, 1, 2, 1)
        assert args.consumed_train_samples == GLOBAL_BATCH and args.iteration == 1
        assert not args.no_save_optim and args.use_distributed_optimizer
        # saved for our resume, but CPU generator states: Megatron-LM (restoring CUDA ones) is told to skip them
        assert args.no_save_rng is True and not torch.cuda.is_available()
        assert args.global_batch_size == GLOBAL_BATCH  # and the scheduler in its units (samples)
        assert common["opt_param_scheduler"]["num_steps"] == GLOBAL_BATCH
        assert common["opt_param_scheduler"]["lr_warmup_steps"] == GLOBAL_BATCH * 1
        assert mlm.arch_from_args(args) == arch
        assert common["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
        assert "opt_param_scheduler" in common and "num_floating_point_operations_so_far" in common
        keys = FileSystemReader(saved).read_metadata().state_dict_metadata
        # ShardedObjects are stored as KEY/shard_<offsets>_<grid>: one RNG object per (PP, TP) rank
        assert sorted(k for k in keys if k.startswith("rng_state/")) == ["rng_state/shard_0.0_1.2",
                                                                          "rng_state/shard_0.1_1.2"]
        assert any(k.startswith("optimizer.state.exp_avg.decoder.layers") for k in keys)
        # TE names for the fused norms, as Megatron-LM's default (TE) spec writes them
        assert any(k.endswith("self_attention.linear_qkv.layer_norm_weight") for k in keys), sorted(keys)[:20]
        assert any(k.endswith("mlp.linear_fc1.layer_norm_weight") for k in keys)
        assert entries(release_root) == [TRACKER, "release"]
        with open(os.path.join(release_root, TRACKER)) as f:
            assert f.read() == "release"
        rel = load_common_state_dict(release)
        assert rel["args"].no_save_optim and rel["args"].no_save_rng and "optimizer" not in rel
        foreign = os.path.join(work, "as_megatron_lm_wrote_it")
        shutil.copytree(root, foreign)
        strip_ours(os.path.join(foreign, "iter_0000001"))
    dist.barrier()
    foreign = os.path.join(work, "as_megatron_lm_wrote_it")
    print(f"rank {dist.get_rank()}: TP2 saved {saved} and {release}, continued losses {continued}", flush=True)

    for tp in (1, 2):
        tag = f"TP{tp}"
        init_distributed(tp, 1)
        set_seed(1000 + tp)  # other initial weights and RNG: only the checkpoint can make them match
        resumed = Trainer(cfg(tp), datasets=(ds, None)).setup()  # resumes from the tracker
        assert (resumed.state.iteration, resumed.state.consumed_samples) == (1, GLOBAL_BATCH), tag
        restored = rng_equal(collect_rng_state(), rng_at_save)
        assert restored == (tp == 2), f"{tag}: RNG restored={restored}"
        diff = (everywhere(full_logits(resumed.unwrapped()[0], probe)) - logits_at_save).abs().max().item()
        assert diff < 1e-5, f"{tag}: logits differ from the TP2 ones at save by {diff}"
        losses = steps(resumed, 2)
        for i, (a, b) in enumerate(zip(losses, continued)):
            assert abs(a - b) < 1e-5, f"{tag}: loss of step {i + 2} is {a}, the uninterrupted run had {b}"
        for path in (foreign, release_root):  # Megatron-LM-written (no files of ours) and weights-only release
            meta = checkpoint.read_metadata(path)
            assert meta["format"] == "megatron-lm" and checkpoint.arch_from_metadata(meta) == arch, path
            model = build_gpt(arch, Parallel(tensor_model_parallel_size=tp))
            checkpoint.load_weights(path, [model], arch=arch)
            diff = (everywhere(full_logits(model, probe)) - logits_at_save).abs().max().item()
            assert diff < 1e-5, f"{tag}: {path} loads logits that differ by {diff}"
        meta = checkpoint.read_metadata(foreign)
        assert meta["iteration"] == 1 and meta["contents"]["optimizer_sharding"] == "fully_reshardable"
        if dist.get_rank() == 0:
            print(f"{tag}: resumed from the Megatron-LM-format root: logits match, next losses {losses}", flush=True)
    dist.barrier()
    if dist.get_rank() == 0:
        print("MEGATRON-LM RESHARD OK", flush=True)


if __name__ == "__main__":
    mode, work = sys.argv[1], sys.argv[2]
    if mode == "crash":
        from prune_inplace_worker import preimport
        preimport()
        check_save_crashes(work)
        check_prune_in_place_crashes(work)
        print("MEGATRON-LM CRASH OK", flush=True)
    elif mode == "reshard":
        reshard(work)
    else:
        raise SystemExit(f"unknown mode {mode}: crash or reshard")
