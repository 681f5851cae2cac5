"""HF families whose files fuse tensors that mapping.py keeps apart: Phi-3 / Phi-4 (``model_type: phi3``) store
``self_attn.qkv_proj`` = [q; k; v] rows and ``mlp.gate_up_proj`` = [gate; up] rows.

mapping.py names the parts (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) for every family.
For a fused family, ``FusedView`` answers reads of a part (or a row range of it) from the matching rows of the
fused tensor, so a TP rank still reads only its own elements from the files, and ``fuse`` joins the parts on
export. Both layouts are [part 0 rows; part 1 rows; ...] in order, which is what transformers' Phi3Attention
(``qkv[..., :query_pos]`` ...) and Phi3MLP (``chunk(2)``: gate first) slice.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from ..config import ModelArch

# family -> ((fused per-layer name, (its parts in row order)), ...)
FUSED_TENSORS = {
    "phi3": (("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                            "self_attn.v_proj.weight")),
             ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"))),
}
_LAYER_PREFIX = re.compile(r"^(model\.layers\.\d+\.)(.+)$")


def _part_rows(part: str, arch: ModelArch) -> int:
    d = arch.head_dim
    return {"self_attn.q_proj.weight": arch.num_attention_heads * d, "self_attn.k_proj.weight": arch.query_groups * d,
            "self_attn.v_proj.weight": arch.query_groups * d, "mlp.gate_proj.weight": arch.ffn_hidden_size,
            "mlp.up_proj.weight": arch.ffn_hidden_size}[part]


def _where(family: Optional[str], arch: ModelArch) -> dict:
    """{part: (fused name, first row, rows)} for the family's per-layer parts (empty: nothing is fused)."""
    where = {}
    for fused, parts in FUSED_TENSORS.get(family, ()):
        offset = 0
        for part in parts:
            rows = _part_rows(part, arch)
            where[part] = (fused, offset, rows)
            offset += rows
    return where


class FusedView:
    """``read(name, rows=None, cols=None)`` and ``names()`` in mapping.py's per-part names over files (or a
    state dict reader) of ``family``; for a family that fuses nothing it passes everything through."""

    def __init__(self, read, names, arch: ModelArch, family: Optional[str]):
        self._read = read
        self._where = _where(family, arch)
        fused_names = {fused for fused, _, _ in self._where.values()}
        out = []
        for name in names:
            match = _LAYER_PREFIX.match(name)
            if match and match.group(2) in fused_names:
                out.extend(match.group(1) + part for part, (fused, _, _) in self._where.items()
                           if fused == match.group(2))
            else:
                out.append(name)
        self._names = out

    def names(self) -> list:
        return list(self._names)

    def file_name(self, name: str) -> str:
        """The name the files give the tensor holding ``name`` (a part's fused tensor; else ``name``)."""
        match = _LAYER_PREFIX.match(name)
        if not match or match.group(2) not in self._where:
            return name
        return match.group(1) + self._where[match.group(2)][0]

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None):
        match = _LAYER_PREFIX.match(name)
        if not match or match.group(2) not in self._where:
            return self._read(name, rows=rows, cols=cols)
        fused, first, count = self._where[match.group(2)]
        start, stop, step = (rows or slice(None)).indices(count)
        assert step == 1, rows  # the mapping only cuts contiguous row ranges
        return self._read(match.group(1) + fused, rows=slice(first + start, first + stop), cols=cols)


def fuse(tensors: dict, arch: ModelArch, family: Optional[str]) -> dict:
    """HF tensors in per-part names -> the family's file names: each layer's parts concatenated into its fused
    tensor (all parts of one fused tensor come from one megatron parameter, so they arrive together)."""
    where = _where(family, arch)
    if not where:
        return tensors
    out, pending = {}, {}
    for name, tensor in tensors.items():
        match = _LAYER_PREFIX.match(name)
        if match and match.group(2) in where:
            pending.setdefault((match.group(1), where[match.group(2)][0]), {})[match.group(2)] = tensor
        else:
            out[name] = tensor
    for (prefix, fused), parts in pending.items():
        order = dict(FUSED_TENSORS[family])[fused]
        assert set(parts) == set(order), (prefix, fused, sorted(parts))
        out[prefix + fused] = torch.cat([parts[p] for p in order])
    return out
