"""Candidate architectures within a parameter budget (2407.14679 Sec. 2.3): pure functions.

A candidate keeps the source's head dimension, vocabulary, norms and activation; it may shrink depth,
attention heads, query groups, FFN and hidden size. Candidates respect what the run's TP x PP can hold.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import List, Optional

from ..config import ModelArch

AXES = ("num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "hidden_size")
DEFAULT_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)


@dataclass
class SearchSpace:
    """Values to try per axis; None = fractions of the source size (DEFAULT_FRACTIONS), rounded."""

    num_layers: Optional[List[int]] = None
    num_attention_heads: Optional[List[int]] = None
    num_query_groups: Optional[List[int]] = None
    ffn_hidden_size: Optional[List[int]] = None
    hidden_size: Optional[List[int]] = None


def _rounded(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _multiple(size: int) -> int:
    """Default widths are multiples of 64 (GPU-friendly), or of 8 for tiny test models."""
    return 64 if size >= 512 else 8


def axis_values(source: ModelArch, space: SearchSpace) -> dict:
    """The concrete values per axis (given ones as they are, defaults derived from the source)."""
    derived = {
        "num_layers": lambda f: max(1, round(source.num_layers * f)),
        "num_attention_heads": lambda f: max(1, round(source.num_attention_heads * f)),
        "num_query_groups": lambda f: source.query_groups,  # groups: keep unless asked (GQA is cheap)
        "ffn_hidden_size": lambda f: _rounded(source.ffn_hidden_size * f, _multiple(source.ffn_hidden_size)),
        "hidden_size": lambda f: _rounded(source.hidden_size * f, _multiple(source.hidden_size)),
    }
    values = {}
    for axis in AXES:
        given = getattr(space, axis)
        chosen = list(given) if given is not None else [derived[axis](f) for f in DEFAULT_FRACTIONS]
        if not chosen:
            raise ValueError(f"search space axis {axis} is empty; give at least one value (or null for defaults)")
        for v in chosen:
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"search space {axis}: {v!r} is not a positive integer")
            limit = getattr(source, "query_groups" if axis == "num_query_groups" else axis)
            if v > limit:
                raise ValueError(f"search space {axis}: {v} is larger than the source model's {limit}; "
                                 "pruning only shrinks")
        values[axis] = sorted(set(chosen), reverse=True)
    return values


def parameter_count(arch: ModelArch, count: str = "total") -> int:
    if count not in ("total", "non_embedding"):
        raise ValueError(f"count={count!r}: total or non_embedding")
    return arch.num_parameters(include_embeddings=count == "total")


def enumerate_candidates(source: ModelArch, space: SearchSpace, param_budget: int, tolerance: float = 0.05,
                         tp: int = 1, pp: int = 1, count: str = "total") -> List[ModelArch]:
    """Every architecture of the space within param_budget x (1 +- tolerance) that TP and PP can hold,
    closest to the budget first (ties: larger depth, then the axes in order, largest first)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be in [0, 1), e.g. 0.05 for +-5%")
    source_params = parameter_count(source, count)
    if param_budget >= source_params:
        raise ValueError(f"parameter budget {param_budget:,} is not smaller than the source model's "
                         f"{source_params:,} ({count} parameters): nothing to prune")
    if param_budget <= 0:
        raise ValueError(f"parameter budget must be positive, got {param_budget}")
    values = axis_values(source, space)
    low, high = param_budget * (1 - tolerance), param_budget * (1 + tolerance)
    found = []
    for layers, heads, groups, ffn, hidden in itertools.product(*(values[a] for a in AXES)):
        if heads % groups or heads % tp or groups % tp or ffn % tp or layers % pp:
            continue
        # no_rope_freq: which layers skip RoPE is the prune's to say (make_plan keeps the kept layers' flags)
        arch = dataclasses.replace(source, num_layers=layers, num_attention_heads=heads,
                                   num_query_groups=groups, ffn_hidden_size=ffn, hidden_size=hidden,
                                   kv_channels=source.head_dim, no_rope_freq=None)
        params = parameter_count(arch, count)
        if low <= params <= high:
            found.append((abs(params - param_budget), (-layers, -heads, -groups, -ffn, -hidden), arch))
    if not found:
        raise ValueError(f"no architecture of the search space has {param_budget:,} +- {tolerance:.0%} "
                         f"{count} parameters at TP={tp} PP={pp}; widen the space (more values per axis) or "
                         f"the tolerance")
    found.sort(key=lambda item: (item[0], item[1]))
    return [arch for _, _, arch in found]


def candidate_name(arch: ModelArch) -> str:
    return (f"L{arch.num_layers}-H{arch.hidden_size}-F{arch.ffn_hidden_size}-A{arch.num_attention_heads}"
            f"-G{arch.query_groups}")


def prune_targets(arch: ModelArch) -> dict:
    """`minitron prune --target` values that produce ``arch`` from its source."""
    return {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
            "ffn_hidden_size": arch.ffn_hidden_size, "num_attention_heads": arch.num_attention_heads,
            "num_query_groups": arch.query_groups}
