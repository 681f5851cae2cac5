"""Apply a ``PrunePlan`` to one rank's megatron state dict, producing the pruned model's shard for the same TP
rank without gathering full weights.

Two steps per tensor:
  1. ``select_local`` (pure, per source rank): pick the kept hidden channels (replicated dims) and, along
     the TP-sharded dim, the rows/columns of the kept heads/groups/neurons that live in this rank's shard.
     Head merge (``plan.head_merge``) is applied to ``linear_proj`` here, before selection.
  2. ``assemble`` (pure): the pieces of all source TP ranks, concatenated in rank order, are the target
     tensor's sharded dim in global order (kept indices are sorted and source shards are contiguous ranges);
     the target rank takes its contiguous slice.
``trim_state_dict`` joins them with one all-gather of the selected pieces per tensor over the TP group: each
rank receives O(kept) rows of that tensor, never the full source tensor.

Megatron layouts (local shard of TP rank r, d = head dim, hpg = heads per group):
  linear_qkv rows: per local query group [q heads of the group (hpg * d), k (d), v (d)];
  linear_proj columns: per local head d columns; linear_fc1 rows (SwiGLU): [gate shard; up shard];
  linear_fc2 columns: local neurons; embeddings/output layer: rows = vocab shard, columns = hidden.
Layers: a layer not in ``plan.kept_layers`` disappears; kept layers of this stage are renumbered 0, 1, ...
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..model import params
from .plan import PrunePlan

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)\.(.+)$")
# tensors megatron can hold that model/params.py does not list (no supported arch has them): pruning leaves
# them as they are (the output layer has no bias)
_UNTOUCHED = ("output_layer.bias",)


def _in_shard(kept: List[int], local: int, rank: int) -> List[int]:
    """Local indices (in rank's shard of ``local`` units) of the kept global indices that fall in it."""
    return [i - rank * local for i in kept if rank * local <= i < (rank + 1) * local]


def _qkv_rows(plan: PrunePlan, layer: int, tp_rank: int, tp: int) -> List[int]:
    src = plan.source
    d, hpg = src.head_dim, src.num_attention_heads // src.query_groups
    groups_local = src.query_groups // tp
    rows = []
    for g, heads in zip(plan.groups[layer], plan.heads[layer]):
        if not tp_rank * groups_local <= g < (tp_rank + 1) * groups_local:
            continue
        base = (g - tp_rank * groups_local) * (hpg + 2) * d
        for h in heads:
            j = h - g * hpg
            rows += range(base + j * d, base + (j + 1) * d)
        rows += range(base + hpg * d, base + (hpg + 2) * d)  # k and v of the group
    return rows


def _proj_columns(plan: PrunePlan, layer: int, tp_rank: int, tp: int) -> List[int]:
    d = plan.source.head_dim
    heads_local = plan.source.num_attention_heads // tp
    kept = sorted(h for heads in plan.heads[layer] for h in heads)
    return [j * d + c for j in _in_shard(kept, heads_local, tp_rank) for c in range(d)]


def _merge_heads(proj: torch.Tensor, plan: PrunePlan, layer: int, tp_rank: int, tp: int) -> torch.Tensor:
    """linear_proj columns of kept head k += those of each pruned head p assigned to it (same group)."""
    if not plan.head_merge or not plan.head_merge[layer]:
        return proj
    d = plan.source.head_dim
    heads_local = plan.source.num_attention_heads // tp
    out = proj.clone()
    lo = tp_rank * heads_local
    for pruned, kept in plan.head_merge[layer]:
        if lo <= pruned < lo + heads_local:
            assert lo <= kept < lo + heads_local, "a merge pair crosses TP shards (groups are never split)"
            p, k = pruned - lo, kept - lo
            out[:, k * d:(k + 1) * d] += proj[:, p * d:(p + 1) * d]
    return out


def _gated(plan: PrunePlan) -> bool:
    return plan.source.activation == "swiglu"


def _kept_along(axis: str, plan: PrunePlan, layer: int, tp_rank: int, tp: int) -> List[int]:
    """Local indices, in this TP rank's shard, that the plan keeps along a head- or ffn-pruned axis."""
    if axis == "qkv":
        return _qkv_rows(plan, layer, tp_rank, tp)
    if axis == "attn":
        return _proj_columns(plan, layer, tp_rank, tp)
    local_ffn = plan.source.ffn_hidden_size // tp
    kept = _in_shard(plan.neurons[layer], local_ffn, tp_rank)
    if axis == "fc1" and _gated(plan):
        kept = kept + [local_ffn + j for j in kept]  # the shard is [gate rows; up rows]
    assert axis in ("fc1", "ffn"), axis
    return kept


def _trim_tensor(key: str, value: torch.Tensor, tensor: params.Tensor, plan: PrunePlan, layer: Optional[int],
                 hidden: torch.Tensor, tp_rank: int, tp: int) -> Tuple[torch.Tensor, Optional[int]]:
    """This rank's piece of one tensor: the kept heads / neurons along its TP-split axis (then the dim the
    pieces are concatenated along, returned second), and the kept hidden channels along every hidden axis."""
    if value.dim() != len(tensor.axes):
        raise ValueError(f"state key {key!r} has shape {tuple(value.shape)}, but a GPT built by model/builder.py "
                         f"holds axes {tensor.axes} there; was the checkpoint written by another model?")
    sharded = None
    for dim, axis in enumerate(tensor.axes):
        if params.AXES[axis].pruned_by in (params.HEADS, params.FFN):
            assert layer is not None and dim == tensor.tp_axis, (key, tensor)
            if axis == "attn":  # merged heads' columns are summed before the pruned ones go
                value = _merge_heads(value, plan, layer, tp_rank, tp)
            value = select_along(value, dim, _kept_along(axis, plan, layer, tp_rank, tp))
            sharded = dim
    for dim, axis in enumerate(tensor.axes):
        if params.AXES[axis].pruned_by == params.HIDDEN:
            value = select_along(value, dim, hidden)
    return value, sharded


def select_along(value: torch.Tensor, dim: int, kept) -> torch.Tensor:
    """``value.index_select(dim, kept)`` for sorted ``kept`` (a list or a long tensor), without the gather
    where ``kept`` is a contiguous run: ``value`` itself when it keeps the whole dim, else a narrowed view.
    An unpruned dim (every hidden channel of a depth-only or FFN-only plan, every head of a layer) is then
    no copy at all; index_select on a CPU tensor gathers at well under memory speed."""
    kept = kept.tolist() if isinstance(kept, torch.Tensor) else list(kept)
    n = len(kept)
    if n and kept[-1] - kept[0] == n - 1 and all(b - a == 1 for a, b in zip(kept, kept[1:])):
        return value if n == value.shape[dim] else value.narrow(dim, kept[0], n)
    return value.index_select(dim, torch.tensor(kept, dtype=torch.long, device=value.device))


def select_local(state: Dict[str, Optional[torch.Tensor]], plan: PrunePlan, layer_ids: List[int],
                 tp_rank: int = 0, tp: int = 1) -> Tuple[Dict, Dict[str, int]]:
    """Step 1 for one source TP rank. Returns (tensors keyed by *target* name, {target name: sharded dim})
    where the tensors of keys in the second dict are this rank's pieces along that dim (for SwiGLU fc1 the
    piece is [gate rows; up rows], split again in ``assemble``). Which axes a tensor has, and so what is cut,
    comes from ``model/params.py``."""
    hidden = list(plan.hidden)
    kept = set(plan.kept_layers)
    kept_pos = {lid: i for i, lid in enumerate(lid for lid in layer_ids if lid in kept)}
    out, sharded = {}, {}
    for key, value in state.items():
        m = _LAYER.match(key)
        layer, name, rest = None, key, key
        if m is not None:
            prefix, local, rest = m.group(1), int(m.group(2)), m.group(3)
            if local >= len(layer_ids):
                raise ValueError(f"state key {key!r}: layer {local} but layer_ids has {len(layer_ids)} entries")
            layer = layer_ids[local]
            if layer not in kept_pos:
                continue
            name = f"{prefix}{kept_pos[layer]}.{rest}"
        if value is None or rest.endswith("_extra_state") or rest in _UNTOUCHED:
            out[name] = value
            continue
        tensor = params.find(rest, per_layer=m is not None)
        if tensor is None:
            raise ValueError(f"don't know how to prune state key {key!r}; only GPT models built by "
                             "model/builder.py (dense, local or TE spec) are supported")
        out[name], dim = _trim_tensor(key, value, tensor, plan, layer, hidden, tp_rank, tp)
        if dim is not None:
            sharded[name] = dim
    return out, sharded


def _gated_rows(name: str, plan: PrunePlan) -> bool:
    """Whether target tensor ``name`` is split along SwiGLU's [gate; up] rows."""
    m = _LAYER.match(name)
    tensor = params.find(m.group(3), per_layer=True) if m else None
    return tensor is not None and tensor.tp_axis_name == "fc1" and _gated(plan)


def assemble(name: str, pieces: List[torch.Tensor], dim: int, plan: PrunePlan, tp_rank: int, tp: int
             ) -> torch.Tensor:
    """Step 2: the target TP rank's shard from the pieces of every source TP rank (in rank order)."""
    if tp == 1 and len(pieces) == 1:  # the one piece is the target tensor (SwiGLU's [gate; up] included)
        return pieces[0]
    if _gated_rows(name, plan):
        gates = [p[:p.shape[0] // 2] for p in pieces]
        ups = [p[p.shape[0] // 2:] for p in pieces]
        return torch.cat([_slice(torch.cat(gates, 0), 0, tp_rank, tp), _slice(torch.cat(ups, 0), 0, tp_rank, tp)])
    return _slice(torch.cat(pieces, dim), dim, tp_rank, tp)


def _slice(full: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    assert full.shape[dim] % tp == 0, (full.shape, dim, tp)
    n = full.shape[dim] // tp
    return full.narrow(dim, rank * n, n).clone()


def _all_gather_pieces(piece: torch.Tensor, dim: int, group) -> List[torch.Tensor]:
    """All-gather pieces of different lengths along ``dim`` (padded to the longest)."""
    world = dist.get_world_size(group)
    length = torch.tensor([piece.shape[dim]], dtype=torch.long, device=piece.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(x) for x in lengths)
    pad_shape = list(piece.shape)
    pad_shape[dim] = longest - piece.shape[dim]
    padded = torch.cat([piece, piece.new_zeros(pad_shape)], dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [p.narrow(dim, 0, int(n)) for p, n in zip(parts, lengths)]


def trim_state_dict(state: Dict[str, Optional[torch.Tensor]], plan: PrunePlan, layer_ids: List[int],
                    tp_rank: int = 0, tp: int = 1, tp_group=None) -> Dict[str, Optional[torch.Tensor]]:
    """The pruned model's state dict for this TP rank (same PP stage, see ``PrunePlan.target_pipeline_split``).

    ``state``: this rank's ``model.state_dict()`` (megatron names, local layer numbers); ``layer_ids``: the
    global 0-based id of each local layer; with tp > 1 every rank of ``tp_group`` must call this together.
    A returned tensor may share storage with ``state``'s where the plan cuts nothing from it (load it into
    the pruned model, as ``load_state_dict`` copies; don't modify it in place while the source is in use).
    """
    pieces, sharded = select_local(state, plan, layer_ids, tp_rank, tp)
    out = {}
    for name, value in pieces.items():  # same key order on every TP rank of a stage
        if name not in sharded:
            out[name] = value
        elif tp == 1:
            out[name] = assemble(name, [value], sharded[name], plan, 0, 1)
        else:
            gathered = _all_gather_pieces(value, sharded[name], tp_group)
            out[name] = assemble(name, gathered, sharded[name], plan, tp_rank, tp)
    return out


def prune_model_state(model, plan: PrunePlan) -> Dict[str, Optional[torch.Tensor]]:
    """``trim_state_dict`` for a megatron GPTModel stage under the current ``parallel_state``."""
    from megatron.core import parallel_state as ps

    from ..runtime.forward import transformer_layers, unwrap_model

    model = unwrap_model(model)
    layer_ids = [lid for lid, _ in transformer_layers([model])]
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    rank = ps.get_tensor_model_parallel_rank() if tp > 1 else 0
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    return trim_state_dict(model.state_dict(), plan, layer_ids, rank, tp, group)
