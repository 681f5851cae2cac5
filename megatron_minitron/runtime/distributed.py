"""Process-group setup: torchrun environment -> torch.distributed -> megatron ``parallel_state``.

Works the same under torchrun (any number of ranks) and as a plain ``python``/``minitron`` process
(a world of one, on an in-memory store). NCCL on GPU, gloo on CPU (with ``cpu_mode`` enabled).
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import cpu_mode


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def init_distributed(tp: int = 1, pp: int = 1, timeout_minutes: int = 30,
                     force_cpu: bool = False) -> Runtime:
    """Initialise torch.distributed and megatron's model-parallel groups (idempotent per layout)."""
    from megatron.core import parallel_state

    use_gpu = torch.cuda.is_available() and not force_cpu
    if not use_gpu:
        cpu_mode.enable()
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_gpu:
            torch.cuda.set_device(local_rank)
        backend, timeout = ("nccl" if use_gpu else "gloo"), datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun's (or SLURM launch's) env:// rendezvous
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # a plain single process: a world of one on an in-memory store, with no port to race for and no
            # RANK / MASTER_PORT left in os.environ, where any process it starts (a `minitron` subprocess, a
            # torchrun launch) would take them for its own rendezvous and find the port taken
            dist.init_process_group(backend=backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by TP*PP = {tp}*{pp}; "
                         f"launch a multiple of {tp * pp} processes")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != tp
                or parallel_state.get_pipeline_model_parallel_world_size() != pp):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=timeout_minutes)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    return Runtime(rank=dist.get_rank(), world_size=world, local_rank=local_rank, device=device,
                   tp=tp, pp=pp, dp=world // (tp * pp))


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker.

    The data-parallel stream gets ``seed`` on every rank, the tensor-parallel stream ``seed + 2718 +
    tp_rank`` (megatron's convention), so dropout matches megatron's own runs.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    import sys
    if "megatron.core.parallel_state" not in sys.modules:
        return
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank0_print(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True, **kwargs)
