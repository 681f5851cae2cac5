"""``ImportanceSettings`` (how scores are computed) and ``ImportanceScores`` (the gathered result).

One calibration pass gives an ``ImportanceScores`` that serves any number of pruning targets: it is saved as
a ``torch.save`` file holding plain tensors plus a JSON header with the settings and shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .aggregate import check_aggregation

FORMAT_VERSION = 1


@dataclass
class ImportanceSettings:
    """Settings of one calibration pass.

    batch_aggregation / sequence_aggregation: mean | l2 | var (paper best: l2 / mean).
    depth_metrics: depth scores to compute. ``"bi"`` (block importance, 1 - cos(in, out), from the same
        forward pass) and any name registered with ``register_depth_metric`` (built in: ``"lm_loss"``,
        the increase of the LM loss when the layer or block is skipped; needs ``labels`` in the batches).
    block_sizes: sizes k > 1 of contiguous blocks to score as well (every block of k layers); 1 is implied.
    depth_batches: how many of the calibration batches (the first ones) the removal metrics (``lm_loss``
        and registered ones) run over, each once per layer/block; None = all of them.
    """

    batch_aggregation: str = "l2"
    sequence_aggregation: str = "mean"
    depth_metrics: List[str] = field(default_factory=lambda: ["bi"])
    block_sizes: List[int] = field(default_factory=list)
    depth_batches: Optional[int] = None

    def validate(self, num_layers: Optional[int] = None) -> None:
        check_aggregation(self.batch_aggregation, "batch")
        check_aggregation(self.sequence_aggregation, "sequence")
        for k in self.block_sizes:
            if int(k) < 1 or (num_layers is not None and int(k) > num_layers):
                raise ValueError(f"block size {k} must be between 1 and the number of layers "
                                 f"({num_layers}); fix ImportanceSettings.block_sizes")
        if self.depth_batches is not None and self.depth_batches < 1:
            raise ValueError("ImportanceSettings.depth_batches must be >= 1 or None (all batches)")

    def all_block_sizes(self) -> List[int]:
        return sorted({1, *map(int, self.block_sizes)})


@dataclass
class ImportanceScores:
    """Scores of every prunable unit of the whole model (identical on every rank after estimation).

    heads [L, H], groups [L, G] (sum of the group's head scores), neurons [L, F], hidden [Hd];
    layers: metric -> [L] (score of removing/keeping that single layer; higher = more important);
    blocks: metric -> {k: [L - k + 1]}, entry i = the block of layers i .. i + k - 1 (0-based).
    """

    settings: ImportanceSettings
    heads: torch.Tensor
    groups: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor
    layers: Dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: Dict[str, Dict[int, torch.Tensor]] = field(default_factory=dict)
    num_samples: int = 0

    @property
    def num_layers(self) -> int:
        return self.heads.shape[0]

    def has_depth(self, metric: str, size: int) -> bool:
        """Whether the scores rank single layers (size 1) or contiguous blocks of ``size`` by ``metric``."""
        if size == 1:
            return metric in self.layers
        return size in self.blocks.get(metric, {})

    def depth_inventory(self) -> dict:
        """metric -> the sizes it scores (1 = single layers), for messages."""
        have = {m: [1] for m in self.layers}
        for m, by_size in self.blocks.items():
            have.setdefault(m, []).extend(sorted(by_size))
        return have

    def block(self, metric: str, size: int) -> torch.Tensor:
        if size == 1 and metric in self.layers:
            return self.layers[metric]
        if metric not in self.blocks or size not in self.blocks[metric]:
            have = {m: sorted(b) for m, b in self.blocks.items()}
            raise ValueError(f"no {metric!r} scores for blocks of {size} layers (have {have}); rerun "
                             f"importance with depth_metrics including {metric!r} and block_sizes "
                             f"including {size} (`minitron prune --data PREFIX --depth-metrics {metric} "
                             f"--block-sizes {size} --scores FILE`)")
        return self.blocks[metric][size]

    def save(self, path: str) -> None:
        header = {"format_version": FORMAT_VERSION, "settings": dataclasses.asdict(self.settings),
                  "num_samples": self.num_samples,
                  "shapes": {"heads": list(self.heads.shape), "neurons": list(self.neurons.shape),
                             "hidden": list(self.hidden.shape)}}
        tensors = {"heads": self.heads, "groups": self.groups, "neurons": self.neurons,
                   "hidden": self.hidden}
        for m, t in self.layers.items():
            tensors[f"layers/{m}"] = t
        for m, by_size in self.blocks.items():
            for k, t in by_size.items():
                tensors[f"blocks/{m}/{k}"] = t
        payload = {"header": json.dumps(header, sort_keys=True),
                   "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}}
        save_torch_durably(payload, path)

    @classmethod
    def load(cls, path: str) -> "ImportanceScores":
        if not os.path.exists(path):
            raise FileNotFoundError(f"importance scores file {path} not found; run importance "
                                    "estimation first (estimate_importance / `minitron prune`)")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        header = json.loads(payload["header"])
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: scores format {header.get('format_version')} is not "
                             f"{FORMAT_VERSION}; recompute the importance scores")
        t = payload["tensors"]
        layers, blocks = {}, {}
        for key, value in t.items():
            parts = key.split("/")
            if parts[0] == "layers":
                layers[parts[1]] = value
            elif parts[0] == "blocks":
                blocks.setdefault(parts[1], {})[int(parts[2])] = value
        return cls(settings=ImportanceSettings(**header["settings"]), heads=t["heads"], groups=t["groups"],
                   neurons=t["neurons"], hidden=t["hidden"], layers=layers, blocks=blocks,
                   num_samples=int(header["num_samples"]))


def save_torch_durably(obj, path: str) -> None:
    """``torch.save`` made atomic and durable as ``runtime.files.write_file_durably`` is for text: a
    temporary file, fsync, rename, fsync of the directory (a crash leaves the old file or the new one)."""
    from ..runtime.files import write_durably

    write_durably(path, lambda f: torch.save(obj, f), binary=True)


def group_scores(heads: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """[L, H] head scores -> [L, G]: sum over each group's H / G query heads (megatron order: group g owns
    heads g * H/G .. (g + 1) * H/G - 1)."""
    L, H = heads.shape
    return heads.reshape(L, num_query_groups, H // num_query_groups).sum(-1)
