"""Run NVIDIA Megatron-LM's own training-side code (vendored, unmodified, under ./vendor) on CPU/gloo.

Two operations, each launched like a user's ``torchrun pretrain_gpt.py ...`` run:

  torchrun --nproc-per-node N harness.py write ROOT --iteration 7 [--train-steps 1] [--norm-noise S]
          [--dump F] -- FLAGS
      Megatron-LM initialises from a pretrain_gpt.py command line (FLAGS: the model's architecture and
      parallelism, as a user would pass them), builds GPTModel, optimizer and scheduler with its own
      ``setup_model_and_optimizer(model_provider, ...)``, optionally sets every norm weight to 1 + N(0, S)
      (``perturb_norms``), optionally runs real ``train_step``s of pretrain_gpt's ``forward_step`` on a fixed
      batch, then calls its real ``save_checkpoint``.

  torchrun --nproc-per-node N harness.py load ROOT --dump F [--check-rng] [-- FLAGS] [--then load ...]
      Megatron-LM builds the model from the checkpoint's own args (``--use-checkpoint-args``, the way a user
      resumes a checkpoint whose architecture the command line does not repeat) and loads it with
      ``--load ROOT`` and default flags (no --no-load-rng / --no-load-optim / --finetune): its real
      ``setup_model_and_optimizer`` calls its real ``load_checkpoint``.

Both dump (rank 0, torch.save) {"iteration", "args", "tp", "tensors": {sharded key: full tensor},
"optimizer": {sharded key: full tensor} (None when the optimizer holds no state), "logits": full-vocabulary
logits [b, s, V] on ``fixed_tokens()`` (None with PP > 1)}; load adds "checkpoint_iteration" (common.pt's)
and "scheduler".
``tensors`` are assembled from the model's own ``sharded_state_dict()`` - the layout torch_dist stores,
independent of TP - so dumps taken at different TP sizes compare directly, and compare directly with a
checkpoint read by plain ``torch.distributed.checkpoint`` (``read_checkpoint_tensors``).

write runs one train step by default: Megatron-LM cannot load its own checkpoint saved before any step (the
empty Adam state is not in the file, and its non-release load always loads the optimizer). That step runs at
the warmup's first learning rate, 0, so it moves no weight: norm weights stay at their initial ones, where a
norm applied to the wrong channels, swapped with another or dropped gives the same logits; ``--norm-noise``
makes them differ, as a trained model's do.

What is stubbed, and why (only here, never in the vendored files):
  * CUDA: megatron_minitron.runtime.cpu_mode redirects megatron-core's hard-wired CUDA calls to the CPU.
    During ``initialize_megatron`` each rank reports one device (a GPU node's view) so that Megatron-LM's
    own ``_initialize_distributed`` creates the model-parallel groups and ``_set_random_seed`` seeds the
    model-parallel RNG tracker (both are skipped when ``torch.cuda.device_count() == 0``);
    ``torch.cuda.set_device`` is a no-op and ``get_device_properties`` says compute capability 9.0
    meanwhile. CUDA streams (get_model builds DDP on a side stream) are no-op objects.
  * ``initialize._compile_dependencies``: it runs ``make`` on megatron-core's dataset helpers (the
    installed wheel ships them prebuilt, without the Makefile) and builds the CUDA fused kernels with nvcc.
  * Services (one_logger, wandb, tensorboard, nvidia_resiliency_ext fault tolerance) are off by default in
    Megatron-LM's arguments and are not installed; nothing needs stubbing for them.
``validate_args`` runs unchanged; the command line picks the CPU-capable implementations
(``--transformer-impl local``, no fused kernels, ``--distributed-backend gloo``) - see ``CPU_FLAGS``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
# Megatron-LM's code: the vendored copy (core_v0.16.1, what CI runs), or a Megatron-LM checkout at another
# core_v* tag named by MINITRON_MEGATRON_LM_SRC, run against that tag's megatron-core
# (tests/compat/run_with_megatron_lm.sh): a user who installs Megatron-LM today writes its checkpoints.
MEGATRON_LM_SRC = os.environ.get("MINITRON_MEGATRON_LM_SRC")
VENDOR = os.path.abspath(MEGATRON_LM_SRC) if MEGATRON_LM_SRC else os.path.join(HERE, "vendor")
VENDORED_CORE = "0.16.1"


def megatron_lm_core_version():
    """The megatron-core version the Megatron-LM code in VENDOR was released with."""
    if not MEGATRON_LM_SRC:
        return VENDORED_CORE
    import re

    with open(os.path.join(VENDOR, "megatron", "core", "package_info.py")) as f:
        info = dict(re.findall(r'^(MAJOR|MINOR|PATCH|PRE_RELEASE) = "?([^"\n]*)"?$', f.read(), re.M))
    return f"{info['MAJOR']}.{info['MINOR']}.{info['PATCH']}{info['PRE_RELEASE']}"

# Implementation choices a CPU run needs; none of them changes what a checkpoint holds.
CPU_FLAGS = [
    "--distributed-backend", "gloo",
    "--transformer-impl", "local",        # megatron-core's local spec (no Transformer Engine)
    "--no-gradient-accumulation-fusion",  # fused wgrad accumulation is a CUDA kernel
    "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
]
# A small pretrain_gpt.py run; the tests add the architecture and parallelism.
RUN_FLAGS = [
    "--micro-batch-size", "2", "--train-iters", "100", "--lr", "1e-3", "--min-lr", "1e-4",
    "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--clip-grad", "1.0",
    "--seed", "1234", "--eval-iters", "0", "--save-interval", "1000",
]
FIXED_BATCH_SEED = 4321


def import_megatron_lm():
    """Make VENDOR's ``megatron.training`` (and pretrain_gpt.py's helpers) importable beside the installed
    megatron-core. ``megatron`` is a namespace package (no __init__.py, in the wheel or in Megatron-LM), so
    adding VENDOR to sys.path adds a portion."""
    # megatron.core first: a checkout holds one too, and a >= 0.17 wheel a megatron.training, neither of
    # which may win over the one under test (the namespace takes each subpackage from the first path holding it)
    import megatron
    import megatron.core

    if VENDOR not in sys.path:
        sys.path.insert(0, VENDOR)
    assert not hasattr(megatron, "__file__") or megatron.__file__ is None, "megatron must stay a namespace"
    assert not megatron.core.__file__.startswith(VENDOR), megatron.core.__file__
    from megatron.core.package_info import __version__

    expected = megatron_lm_core_version()
    assert __version__ == expected, f"Megatron-LM in {VENDOR} is core_v{expected}'s; megatron-core is {__version__}"
    if sys.version_info < (3, 12):
        # Megatron-LM >= core_v0.17 needs Python 3.12 for this one name; it only marks methods (PEP 698)
        import typing

        import typing_extensions

        if not hasattr(typing, "override"):
            typing.override = typing_extensions.override
    import megatron.training

    assert megatron.training.__file__.startswith(VENDOR), megatron.training.__file__


@contextlib.contextmanager
def one_device_per_rank():
    import torch

    saved = torch.cuda.device_count, torch.cuda.set_device, torch.cuda.get_device_properties
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *a, **k: None
    # validate_args asks for the compute capability (Hopper, as on H100 nodes)
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(major=9, minor=0, name="cpu")
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device, torch.cuda.get_device_properties = saved


def stub_cuda_streams():
    """Megatron-LM's get_model builds DDP on a side CUDA stream; on the CPU every op is ordered already."""
    import torch

    from megatron_minitron.runtime.cpu_mode import HostStream

    torch.cuda.Stream = lambda *a, **k: HostStream()
    torch.cuda.current_stream = lambda *a, **k: HostStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()


def initialize(flags):
    """Megatron-LM's initialize_megatron on a pretrain_gpt.py command line (same args_defaults)."""
    from megatron_minitron.runtime import cpu_mode

    cpu_mode.enable()
    stub_cuda_streams()
    import_megatron_lm()
    from megatron.training import initialize as mlm_initialize

    mlm_initialize._compile_dependencies = lambda: None
    sys.argv = ["pretrain_gpt.py", *CPU_FLAGS, *RUN_FLAGS, *flags]
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # validate_args requires it for TP > 1 (as its examples set)
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    from megatron.training import arguments as mlm_arguments

    global _CONFIG_CONTAINER
    with one_device_per_rank():
        if hasattr(mlm_arguments, "parse_and_validate_args"):
            # core_v0.18+'s pretrain_gpt.py parses and validates first; 0.19 builds the model from a config
            # container made of the args (gpt_config_from_args), 0.18 still from the model provider
            args = mlm_arguments.parse_and_validate_args(args_defaults=defaults)
            if _builds_from_config_container():
                from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args

                _CONFIG_CONTAINER = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
            mlm_initialize.initialize_megatron(allow_no_cuda=True)
        else:
            mlm_initialize.initialize_megatron(args_defaults=defaults, allow_no_cuda=True)
    from megatron.training import get_args

    return get_args()


_CONFIG_CONTAINER = None  # core_v0.19: what pretrain() builds the model from


def _builds_from_config_container():
    import inspect

    from megatron.training.training import setup_model_and_optimizer as mlm_setup

    return "cfg_container" in inspect.signature(mlm_setup).parameters


def setup_model_and_optimizer():
    """Megatron-LM's setup_model_and_optimizer, called as its pretrain() calls it for pretrain_gpt.py."""
    from functools import partial

    from megatron.core.enums import ModelType
    from megatron.training.training import setup_model_and_optimizer as mlm_setup

    if _CONFIG_CONTAINER is not None:
        from megatron.core.process_groups_config import ProcessGroupCollection

        return mlm_setup(ModelType.encoder_or_decoder, checkpointing_context={}, cfg_container=_CONFIG_CONTAINER,
                         pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    from gpt_builders import gpt_builder
    from model_provider import model_provider

    return mlm_setup(partial(model_provider, gpt_builder), ModelType.encoder_or_decoder, checkpointing_context={})


def fixed_tokens(batch=2, seq=32, vocab=256, seed=FIXED_BATCH_SEED):
    """The tokens [b, s] every dump's logits are computed on (any tokenizer with >= 256 entries)."""
    import torch

    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def train_steps(model, optimizer, opt_param_scheduler, args, steps):
    """Real Megatron-LM train_step calls with pretrain_gpt.py's forward_step on fixed batches."""
    import pretrain_gpt
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.core.utils import get_model_config
    from megatron.training.training import train_step

    config = get_model_config(model[0])
    for step in range(steps):
        text = fixed_tokens(args.micro_batch_size, args.seq_length + 1, seed=step)
        # one micro-batch per step (global batch = micro batch x DP), shaped like GPTDataset's items
        batch = {"tokens": text[:, :-1], "labels": text[:, 1:],
                 "loss_mask": torch.ones(text.shape[0], text.shape[1] - 1),
                 "position_ids": torch.arange(args.seq_length).expand(text.shape[0], -1)}
        if args.create_attention_mask_in_dataloader:  # GPTDataset's causal mask (True = masked); TP ranks > 0
            causal = torch.tril(torch.ones(args.seq_length, args.seq_length)) < 0.5  # expect it broadcast
            batch["attention_mask"] = causal.expand(text.shape[0], 1, -1, -1).contiguous()
        data = RerunDataIterator(iter([batch]))
        result = train_step(pretrain_gpt.forward_step, data, model, optimizer, opt_param_scheduler, config,
                            get_forward_backward_func())
        loss_dict, skipped = result[0], result[1]
        assert not skipped, "Megatron-LM skipped the step"
        args.consumed_train_samples += args.global_batch_size
        rank0_print(f"step {step}: {({k: float(v) for k, v in loss_dict.items()})}")


def full_logits(model, tokens):
    """Full-vocabulary logits [b, s, V] (PP=1) from the unwrapped GPTModel."""
    import torch
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.utils import unwrap_model  # megatron.training.utils had it up to core_v0.18

    gpt = unwrap_model(model)[0]
    was_training = gpt.training
    gpt.eval()
    with torch.no_grad():
        b, s = tokens.shape
        out = model[0](tokens, torch.arange(s).expand(b, s), None)  # [b, s, V/tp] through any wrappers
        logits = gather_from_tensor_model_parallel_region(out.float())
    gpt.train(was_training)
    return logits


def global_tensors(sharded_state_dict):
    """{sharded key: full tensor} of a (model or optimizer) sharded state dict: every rank's shards placed by
    their ShardedTensor offsets, gathered to rank 0 (None elsewhere). That is the layout torch_dist stores
    (layers stacked on the first axis), whatever the TP size."""
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    pieces = []
    for item in nested_values(sharded_state_dict):
        items = list(nested_values(item.build())) if isinstance(item, ShardedTensorFactory) else [item]
        for sh in items:
            if not isinstance(sh, ShardedTensor) or sh.key.endswith("_extra_state"):
                continue
            assert sh.flattened_range is None, f"{sh.key}: flattened (distributed-optimizer) shards"
            # local_shape omits the prepended axes (the layer index of stacked layers)
            local = sh.data.detach().float().cpu().reshape((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
            pieces.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), local.clone()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    if dist.get_rank() != 0:
        return None
    full = {}
    for rank_pieces in gathered:
        for key, shape, offset, local in rank_pieces:
            dest = full.setdefault(key, torch.full(shape, float("nan")))
            dest[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))] = local
    for key, tensor in full.items():
        assert not torch.isnan(tensor).any(), f"{key}: the shards do not cover the global tensor"
    return full


def model_and_optimizer_tensors(model, optimizer, args):
    """Model and optimizer-state tensors in the keys save_checkpoint stores them under (optimizer: None when
    it holds no state, e.g. before a step or after a weights-only load)."""
    from megatron.training.checkpointing import _build_sharded_state_dict_metadata
    from megatron.core.utils import unwrap_model  # megatron.training.utils had it up to core_v0.18

    metadata = _build_sharded_state_dict_metadata(args)  # what save_checkpoint passes
    chunk_sds = [chunk.sharded_state_dict(metadata=metadata) for chunk in unwrap_model(model)]
    model_sd = {}
    for chunk_sd in chunk_sds:
        model_sd.update(chunk_sd)
    tensors = global_tensors(chunk_sds)  # virtual chunks share keys (their layers' offsets differ)
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])] if optimizer else []
    optim = None
    if any(len(o.state) for o in inner):
        optim = global_tensors(optimizer.sharded_state_dict(model_sd, metadata=metadata))
    return tensors, optim


def read_checkpoint_tensors(iteration_dir):
    """{key: tensor} of a torch_dist checkpoint read by plain torch.distributed.checkpoint (no megatron):
    the tensors only (ShardedObjects such as rng_state are stored as bytes and skipped)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(iteration_dir)
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    load(state, storage_reader=reader, no_dist=True)
    return state


def dump(path, model, optimizer, args, **record):
    """rank 0 writes {"tensors", "optimizer" (None when it holds no state), "logits" on fixed_tokens(), "args",
    "tp", **record}."""
    import torch
    import torch.distributed as dist

    # full_logits runs one stage as the whole model: only meaningful (and only possible) without PP
    logits = full_logits(model, fixed_tokens()) if args.pipeline_model_parallel_size == 1 else None
    tensors, optim = model_and_optimizer_tensors(model, optimizer, args)
    if dist.get_rank() == 0:
        tmp = path + ".tmp"
        torch.save({**record, "args": vars(args).copy(), "tensors": tensors, "optimizer": optim,
                    "logits": logits, "tp": args.tensor_model_parallel_size}, tmp)
        os.replace(tmp, path)
    dist.barrier()


def rank0_print(*a):
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print("[megatron-lm]", *a, flush=True)


def perturb_norms(model, optimizer, std):
    """Every norm weight (input / pre-MLP / final layernorms, q/k layernorms) := 1 + N(0, std), drawn from a
    generator seeded by the parameter's name so that every rank sets the same values on its replica (norms
    are replicated over TP and DP). In place: DDP's buffers hold the parameters; the optimizer's main copies
    (bf16 runs) are refreshed from them."""
    import zlib

    import torch
    from megatron.core.utils import unwrap_model  # megatron.training.utils had it up to core_v0.18

    with torch.no_grad():
        for chunk in unwrap_model(model):
            for name, p in chunk.named_parameters():
                if name.endswith(".weight") and "layernorm" in name:
                    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    p.copy_(1 + std * torch.randn(p.shape, generator=gen))
    optimizer.reload_model_params()


def write(opts, flags):
    args = initialize(["--save", opts.root, *flags])
    model, optimizer, opt_param_scheduler = setup_model_and_optimizer()
    if opts.norm_noise:
        perturb_norms(model, optimizer, opts.norm_noise)
    if opts.train_steps:
        train_steps(model, optimizer, opt_param_scheduler, args, opts.train_steps)
    from megatron.training.checkpointing import save_checkpoint

    save_checkpoint(opts.iteration, model, optimizer, opt_param_scheduler,
                    num_floating_point_operations_so_far=1000 * opts.iteration)
    if opts.dump:
        dump(opts.dump, model, optimizer, args, iteration=opts.iteration)
    rank0_print(f"wrote {opts.root} iteration {opts.iteration}")


def rng_state_as_load_checkpoint_requests(root, args):
    """The checkpoint's rng_state read with the request load_checkpoint builds (its get_rng_state ShardedObject),
    applied the way load_checkpoint applies it, except the CUDA generator state (cpu_mode maps the CUDA
    generator to the CPU one; its shape is checked instead). Returns a summary, or the error as a string.
    load_checkpoint itself skips the RNG when the checkpoint's args say no_save_rng (our CPU-made saves)."""
    import random

    import numpy as np
    import torch
    from megatron.core import dist_checkpointing, mpu, tensor_parallel
    from megatron.training.checkpointing import (get_checkpoint_name, get_checkpoint_tracker_filename,
                                                 get_rng_state, read_metadata)

    iteration, release = read_metadata(get_checkpoint_tracker_filename(root))
    directory = get_checkpoint_name(root, iteration, release, return_base_dir=True)
    request = {"rng_state": get_rng_state(args.ckpt_format, mpu.get_tensor_model_parallel_group(),
                                          mpu.get_pipeline_model_parallel_group())}
    own_tracker = sorted(tensor_parallel.get_cuda_rng_tracker().get_states())  # what a Megatron-LM run has
    try:
        state = dist_checkpointing.load(request, directory)["rng_state"][0]
        random.setstate(state["random_rng_state"])
        np.random.set_state(state["np_rng_state"])
        torch.set_rng_state(state["torch_rng_state"])
        tracker = {k: tensor_parallel.convert_cuda_rng_state(v, to_graphable=False)
                   for k, v in state["rng_tracker_states"].items()}
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
        cuda = state["cuda_rng_state"]
        return {"keys": sorted(state), "tracker": sorted(tracker), "megatron_lm_tracker": own_tracker,
                "cuda_rng_state": (cuda.dtype, tuple(cuda.shape))}
    except Exception as e:  # reported to the test, which fails with it
        return f"{type(e).__name__}: {e}"


def load(opts, flags):
    args = initialize(["--load", opts.root, "--use-checkpoint-args", *flags])
    checkpoint_iteration = args.iteration  # common.pt's, read by --use-checkpoint-args
    model, optimizer, opt_param_scheduler = setup_model_and_optimizer()  # calls load_checkpoint
    rng = rng_state_as_load_checkpoint_requests(opts.root, args) if opts.check_rng else None
    dump(opts.dump, model, optimizer, args, iteration=args.iteration, checkpoint_iteration=checkpoint_iteration,
         scheduler=opt_param_scheduler.state_dict(), consumed_train_samples=args.consumed_train_samples, rng=rng)
    rank0_print(f"loaded {opts.root} iteration {args.iteration}")


def parse_run(argv):
    flags = []
    if "--" in argv:
        at = argv.index("--")
        argv, flags = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("op", choices=["write", "load"])
    parser.add_argument("root")
    parser.add_argument("--iteration", type=int, default=7)
    parser.add_argument("--train-steps", type=int, default=1)
    parser.add_argument("--norm-noise", type=float, default=0.0,
                        help="write: norm weights := 1 + N(0, this) before the train steps (perturb_norms)")
    parser.add_argument("--dump")
    parser.add_argument("--check-rng", action="store_true",
                        help="load: also read rng_state with load_checkpoint's request (dump['rng'])")
    opts = parser.parse_args(argv)
    if opts.op == "load" and not opts.dump:
        parser.error("load needs --dump")
    return opts, flags


def main(argv=None):
    """One run, or several separated by ``--then`` in one launch (imports are most of a run's time): between
    runs Megatron-LM's own destroy_global_state() resets its globals, as its unit tests do."""
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = [[]]
    for arg in argv:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    sys.path.insert(0, REPO_ROOT)
    for i, run in enumerate(runs):
        opts, flags = parse_run(run)
        if i:
            from megatron.training.training import destroy_global_state

            destroy_global_state()
        (write if opts.op == "write" else load)(opts, flags)


if __name__ == "__main__":
    main()
