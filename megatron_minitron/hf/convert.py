"""Fill this rank's megatron model from HF tensors, and write HF safetensors from a sharded model.

Both work on any TP x PP layout (call after ``runtime.init_distributed`` and ``model.builder.build_gpt``):
- ``load_hf_weights``: each rank reads only the slices of its own shards (lazy ``read``), for the layers
  of its pipeline stage (global layer = ``layer.layer_number - 1``, so uneven splits work too).
- ``export_hf_weights``: each stage gathers its TP shards within the TP group (along the sharded dim
  only); the rank with tp_rank 0 and dp_rank 0 writes that stage's safetensors parts, then global rank 0
  renames the parts to HF's ``model-0000i-of-0000n`` names and writes the index.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ModelArch
from ..runtime.forward import unwrap_model
from . import io as hf_io
from .fused import fuse
from .mapping import VOCAB, hf_tensors, megatron_shard, param_specs, shard_dim, to_global_name


def _parallel_ranks():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, 0, None
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_group())


def stage_layout(model) -> tuple:
    """(global layer indices of this stage, has embedding, has final norm / output)."""
    model = unwrap_model(model)
    layers = [layer.layer_number - 1 for layer in model.decoder.layers]
    return layers, bool(model.pre_process), bool(model.post_process)


def _stage_params(model, arch: ModelArch) -> list:
    """[(spec, local parameter)] for this stage, in model order."""
    model = unwrap_model(model)
    global_layers, first, last = stage_layout(model)
    specs = {s.mcore_name: s for s in param_specs(arch, global_layers, first, last)}
    params = {name: t for name, t in model.state_dict(keep_vars=True).items()
              if not name.endswith("_extra_state")}
    pairs = []
    for local_name, param in params.items():
        global_name = to_global_name(local_name, lambda i: global_layers[i])
        if global_name not in specs:
            raise ValueError(f"model parameter {local_name} has no Hugging Face counterpart: the model was "
                             "not built from this arch, or the arch has a feature the HF families lack")
        pairs.append((specs.pop(global_name), param))
    assert not specs, f"mapping names parameters the model lacks: {sorted(specs)[:5]}"
    return pairs


@torch.no_grad()
def load_hf_weights(model, arch: ModelArch, read) -> int:
    """Copy HF tensors into this rank's (unwrapped or wrapped) model; returns the number of tensors set.

    ``read(name, rows=None, cols=None)``: ``io.SafetensorsReader(dir).read`` or ``mapping.dict_reader``.
    """
    tp_rank, tp_size, _, _ = _parallel_ranks()
    count = 0
    for spec, param in _stage_params(model, arch):
        shard = megatron_shard(spec, read, arch, tp_rank, tp_size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"{spec.mcore_name}: Hugging Face gives shape {tuple(shard.shape)} for TP rank "
                             f"{tp_rank}/{tp_size}, the model has {tuple(param.shape)}; the model was "
                             "built from a different config than these weights")
        param.data.copy_(shard.to(dtype=param.dtype, device=param.device))
        count += 1
    return count


def _gather_tp(tensor: torch.Tensor, dim: Optional[int], tp_size: int, group, device) -> list:
    if dim is None or tp_size == 1:
        return [tensor]
    local = tensor.detach().to(device).contiguous()
    out = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(out, local, group=group)
    return [t.cpu() for t in out]


def _comm_device(model) -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def export_hf_weights(model, arch: ModelArch, out_dir: str, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: int = 5 * 1024 ** 3, family: Optional[str] = None) -> Optional[list]:
    """Write the model's HF safetensors into ``out_dir`` (collective: call on every rank).

    ``dtype``: cast on write (default: as held). ``family``: the HF family written, for those whose files
    fuse tensors (fused.py). Files hold at most ``max_shard_bytes`` of tensor data,
    except that the HF tensors of one megatron parameter always share a file. Returns, on global rank 0, the names of all tensors written
    (every stage); None on other ranks. config.json and tokenizer files are the caller's (see cli.py)."""
    tp_rank, tp_size, dp_rank, tp_group = _parallel_ranks()
    writer = tp_rank == 0 and dp_rank == 0
    device = _comm_device(model)
    pp_rank = 0
    if dist.is_initialized():
        from megatron.core import parallel_state as ps
        if ps.model_parallel_is_initialized():
            pp_rank = ps.get_pipeline_model_parallel_rank()
    if writer:
        os.makedirs(out_dir, exist_ok=True)

    parts, buffer, buffer_bytes = [], {}, 0

    def flush():
        nonlocal buffer, buffer_bytes
        if writer and buffer:
            tmp = f".part-stage{pp_rank:03d}-{len(parts):05d}.safetensors"
            nbytes = hf_io.save_tensor_file(buffer, os.path.join(out_dir, tmp))
            parts.append((tmp, sorted(buffer), nbytes))
        buffer, buffer_bytes = {}, 0

    for spec, param in _stage_params(model, arch):
        if spec.kind == VOCAB and spec.mcore_name == "output_layer.weight" and arch.tie_embeddings:
            continue  # the last stage's copy of a tied embedding; the first stage writes it
        shards = _gather_tp(param, shard_dim(spec), tp_size, tp_group, device)
        if not writer:
            continue
        tensors = {name: (t.to(dtype) if dtype is not None else t).clone()
                   for name, t in fuse(hf_tensors(spec, [s.detach().cpu() for s in shards], arch), arch,
                                       family).items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if buffer and buffer_bytes + nbytes > max_shard_bytes:
            flush()
        buffer.update(tensors)
        buffer_bytes += nbytes
    flush()

    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (pp_rank, parts))
        by_stage = {}
        for stage, stage_parts in gathered:
            if stage_parts:
                by_stage[stage] = stage_parts
        all_parts = [p for stage in sorted(by_stage) for p in by_stage[stage]]
        is_rank0 = dist.get_rank() == 0
    else:
        all_parts, is_rank0 = parts, True
    if is_rank0:
        hf_io.finalize_shards(out_dir, all_parts)
    if dist.is_initialized():
        dist.barrier()
    return [n for p in all_parts for n in p[1]] if is_rank0 else None
