"""The collective patterns every job uses, in one place. Each works in a plain single process too (no
process group, or a world of one), so library callers and unit tests need no launcher.

- ``run_on_rank0``: a filesystem step done once, whose outcome (result or error) every rank shares, so a
  rank never raises alone while the others wait in the next collective.
- ``sum_to_all_ranks``: per-rank partial sums (losses, counts) reduced over data parallelism on the last
  pipeline stage, where they are computed, then handed to every stage.
- ``all_ranks_agree``: a boolean that is true only when it is true on every rank.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_on_rank0(step: Callable[[], T], what: str, error: type = OSError, prefix: str = "") -> Optional[T]:
    """Run ``step`` on rank 0 only and return its (picklable) result on every rank. When it raises, every
    rank raises ``error("{prefix}{what} failed on rank 0: {Type}: {message}")`` together."""
    result, failure = None, None
    if is_rank0():
        try:
            result = step()
        except Exception as e:  # reported on every rank below
            failure = f"{type(e).__name__}: {e}"
    if _distributed():
        outcome = [result, failure]
        dist.broadcast_object_list(outcome, src=0)
        result, failure = outcome
    if failure is not None:
        raise error(f"{prefix}{what} failed on rank 0: {failure}")
    return result


def sum_to_all_ranks(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` (in place) over the data-parallel group on the last pipeline stage, then broadcast the
    last stage's sums to every stage. Values on other stages are ignored; collective over the world."""
    if not _distributed():
        return values
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return values


def all_ranks_agree(ok: bool, device=None) -> bool:
    """True when ``ok`` is true on every rank (collective)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
