"""Enough disk for a save, checked before it starts: a full disk otherwise shows up minutes later as an
error deep inside the checkpoint library, with half a checkpoint written.

The estimate is the bytes the tensors will take: weights in their dtype, plus 12 bytes per parameter for an
Adam optimizer's fp32 main copy and two moments (megatron keeps fp32 copies of bf16 weights), scaled from
this rank's shard to the whole model (TP x PP shards; DP replicas are written once), plus 5% for metadata.
"""
from __future__ import annotations

import os
import shutil

import torch

ADAM_BYTES_PER_PARAM = 12
MARGIN = 1.05
SKIP_ENV = "MINITRON_SKIP_SPACE_CHECK"  # for tests that fill a disk on purpose, and for exotic filesystems


def local_tensor_bytes(model_chunks: list, with_optimizer: bool) -> int:
    seen, total = set(), 0
    for chunk in model_chunks:
        for param in chunk.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel() * (param.element_size() + (ADAM_BYTES_PER_PARAM if with_optimizer else 0))
    return total


def estimate_checkpoint_bytes(model_chunks: list, with_optimizer: bool) -> int:
    """The same number on every rank: the largest shard's bytes times the number of model-parallel shards."""
    import torch.distributed as dist

    local = local_tensor_bytes(model_chunks, with_optimizer)
    if not (dist.is_available() and dist.is_initialized()):
        return int(local * MARGIN)
    from megatron.core import parallel_state as ps

    shards = ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
    value = torch.tensor([float(local)], dtype=torch.float64,
                         device="cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item() * shards * MARGIN)


def check_free_space(directory: str, needed: int) -> None:
    """ValueError when the filesystem holding ``directory`` (or its nearest existing parent) has less room."""
    if os.environ.get(SKIP_ENV):
        return
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ValueError(f"not enough disk space to save into {directory}: the checkpoint needs about "
                         f"{_gib(needed)}, {_gib(free)} is free there. Free space, keep fewer checkpoints "
                         f"(train.keep_last), or save to a filesystem with room")


def nearly_full(directory: str, slack: int = 64 << 20) -> bool:
    """Whether the filesystem holding ``directory`` has less than ``slack`` bytes left (a failed write there
    is a full disk, whatever the writer's message says)."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free < slack


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
