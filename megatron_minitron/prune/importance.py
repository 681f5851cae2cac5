"""Activation-based importance of heads, query groups, MLP neurons, hidden channels and layers (forward only).

Probes (forward hooks on this rank's megatron-core GPTModel stage, local or TE spec names):
  heads    input of ``self_attention.linear_proj`` = core-attention output [s, b, heads_local * d];
           per token and head the L2 norm over the head dim.
  neurons  input of ``mlp.linear_fc2`` [s, b, ffn_local]: for SwiGLU the gated product act(gate) * up, for
           plain MLPs act(fc1 x); per token the absolute value.
  hidden   output of every norm (input_layernorm, pre_mlp_layernorm, final_layernorm) [s, b, hidden];
           per token the absolute value; each norm site is aggregated on its own, the scores of all sites
           are summed.
  BI       1 - cos(h_in, h_out) per token, h_in = input of the first layer of a block, h_out = output of
           its last, averaged over all tokens.
Per-token magnitudes are aggregated over sequence then batch by ``aggregate.RunningAggregate``. Reduction:
running sums are summed over DP (exact), shards all-gathered over TP (local index j on TP rank r is global
r * local + j), layers gathered over PP by global layer number, so every rank ends with the same scores.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

import torch
import torch.distributed as dist

from .aggregate import RunningAggregate
from ..runtime.forward import eval_mode, model_device, transformer_layers, unwrap_model
from .depth import DepthContext, DepthMetric, known_depth_metrics, removal_scores, run_forward, \
    unknown_depth_metric_message
from .scores import ImportanceScores, ImportanceSettings, group_scores


def _groups():
    from megatron.core import parallel_state as ps
    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return None
    return ps


def _first_arg(args, kwargs, name):
    return kwargs[name] if name in kwargs else args[0]


class _Probes:
    """Hooks on one stage; keeps running aggregates per local layer and the BI sums per block."""

    def __init__(self, model, settings: ImportanceSettings, num_layers: int):
        cfg = model.config
        self.settings = settings
        self.head_dim = cfg.kv_channels
        self.num_layers = num_layers
        self.layers = transformer_layers([model])
        self.heads: Dict[int, RunningAggregate] = {}
        self.neurons: Dict[int, RunningAggregate] = {}
        self.hidden: Dict[str, RunningAggregate] = {}
        self.hiddens: Dict[int, torch.Tensor] = {}  # h_j of the current batch, j = global boundary index
        self.boundaries: Optional[_Boundaries] = None  # this batch's casts and norms
        self.scored: set = set()  # (i, k): blocks scored during this batch's forward
        self.bi_sizes = settings.all_block_sizes() if "bi" in settings.depth_metrics else []
        # on the model's device: NCCL reduces only CUDA tensors, and no .item() sync per block per batch
        self.device = model_device([model])
        self.bi_sums = {k: torch.zeros(num_layers - k + 1, dtype=torch.float64, device=self.device)
                        for k in self.bi_sizes}
        self.tokens = 0.0
        self.handles = []
        seq = settings.sequence_aggregation
        for lid, layer in self.layers:
            self.heads[lid] = RunningAggregate(seq)
            self.neurons[lid] = RunningAggregate(seq)
            self._hook_pre(layer.self_attention.linear_proj, "input_", self._on_heads(lid))
            self._hook_pre(layer.mlp.linear_fc2, "input_", self._on_neurons(lid))
            for site in ("input_layernorm", "pre_mlp_layernorm"):
                norm = getattr(layer, site)
                if isinstance(norm, torch.nn.Module) and list(norm.parameters()):
                    self._hook_norm(norm, f"{lid}.{site}")
                else:  # TE spec: the norm is fused into the next linear; probe its normalised output
                    raise ValueError("importance estimation needs separate norm modules (local spec); "
                                     "build the model with transformer_engine=false for the calibration "
                                     "pass (the weights are the same)")
            if self.bi_sizes:
                self._hook_pre(layer, "hidden_states", self._on_layer_input(lid))
                if lid == max(i for i, _ in self.layers):
                    self.handles.append(layer.register_forward_hook(self._on_last_output(lid)))
        final = getattr(model.decoder, "final_layernorm", None)
        if final is not None:
            self._hook_norm(final, "final_layernorm")

    def _hook_pre(self, module, name, fn):
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: fn(_first_arg(args, kwargs, name)), with_kwargs=True))

    def _hook_norm(self, module, key):
        self.hidden[key] = RunningAggregate(self.settings.sequence_aggregation)
        self.handles.append(module.register_forward_hook(
            lambda m, args, out: self.hidden[key].update(out.detach(), magnitude=True)))

    def _on_heads(self, lid):
        def fn(x):
            s, b, n = x.shape
            per_head = torch.linalg.vector_norm(x.detach().reshape(s, b, n // self.head_dim, self.head_dim),
                                                dim=-1, dtype=torch.float32)
            self.heads[lid].update(per_head)
        return fn

    def _on_neurons(self, lid):
        return lambda x: self.neurons[lid].update(x.detach(), magnitude=True)

    def _on_layer_input(self, lid):
        return lambda x: self._boundary(lid, x.detach())

    def _on_last_output(self, lid):
        return lambda module, args, out: self._boundary(lid + 1, out[0].detach())

    def ready(self, stage_of_layer: List[int], my_stage: int) -> None:
        """The layer -> stage map, before the first batch. A block whose two boundary states are both on this
        stage is scored as soon as its last state arrives, and a state is dropped once nothing later needs it:
        a batch holds max(block size) + 1 states instead of every boundary of the stage. The states of blocks
        that cross stages (start on one, end on another) wait for the batch's end (block_importance_step)."""
        L = self.num_layers
        self.my_stage = my_stage
        self.owner = stage_of_layer + [stage_of_layer[L - 1]]  # the stage holding boundary state j (h_L: last)
        blocks = [(i, k) for k in self.bi_sizes for i in range(L - k + 1)]
        self.local_blocks = {(i, k) for i, k in blocks if stage_of_layer[i + k - 1] == my_stage}
        crossing = {(i, k) for i, k in blocks if self.owner[i] != stage_of_layer[i + k - 1]}
        # every rank walks the same list at the batch's end, so the broadcasts pair up across the PP group
        self.sent_states = sorted({i for i, _ in crossing})
        self.keep = ({i for i in self.sent_states if self.owner[i] == my_stage}  # another stage needs our h_i
                     | {i + k for i, k in crossing & self.local_blocks})  # our end of a block we score late

    def _boundary(self, j: int, h: torch.Tensor) -> None:
        self.hiddens[j] = h
        self.state_like = (h.shape, h.dtype, h.device)  # for the buffers of states other stages send
        if self.boundaries is None:
            self.boundaries = _Boundaries(self.hiddens)
        for k in self.bi_sizes:
            if (j - k, k) in self.local_blocks and j - k in self.hiddens:
                self.bi_sums[k][j - k] += (1 - self.boundaries.cosine(j - k, j)).sum()
                self.scored.add((j - k, k))
        for i in [i for i in self.hiddens if i not in self.keep]:
            if all((i, k) in self.scored or (i, k) not in self.local_blocks for k in self.bi_sizes):
                del self.hiddens[i]
                self.boundaries.release(i)

    def remove(self):
        for h in self.handles:
            h.remove()

    # --------------------------------------------------------------- BI after each batch
    def block_importance_step(self, pp_group, pp_ranks: List[int]):
        """After each batch: score the blocks that cross stages, with h_in fetched from its owner stage."""
        if not self.bi_sizes:
            return
        shape, dtype, device = self.state_like
        received = {}
        for j in self.sent_states:
            mine = self.owner[j] == self.my_stage
            buf = self.hiddens[j] if mine else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buf, src=pp_ranks[self.owner[j]], group=pp_group)
            received[j] = buf
        boundaries = _Boundaries({**received, **self.hiddens})
        for i, k in sorted(self.local_blocks - self.scored):
            self.bi_sums[k][i] += (1 - boundaries.cosine(i, i + k)).sum()
        self.tokens += shape[0] * shape[1]
        self.hiddens.clear()
        self.scored.clear()
        self.boundaries = None


class _Boundaries:
    """The hidden states h_j of one batch, each cast to the accumulation dtype and its per-token norm taken
    once: h_j is the output of one block and the input of the next (and of every block size), so the pairs
    share it; ``release`` drops it once no later pair needs it (at most max(block size) + 1 are held).
    cos = h_i . h_j / (max(|h_i|, eps) max(|h_j|, eps)), as ``torch.nn.functional.cosine_similarity``."""

    EPS = 1e-8

    def __init__(self, hiddens: Dict[int, torch.Tensor]):
        self.raw = hiddens
        self.cast: Dict[int, torch.Tensor] = {}
        self.norms: Dict[int, torch.Tensor] = {}

    def _get(self, j: int):
        if j not in self.cast:
            h = self.raw[j]
            h = h.to(_accumulation_dtype(h))
            self.cast[j] = h
            self.norms[j] = torch.linalg.vector_norm(h, dim=-1).clamp(min=self.EPS)
        return self.cast[j], self.norms[j]

    def release(self, j: int) -> None:
        self.cast.pop(j, None)
        self.norms.pop(j, None)

    def cosine(self, i: int, j: int) -> torch.Tensor:
        (a, norm_a), (b, norm_b) = self._get(i), self._get(j)
        return (torch.linalg.vecdot(a, b, dim=-1) / (norm_a * norm_b)).double()


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision activations (GPU), float64 otherwise (as aggregate.aggregate_sequence)."""
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else torch.float64


def _check_model(model):
    cfg = model.config
    if getattr(cfg, "sequence_parallel", False):
        raise ValueError("importance estimation does not support sequence parallelism (norm outputs are "
                         "split over the sequence); build the calibration model with "
                         "parallel.sequence_parallel=false (same weights)")
    if getattr(cfg, "context_parallel_size", 1) != 1:
        raise ValueError("importance estimation does not support context parallelism; use CP=1")
    if getattr(cfg, "num_moe_experts", None):
        raise ValueError("importance estimation supports dense MLPs only (no MoE)")


def _tp_gather_cat(t: torch.Tensor, ps) -> torch.Tensor:
    """Concatenate along the last dim the TP shards (rank order = global order)."""
    if ps is None or ps.get_tensor_model_parallel_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _sum(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _per_layer(aggs: Dict[int, RunningAggregate], num_layers: int, batch: str, ps) -> torch.Tensor:
    """Local-layer aggregates -> DP-summed states -> TP-gathered scores -> PP-assembled [L, units]."""
    ids = sorted(aggs)
    states = torch.stack([aggs[i].state() for i in ids])
    _sum(states, ps.get_data_parallel_group() if ps else None)
    local = torch.stack([RunningAggregate.finalize_state(s, batch) for s in states])
    full_units = _tp_gather_cat(local, ps)
    out = torch.zeros(num_layers, full_units.shape[1], dtype=torch.float64, device=local.device)
    out[ids] = full_units
    return _sum(out, ps.get_pipeline_model_parallel_group() if ps else None)


@torch.no_grad()
def estimate_importance(model_chunks, batches: Iterable, settings: Optional[ImportanceSettings] = None,
                        depth_metrics: Optional[Mapping[str, DepthMetric]] = None) -> ImportanceScores:
    """Run the calibration batches forward (only) and return the full, identical-on-every-rank scores.

    ``model_chunks``: [this rank's GPTModel stage] (one chunk; virtual pipelining is not supported).
    ``batches``: this DP rank's calibration batches, dicts with ``tokens`` [b, s] (and ``position_ids``;
    ``labels`` and ``loss_mask`` for the lm_loss metric) or token tensors; all batches the same shape. Every
    DP rank must give the same number of batches. ``depth_metrics``: removal metrics of this call (name ->
    fn) besides the registered ones (``register_depth_metric``), for ``settings.depth_metrics`` to name.
    """
    settings = settings or ImportanceSettings()
    chunks = [unwrap_model(m) for m in model_chunks]
    if len(chunks) != 1:
        raise ValueError("estimate_importance supports one model chunk per rank (no virtual pipeline)")
    model = chunks[0]
    _check_model(model)
    cfg = model.config
    L = cfg.num_layers
    settings.validate(L)
    metrics = known_depth_metrics(depth_metrics)
    for m in settings.depth_metrics:
        if m != "bi" and m not in metrics:
            raise ValueError(unknown_depth_metric_message(m, metrics))
    with eval_mode(chunks):  # each chunk gets its own mode back
        return _estimate(model, chunks, batches, settings, L, metrics)


def _estimate(model, chunks, batches, settings: ImportanceSettings, L: int,
              metrics: Mapping[str, DepthMetric]) -> ImportanceScores:
    ps = _groups()
    probes = _Probes(model, settings, L)
    # which PP stage owns each global layer (same on every rank)
    my_ids = [lid for lid, _ in probes.layers]
    pp_size = ps.get_pipeline_model_parallel_world_size() if ps else 1
    my_stage = ps.get_pipeline_model_parallel_rank() if ps else 0
    owned = torch.zeros(L, dtype=torch.float64, device=probes.device)
    owned[my_ids] = my_stage + 1  # +1 so that zero means "not mine"
    if pp_size > 1:
        dist.all_reduce(owned, group=ps.get_pipeline_model_parallel_group())
    stage_of_layer = [int(v) - 1 for v in owned.tolist()]
    assert min(stage_of_layer) >= 0, stage_of_layer
    pp_group = ps.get_pipeline_model_parallel_group() if ps else None
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else [0]

    removal = [m for m in settings.depth_metrics if m != "bi"]
    cached: List = []

    def batch_source():
        for i, b in enumerate(batches):
            if removal and (settings.depth_batches is None or i < settings.depth_batches):
                cached.append(b)
            yield b

    probes.ready(stage_of_layer, my_stage)
    try:
        run_forward(chunks, batch_source(),
                    after_batch=lambda: probes.block_importance_step(pp_group, pp_ranks))
    finally:
        probes.remove()
    batch = settings.batch_aggregation
    heads = _per_layer(probes.heads, L, batch, ps)
    neurons = _per_layer(probes.neurons, L, batch, ps)
    site_states = torch.stack([probes.hidden[k].state() for k in sorted(probes.hidden)])
    _sum(site_states, ps.get_data_parallel_group() if ps else None)
    hidden = torch.stack([RunningAggregate.finalize_state(s, batch) for s in site_states]).sum(0)
    _sum(hidden, pp_group if pp_size > 1 else None)
    num_samples = torch.tensor([probes.heads[my_ids[0]].count], dtype=torch.float64, device=probes.device)
    _sum(num_samples, ps.get_data_parallel_group() if ps else None)

    layers, blocks = {}, {}
    if probes.bi_sizes:
        flat = torch.cat([probes.bi_sums[k] for k in probes.bi_sizes]
                         + [torch.tensor([probes.tokens], dtype=torch.float64, device=probes.device)])
        _sum(flat, ps.get_data_parallel_group() if ps else None)
        _sum(flat, pp_group if pp_size > 1 else None)  # each block was scored on exactly one stage
        # tokens were counted on every stage: divide the PP-summed count by the number of stages
        tokens = flat[-1] / pp_size
        offset = 0
        for k in probes.bi_sizes:
            n = L - k + 1
            blocks.setdefault("bi", {})[k] = flat[offset:offset + n] / tokens
            offset += n
    if removal:
        ctx = DepthContext(chunks, cached)
        for metric in removal:
            blocks[metric] = removal_scores(ctx, metric, L, settings.all_block_sizes(), metrics)
    for metric, by_size in blocks.items():
        layers[metric] = by_size.pop(1)
    blocks = {m: b for m, b in blocks.items() if b}
    groups = group_scores(heads, model.config.num_query_groups)
    return ImportanceScores(settings=settings, heads=heads.cpu(), groups=groups.cpu(), neurons=neurons.cpu(),
                            hidden=hidden.cpu(), layers={m: t.cpu() for m, t in layers.items()},
                            blocks={m: {k: t.cpu() for k, t in b.items()} for m, b in blocks.items()},
                            num_samples=int(num_samples.item()))
