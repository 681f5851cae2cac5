"""What a prune run did, for people and scripts: ``prune_summary.yaml`` beside the pruned weights.

Parameter counts come from ``ModelArch.num_parameters`` (exact for the models ``build_gpt`` makes; the
embedding count uses the padded vocabulary at TP 1). Kept indices of every axis are in the plan file
(``prune_plan.json``, ``PrunePlan.to_json``) written next to the summary; the summary lists the layers and
the size of every axis.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Dict, Optional

import yaml

from ..config import ModelArch
from .plan import PrunePlan

SUMMARY_FILE = "prune_summary.yaml"
PLAN_FILE = "prune_plan.json"
AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "query_groups")


class PhaseTimer:
    """Wall-clock seconds per named phase: ``with timer("load"): ...``; a phase entered twice adds up."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def parameter_counts(arch: ModelArch) -> dict:
    return {"total": arch.num_parameters(), "non_embedding": arch.num_parameters(include_embeddings=False)}


def build_summary(plan: PrunePlan, *, importance: dict, seconds: Dict[str, float], source: str, output: str,
                  in_place: bool, head_merge: bool, scores_file: Optional[str] = None,
                  tokenizer=None, plan_file: str = PLAN_FILE) -> dict:
    """A plain dict (YAML-safe) describing one prune run. ``importance``: the settings and sample count the
    scores were computed with; ``seconds``: ``PhaseTimer.seconds``."""
    before, after = parameter_counts(plan.source), parameter_counts(plan.target)
    dropped = [i for i in range(plan.source.num_layers) if i not in set(plan.kept_layers)]
    return {
        "source": source,
        "output": output,
        "in_place": in_place,
        "parameters": {
            "before": before, "after": after,
            "kept_fraction": {k: round(after[k] / before[k], 6) for k in before},
        },
        "architecture": {axis: {"before": getattr(plan.source, axis), "after": getattr(plan.target, axis)}
                         for axis in AXES},
        "kept": {
            "layers": list(plan.kept_layers),
            "dropped_layers": dropped,
            "hidden_channels": len(plan.hidden),
            "heads_per_layer": [sorted(h for group in layer for h in group) for layer in plan.heads],
            "query_groups_per_layer": [list(g) for g in plan.groups],
            "neurons_per_layer": len(plan.neurons[0]) if plan.neurons else 0,
            "indices": f"{plan_file} (0-based source indices of every axis; PrunePlan.from_dict)",
        },
        "head_merge": {"enabled": head_merge,
                       "merged_pairs": sum(len(m) for m in plan.head_merge) if head_merge else 0},
        "importance": {**importance, "scores_file": scores_file},
        "tokenizer": tokenizer,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def format_summary(summary: dict) -> str:
    """A few human-readable lines (the YAML file has everything)."""
    p = summary["parameters"]
    arch = summary["architecture"]
    lines = [
        f"parameters: {p['before']['total']:,} -> {p['after']['total']:,} total "
        f"({100 * p['kept_fraction']['total']:.1f}%), {p['before']['non_embedding']:,} -> "
        f"{p['after']['non_embedding']:,} non-embedding ({100 * p['kept_fraction']['non_embedding']:.1f}%)",
        "architecture: " + ", ".join(f"{k} {v['before']}->{v['after']}" for k, v in arch.items()),
        f"layers kept: {summary['kept']['layers']} (dropped {summary['kept']['dropped_layers']})",
        "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in summary["seconds"].items()),
        f"output: {summary['output']}" + (" (rewritten in place)" if summary["in_place"] else ""),
    ]
    return "\n".join(lines)


def write_summary(directory: str, summary: dict) -> str:
    """Write ``directory/prune_summary.yaml`` atomically and durably; returns its path."""
    from ..checkpoint.metadata import plain
    from ..runtime.files import write_yaml_durably

    path = os.path.join(directory, SUMMARY_FILE)
    write_yaml_durably(path, plain(summary))
    return path


def read_summary(directory: str) -> dict:
    with open(os.path.join(directory, SUMMARY_FILE)) as f:
        return yaml.safe_load(f)


def importance_record(settings, num_samples: int) -> dict:
    return {"settings": dataclasses.asdict(settings), "num_samples": int(num_samples)}
