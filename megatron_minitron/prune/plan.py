"""From importance scores and target sizes to a ``PrunePlan`` (pure; identical on every rank).

Ranking (higher score = kept; ties broken by the lower index, so the plan is deterministic):
  hidden channels   global over the model-wide hidden score.
  query groups      per layer, by group score (sum of the group's head scores).
  query heads       per layer and kept group: the top ``heads / groups`` (target) heads of that group, so
                    every group keeps the same number of query heads (GQA needs it).
  neurons           per layer.
  layers            explicit ``drop_layers`` / ``drop_range``, or ``num_layers`` by a depth metric: the
                    lowest-scored single layers (``contiguous=False``) or the lowest-scored contiguous block
                    of ``L - num_layers`` layers (``contiguous=True``).
Every index in a plan is 0-based and refers to the source model; kept lists are sorted ascending.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..config import ModelArch
from .scores import ImportanceScores, group_scores


@dataclass
class PruneTargets:
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    num_layers: Optional[int] = None
    drop_layers: Optional[List[int]] = None  # explicit 0-based layer ids
    drop_range: Optional[List[int]] = None  # [first, last] 0-based, inclusive: [16, 31] drops 16..31
    depth_metric: str = "bi"  # which layer/block score ranks layers when only num_layers is given
    contiguous: bool = False  # drop one contiguous block (2408.11796's best) rather than single layers


@dataclass
class PrunePlan:
    source: ModelArch
    target: ModelArch
    kept_layers: List[int]
    hidden: List[int]
    neurons: List[List[int]]  # [L][F'] per source layer
    groups: List[List[int]]  # [L][G'] kept query groups per source layer
    heads: List[List[List[int]]]  # [L][G'][H'/G'] kept query heads (global head ids) per kept group
    head_merge: List[List[List[int]]] = field(default_factory=list)  # [L] list of [pruned, kept] pairs

    def target_pipeline_split(self, source_layers_per_stage: List[int]) -> List[int]:
        """Layers per stage of the pruned model when every stage keeps its own kept layers (no layer moves
        between stages while trimming); see ``pipeline_split_after_pruning``."""
        return pipeline_split_after_pruning(self.kept_layers, source_layers_per_stage)

    def to_dict(self) -> dict:
        return {"source": dataclasses.asdict(self.source), "target": dataclasses.asdict(self.target),
                "kept_layers": self.kept_layers, "hidden": self.hidden, "neurons": self.neurons,
                "groups": self.groups, "heads": self.heads, "head_merge": self.head_merge}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        return cls(source=ModelArch(**d["source"]), target=ModelArch(**d["target"]),
                   kept_layers=d["kept_layers"], hidden=d["hidden"], neurons=d["neurons"],
                   groups=d["groups"], heads=d["heads"], head_merge=d.get("head_merge", []))


def pipeline_split_after_pruning(kept_layers: List[int], source_layers_per_stage: List[int]) -> List[int]:
    """Layers per pipeline stage of the pruned model when each stage keeps its own kept layers (trimming
    moves no layer between stages). Raises ValueError when a stage would be left without layers."""
    split, start = [], 0
    kept = set(int(i) for i in kept_layers)
    for n in source_layers_per_stage:
        split.append(sum(1 for i in range(start, start + n) if i in kept))
        start += n
    if 0 in split and len(split) > 1:
        raise ValueError(f"pruning leaves a pipeline stage without layers (layers per stage {split}); "
                         "prune at a smaller pipeline_model_parallel_size (e.g. 1) and reload the "
                         "result at any layout")
    return split


def top_k(scores: torch.Tensor, k: int) -> List[int]:
    """Indices of the k largest scores, sorted ascending; ties -> the lower index wins."""
    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return sorted(int(i) for i in order)


def _ranked(scores: torch.Tensor, indices: List[int]) -> List[int]:
    """``indices`` by descending score, ties by index."""
    return sorted(indices, key=lambda i: (-float(scores[i]), i))


def _resolve_width(arch: ModelArch, t: PruneTargets, tp: int):
    H, G = arch.num_attention_heads, arch.query_groups
    hidden = t.hidden_size or arch.hidden_size
    ffn = t.ffn_hidden_size or arch.ffn_hidden_size
    mha = arch.num_query_groups is None or G == H
    if t.num_query_groups is not None:
        groups = t.num_query_groups
        heads = t.num_attention_heads or groups * (H // G)
    elif t.num_attention_heads is not None:
        heads = t.num_attention_heads
        groups = heads if mha else G
    else:
        heads, groups = H, G
    for name, new, old in (("hidden_size", hidden, arch.hidden_size), ("ffn_hidden_size", ffn,
                           arch.ffn_hidden_size), ("num_attention_heads", heads, H),
                           ("num_query_groups", groups, G)):
        if new < 1 or new > old:
            raise ValueError(f"target {name}={new} must be between 1 and the source's {old} "
                             "(pruning only removes units)")
    if heads % groups:
        raise ValueError(f"target num_attention_heads={heads} is not a multiple of num_query_groups="
                         f"{groups}; every query group keeps the same number of heads")
    if heads // groups > H // G:
        raise ValueError(f"target keeps {heads // groups} query heads per group but source groups only "
                         f"have {H // G}; lower num_attention_heads to at most {groups * (H // G)}")
    for name, n in (("num_attention_heads", heads), ("num_query_groups", groups), ("ffn_hidden_size", ffn)):
        if n % tp:
            raise ValueError(f"target {name}={n} is not divisible by tensor_model_parallel_size={tp}; "
                             f"pick a multiple of {tp}")
    return hidden, ffn, heads, groups


def _explicit_drop(L: int, t: PruneTargets) -> Optional[List[int]]:
    """The layers ``drop_layers`` / ``drop_range`` name (checked), or None when depth is left to a metric."""
    given = [x is not None for x in (t.drop_layers, t.drop_range)]
    if sum(given) > 1:
        raise ValueError("give only one of drop_layers and drop_range")
    if t.drop_layers is not None:
        drop = sorted(set(int(i) for i in t.drop_layers))
    elif t.drop_range is not None:
        if len(t.drop_range) != 2 or t.drop_range[0] > t.drop_range[1]:
            raise ValueError(f"drop_range={t.drop_range} must be [first, last] (0-based, inclusive)")
        drop = list(range(int(t.drop_range[0]), int(t.drop_range[1]) + 1))
    else:
        return None
    _check_drop(L, t, drop)
    return drop


def _check_drop(L: int, t: PruneTargets, drop: List[int]) -> None:
    bad = [i for i in drop if not 0 <= i < L]
    if bad:
        raise ValueError(f"layer ids {bad} are out of range: layers are numbered 0..{L - 1} (0-based)")
    if len(drop) >= L:
        raise ValueError("the targets drop every layer; keep at least one")
    if t.num_layers is not None and L - len(drop) != t.num_layers:
        raise ValueError(f"num_layers={t.num_layers} disagrees with the {len(drop)} dropped layers of "
                         f"{L}; give one or make them agree")


def _check_num_layers(L: int, t: PruneTargets) -> None:
    if t.num_layers is not None and not 1 <= t.num_layers <= L:
        raise ValueError(f"target num_layers={t.num_layers} must be between 1 and the source's {L}")


def _resolve_depth(scores: ImportanceScores, L: int, t: PruneTargets) -> List[int]:
    drop = _explicit_drop(L, t)
    if drop is None and t.num_layers is not None and t.num_layers != L:
        _check_num_layers(L, t)
        k = L - t.num_layers
        if t.contiguous:
            block = scores.block(t.depth_metric, k)
            start = top_k(-block, 1)[0]
            drop = list(range(start, start + k))
        else:
            if t.depth_metric not in scores.layers:
                raise ValueError(f"no {t.depth_metric!r} layer scores (have {sorted(scores.layers)}); "
                                 f"rerun importance with depth_metrics including {t.depth_metric!r}")
            drop = top_k(-scores.layers[t.depth_metric], k)
        _check_drop(L, t, drop)
    return [i for i in range(L) if i not in set(drop or [])]


def depth_scores_needed(arch: ModelArch, targets: PruneTargets) -> Optional[Tuple[str, int]]:
    """(metric, block size) a plan for ``targets`` ranks layers by - size 1: single layers, k > 1: contiguous
    blocks of k - or None when no metric picks the layers (depth kept, or the dropped layers are explicit)."""
    if _explicit_drop(arch.num_layers, targets) is not None:
        return None
    if targets.num_layers is None or targets.num_layers == arch.num_layers:
        return None
    k = arch.num_layers - targets.num_layers
    return targets.depth_metric, (k if targets.contiguous else 1)


@dataclass
class ResolvedTargets:
    """Target sizes after defaults (unchanged axes keep the source's size); ``drop`` is the explicit list of
    dropped layers, or None when a depth metric will choose ``num_layers - num_layers_target`` layers."""
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    num_layers: int
    drop: Optional[List[int]]


def validate_targets(arch: ModelArch, targets: PruneTargets, tp: int = 1) -> ResolvedTargets:
    """Every check of ``make_plan`` that needs no scores (sizes, TP divisibility, heads vs groups, layer ids),
    so that a command line can fail before it loads a model. Raises ValueError with the fix."""
    if tp < 1:
        raise ValueError(f"tensor_model_parallel_size must be >= 1, got {tp}")
    hidden, ffn, heads, groups = _resolve_width(arch, targets, tp)
    L = arch.num_layers
    drop = _explicit_drop(L, targets)
    _check_num_layers(L, targets)
    layers = L - len(drop) if drop is not None else (targets.num_layers or L)
    return ResolvedTargets(hidden, ffn, heads, groups, layers, drop)


def _check_shapes(scores: ImportanceScores, arch: ModelArch) -> None:
    want = {"heads": (arch.num_layers, arch.num_attention_heads),
            "neurons": (arch.num_layers, arch.ffn_hidden_size), "hidden": (arch.hidden_size,)}
    for name, shape in want.items():
        if tuple(getattr(scores, name).shape) != shape:
            raise ValueError(f"importance scores {name} have shape {tuple(getattr(scores, name).shape)} but "
                             f"the source model needs {shape}: the scores belong to another model")


def _kept_flags(flags, kept_layers) -> Optional[list]:
    """The kept layers' own per-layer flags; None when none of them is set (what an unflagged model records)."""
    kept = [flags[i] for i in kept_layers] if flags else []
    return kept if any(kept) else None


def make_plan(scores: ImportanceScores, arch: ModelArch, targets: PruneTargets, tp: int = 1,
              merge_heads: bool = True) -> PrunePlan:
    """Validate the targets and rank every axis; ``tp`` is the tensor-parallel size the pruned model will be
    trimmed at (targets must divide by it)."""
    _check_shapes(scores, arch)
    hidden_t, ffn_t, heads_t, groups_t = _resolve_width(arch, targets, tp)
    kept_layers = _resolve_depth(scores, arch.num_layers, targets)
    H, G = arch.num_attention_heads, arch.query_groups
    hpg, hpg_t = H // G, heads_t // groups_t
    groups_score = group_scores(scores.heads, G)  # recomputed: a scores file cannot disagree with its heads
    neurons, groups, heads, merges = [], [], [], []
    for layer in range(arch.num_layers):
        neurons.append(top_k(scores.neurons[layer], ffn_t))
        kept_groups = top_k(groups_score[layer], groups_t)
        groups.append(kept_groups)
        layer_heads, layer_merge = [], []
        for g in kept_groups:
            members = list(range(g * hpg, (g + 1) * hpg))
            head_scores = scores.heads[layer]
            kept = [members[i] for i in top_k(head_scores[members], hpg_t)]
            layer_heads.append(kept)
            if merge_heads:
                kept_ranked = _ranked(head_scores, kept)
                pruned_ranked = _ranked(head_scores, [h for h in members if h not in kept])
                layer_merge += [[p, kept_ranked[i % len(kept_ranked)]] for i, p in enumerate(pruned_ranked)]
        heads.append(layer_heads)
        merges.append(layer_merge)
    target = dataclasses.replace(
        arch, num_layers=len(kept_layers), hidden_size=hidden_t, ffn_hidden_size=ffn_t,
        num_attention_heads=heads_t,
        num_query_groups=None if arch.num_query_groups is None and groups_t == heads_t else groups_t,
        kv_channels=arch.head_dim,
        # the kept layers keep whether they rotate (NoPE layers, SmolLM3)
        no_rope_freq=_kept_flags(arch.no_rope_freq, kept_layers))
    return PrunePlan(source=arch, target=target, kept_layers=kept_layers, hidden=top_k(scores.hidden, hidden_t),
                     neurons=neurons, groups=groups, heads=heads, head_merge=merges)
