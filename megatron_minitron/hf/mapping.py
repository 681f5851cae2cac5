"""Which HF tensors make each megatron parameter, and how one TP rank's shard is cut from them.

Megatron layouts (megatron-core 0.16 local / TE spec, checked against transformer/attention.py and
transformer/mlp.py):
- ``linear_qkv``: rows grouped per query group g as [q heads of g (heads/groups * d rows), k_g (d), v_g (d)];
  TP rank r holds the contiguous groups [r*G/T, (r+1)*G/T) (the same for the bias).
- ``linear_fc1`` with SwiGLU: rows [gate; up] — ``mlp.glu`` chunks the output in two halves and puts the
  first through the activation. Under TP each rank holds [gate_r; up_r], so shards are cut per half.
- column-parallel (qkv, fc1, word_embeddings, output_layer) split rows; row-parallel (linear_proj,
  linear_fc2) split columns; norms and row-parallel biases are replicated.
- RoPE: HF's rotate_half on [first half, second half] of the rotated dims is megatron's non-interleaved
  rotation (``rope_utils._rotate_half``), partial rotary on the leading dims in both: no permutation of
  q/k rows is needed for any supported family.
- Embedding / output rows: the padded vocab (``ModelArch.padded_vocab_size(tp)``) is filled with HF rows
  then zero rows; export keeps the first ``vocab_size`` rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import ModelArch
from ..model import params
from .fused import FusedView, fuse

# kinds of megatron parameters
QKV, GLU_FC1, COLUMN, VOCAB, ROW, REPLICATED = "qkv", "glu_fc1", "column", "vocab", "row", "replicated"

# HF names of a layer's tensors (all families share them)
_HF_LAYER = "model.layers.{i}."
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ParamSpec:
    """One megatron parameter (global layer numbering) and the HF tensors it is made of."""
    mcore_name: str
    kind: str
    hf_names: tuple


# megatron tensor (model/params.py's name) -> its HF tensors; per-layer names relative to the layer prefixes.
# Which megatron tensors exist, and their axes, come from model/params.py. A tensor missing here (learned
# position embeddings) has no counterpart in the supported families: hf/families.py refuses such archs and
# convert.py names the parameter.
_HF_NAMES = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "input_layernorm.weight": ("input_layernorm.weight",),
    "input_layernorm.bias": ("input_layernorm.bias",),
    "self_attention.linear_qkv.weight": tuple(f"self_attn.{x}_proj.weight" for x in "qkv"),
    "self_attention.linear_qkv.bias": tuple(f"self_attn.{x}_proj.bias" for x in "qkv"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "self_attention.linear_proj.bias": ("self_attn.o_proj.bias",),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),  # qwen3; d channels, applied per head
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "pre_mlp_layernorm.bias": ("post_attention_layernorm.bias",),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "mlp.linear_fc2.bias": ("mlp.down_proj.bias",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "decoder.final_layernorm.bias": ("model.norm.bias",),
    "output_layer.weight": ("lm_head.weight",),
}


def _hf_names(tensor: params.Tensor, arch: ModelArch) -> Optional[tuple]:
    if tensor.name in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
        kind = tensor.name.rsplit(".", 1)[1]
        parts = ("gate", "up") if arch.activation == "swiglu" else ("up",)  # SwiGLU: rows [gate; up]
        return tuple(f"mlp.{x}_proj.{kind}" for x in parts)
    if tensor.name == "output_layer.weight" and arch.tie_embeddings:
        return ("model.embed_tokens.weight",)  # the copy a last stage (not the first) keeps of the embedding
    return _HF_NAMES.get(tensor.name)


def _kind(tensor: params.Tensor, arch: ModelArch) -> str:
    """How TP splits the tensor, and so how its shards are cut from the HF tensors."""
    axis = tensor.tp_axis_name
    if axis is None:
        return REPLICATED
    if axis == "qkv":
        return QKV
    if axis == "vocab":
        return VOCAB
    if tensor.tp_axis == 1:
        return ROW
    assert axis == "fc1", tensor
    return GLU_FC1 if arch.activation == "swiglu" else COLUMN


def param_specs(arch: ModelArch, layers: Optional[range] = None, first_stage: bool = True,
                last_stage: bool = True) -> list:
    """Specs of the megatron parameters of a pipeline stage (default: the whole model)."""
    specs = []
    for name, tensor in params.stage_tensors(arch, layers, first_stage, last_stage):
        hf_names = _hf_names(tensor, arch)
        if hf_names is None:
            continue
        if tensor.place == params.LAYER:
            i = int(_LAYER_RE.match(name).group(1))
            hf_names = tuple(_HF_LAYER.format(i=i) + n for n in hf_names)
        specs.append(ParamSpec(name, _kind(tensor, arch), hf_names))
    return specs


def expected_hf_names(arch: ModelArch) -> set:
    names = set()
    for spec in param_specs(arch):
        names.update(spec.hf_names)
    return names


# HF checkpoints may carry these derived buffers; they are recomputed, never converted
IGNORED_HF_NAME = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def check_hf_names(names, arch: ModelArch, where: str, file_name: Callable[[str], str] = str) -> None:
    """ValueError when the checkpoint's tensor names do not fit ``arch`` (missing or unexpected).
    ``file_name``: a name as the files spell it (``fused.FusedView.file_name``), for the message."""
    names = {n for n in names if not IGNORED_HF_NAME.search(n)}
    expected = expected_hf_names(arch)
    optional = {"lm_head.weight"} if arch.tie_embeddings else set()  # some tied checkpoints still store it
    missing = sorted({file_name(n) for n in expected - names})
    unexpected = sorted(names - expected - optional)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the weights do not match config.json ({len(missing)} missing, {len(unexpected)} "
            f"unexpected). Missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected: "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. Check that config.json belongs to "
            "these weights and that every shard is present")


def to_global_name(local_name: str, layer_global_index: Callable[[int], int]) -> str:
    """``decoder.layers.<local>.x`` -> ``decoder.layers.<global>.x`` (other names unchanged)."""
    match = _LAYER_RE.match(local_name)
    if not match:
        return local_name
    return f"decoder.layers.{layer_global_index(int(match.group(1)))}.{match.group(2)}"


# ---------------------------------------------------------------------------------------------------
# HF -> one megatron shard. ``read(name, rows=None, cols=None)`` returns the tensor or a slice of it
# (safetensors ``get_slice`` under the hood for files, so only the needed bytes are read).

def _split(n: int, tp_size: int, tp_rank: int, what: str) -> slice:
    if n % tp_size:
        raise ValueError(f"{what}={n} is not divisible by TP={tp_size}")
    size = n // tp_size
    return slice(tp_rank * size, (tp_rank + 1) * size)


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q; k; v] rows (HF) of ``groups`` query groups -> megatron's per-group [q_g, k_g, v_g] rows."""
    tail = q.shape[1:]
    qg = q.reshape(groups, -1, *tail)
    kg = k.reshape(groups, -1, *tail)
    vg = v.reshape(groups, -1, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, arch: ModelArch, groups: Optional[int] = None):
    """Inverse of ``interleave_qkv``: megatron rows of ``groups`` groups -> (q, k, v) HF rows."""
    groups = arch.query_groups if groups is None else groups
    d = arch.head_dim
    q_rows = arch.num_attention_heads // arch.query_groups * d
    tail = qkv.shape[1:]
    per_group = qkv.reshape(groups, q_rows + 2 * d, *tail)
    q, k, v = torch.split(per_group, [q_rows, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _row_parallel_inputs(spec: ParamSpec, arch: ModelArch) -> int:
    """Length of the input axis (the one TP splits) of a row-parallel linear: heads * d or ffn."""
    tensor = params.find(_LAYER_RE.match(spec.mcore_name).group(2), per_layer=True)
    return params.axis_size(arch, tensor.axes[tensor.tp_axis])


def megatron_shard(spec: ParamSpec, read, arch: ModelArch, tp_rank: int = 0, tp_size: int = 1
                   ) -> torch.Tensor:
    """This TP rank's shard of the megatron parameter ``spec``, read from HF tensors via ``read``."""
    if spec.kind == REPLICATED:
        return read(spec.hf_names[0])
    if spec.kind == QKV:
        groups = _split(arch.query_groups, tp_size, tp_rank, "num_query_groups")
        d = arch.head_dim
        q_rows = arch.num_attention_heads // arch.query_groups * d
        q = read(spec.hf_names[0], rows=slice(groups.start * q_rows, groups.stop * q_rows))
        k = read(spec.hf_names[1], rows=slice(groups.start * d, groups.stop * d))
        v = read(spec.hf_names[2], rows=slice(groups.start * d, groups.stop * d))
        return interleave_qkv(q, k, v, groups.stop - groups.start)
    if spec.kind == GLU_FC1:
        rows = _split(arch.ffn_hidden_size, tp_size, tp_rank, "ffn_hidden_size")
        return torch.cat([read(spec.hf_names[0], rows=rows), read(spec.hf_names[1], rows=rows)])
    if spec.kind == COLUMN:
        return read(spec.hf_names[0], rows=_split(arch.ffn_hidden_size, tp_size, tp_rank, "ffn_hidden_size"))
    if spec.kind == ROW:
        n = _row_parallel_inputs(spec, arch)
        return read(spec.hf_names[0], cols=_split(n, tp_size, tp_rank, "input dim of " + spec.mcore_name))
    if spec.kind == VOCAB:
        padded = arch.padded_vocab_size(tp_size)
        rows = _split(padded, tp_size, tp_rank, "padded vocab")
        stored = slice(rows.start, min(rows.stop, arch.vocab_size))
        part = read(spec.hf_names[0], rows=stored) if stored.stop > stored.start else None
        missing = (rows.stop - rows.start) - (0 if part is None else part.shape[0])
        if missing:
            pad = torch.zeros(missing, arch.hidden_size,
                              dtype=part.dtype if part is not None else torch.float32)
            part = pad if part is None else torch.cat([part, pad])
        return part
    raise AssertionError(f"unknown kind {spec.kind}")


def dict_reader(state: dict):
    """``read`` over an in-memory HF state dict (tests, and tensors already loaded)."""
    def read(name, rows=None, cols=None):
        if name not in state:
            raise KeyError(name)
        t = state[name]
        if rows is not None:
            t = t[rows]
        if cols is not None:
            t = t[:, cols]
        return t
    return read


# ---------------------------------------------------------------------------------------------------
# megatron shards (all TP ranks of one parameter) -> HF tensors

def hf_tensors(spec: ParamSpec, shards: list, arch: ModelArch) -> dict:
    """{hf name: tensor} for a megatron parameter given its shards from TP ranks 0..T-1."""
    if spec.kind == REPLICATED:
        return {spec.hf_names[0]: shards[0]}
    if spec.kind == QKV:
        q, k, v = split_qkv(torch.cat(shards), arch)
        return dict(zip(spec.hf_names, (q, k, v)))
    if spec.kind == GLU_FC1:
        halves = [torch.chunk(s, 2) for s in shards]
        return {spec.hf_names[0]: torch.cat([h[0] for h in halves]),
                spec.hf_names[1]: torch.cat([h[1] for h in halves])}
    if spec.kind == COLUMN:
        return {spec.hf_names[0]: torch.cat(shards)}
    if spec.kind == ROW:
        return {spec.hf_names[0]: torch.cat(shards, dim=1)}
    if spec.kind == VOCAB:
        return {spec.hf_names[0]: torch.cat(shards)[:arch.vocab_size]}
    raise AssertionError(f"unknown kind {spec.kind}")


def shard_dim(spec: ParamSpec) -> Optional[int]:
    """The dim megatron splits across TP ranks (None: replicated)."""
    return {QKV: 0, GLU_FC1: 0, COLUMN: 0, VOCAB: 0, ROW: 1, REPLICATED: None}[spec.kind]


def hf_to_megatron(hf_state: dict, arch: ModelArch, tp_rank: int = 0, tp_size: int = 1,
                   family: Optional[str] = None) -> dict:
    """Whole-model (all layers, global numbering) megatron state of one TP rank, in memory. ``family``: the
    state's HF family, for those that store fused tensors (fused.py)."""
    read = FusedView(dict_reader(hf_state), hf_state, arch, family).read
    return {s.mcore_name: megatron_shard(s, read, arch, tp_rank, tp_size)
            for s in param_specs(arch)}


def megatron_to_hf(shards_per_rank: list, arch: ModelArch, family: Optional[str] = None) -> dict:
    """Inverse of ``hf_to_megatron``: [state of TP rank 0, rank 1, ...] -> HF state dict (of ``family``)."""
    out = {}
    for spec in param_specs(arch):
        out.update(fuse(hf_tensors(spec, [s[spec.mcore_name] for s in shards_per_rank], arch), arch, family))
    return out
