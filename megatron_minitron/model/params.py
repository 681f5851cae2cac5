"""The parameter inventory of the GPTModel that ``model/builder.py`` builds: one table, read by everything that
needs to know which tensors exist and what their axes are.

Readers: ``ModelArch.num_parameters`` (exact count), ``plan/memory.py`` (bytes of weights, gradients and
optimizer state per rank), ``hf/mapping.py`` (which megatron tensors an HF checkpoint fills) and
``prune/trim.py`` (which axes of each tensor a pruning plan cuts).

Each row is one tensor kind: its megatron-core name (per-layer names relative to ``decoder.layers.<i>.``),
where it lives (embedding stage, every layer, output stage), when it exists for an architecture, and its
shape as named axes. An axis says how big it is, whether TP splits it and which pruning dimension cuts it:

    axis       size                         pruned by      layout (megatron-core 0.16)
    hidden     hidden_size                  hidden         plain channels
    qkv        d * (heads + 2 * groups)     heads/groups   per query group [q of its heads, k, v], d rows each
    attn       heads * d                    heads          per head d columns (linear_proj input)
    fc1        2 * ffn (SwiGLU) or ffn      ffn            SwiGLU: [gate; up] halves; TP splits each half
    ffn        ffn_hidden_size              ffn            plain neurons (linear_fc2 input)
    head_dim   d (kv_channels)              -              one head's channels (q/k layernorms, shared by heads)
    vocab      padded vocab (per TP size)   -              rows; padding rows are zeros
    positions  seq_length                   -              learned absolute positions

Column-parallel linears (qkv, fc1, embeddings, output layer) split their first axis across TP ranks,
row-parallel ones (linear_proj, linear_fc2) their second; norms and row-parallel biases are replicated.
Whole layers follow the ``layers`` pruning dimension.

Pure python on purpose: no torch, megatron or ``megatron_minitron.config`` import, so that ``config.py`` can
count parameters from here with a function-local import and this module stays a leaf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

# where a tensor lives
EMBEDDING_STAGE, LAYER, OUTPUT_STAGE = "embedding_stage", "layer", "output_stage"
# pruning dimensions (a layer's tensors follow LAYERS as a whole)
HIDDEN, HEADS, FFN, LAYERS = "hidden", "heads", "ffn", "layers"
LAYER_PREFIX = "decoder.layers.{i}."


@dataclass(frozen=True)
class Axis:
    name: str
    size: Callable  # (arch, tp) -> global length (tp matters only for the padded vocab)
    pruned_by: Optional[str]  # the pruning dimension that cuts it; None: never cut


def _fc1_rows(arch, tp: int) -> int:
    return 2 * arch.ffn_hidden_size if arch.activation == "swiglu" else arch.ffn_hidden_size


AXES = {a.name: a for a in (
    Axis("hidden", lambda arch, tp: arch.hidden_size, HIDDEN),
    Axis("qkv", lambda arch, tp: arch.head_dim * (arch.num_attention_heads + 2 * arch.query_groups), HEADS),
    Axis("attn", lambda arch, tp: arch.num_attention_heads * arch.head_dim, HEADS),
    Axis("fc1", _fc1_rows, FFN),
    Axis("ffn", lambda arch, tp: arch.ffn_hidden_size, FFN),
    Axis("head_dim", lambda arch, tp: arch.head_dim, None),
    Axis("vocab", lambda arch, tp: arch.padded_vocab_size(tp), None),
    Axis("positions", lambda arch, tp: arch.seq_length, None),
)}


def axis_size(arch, axis: str, tp: int = 1) -> int:
    """Global length of axis ``axis`` (a name in AXES) for ``arch``."""
    return AXES[axis].size(arch, tp)


EMBEDDING_AXES = ("vocab", "positions")  # a tensor with one of these is an embedding (left out of non-embedding counts)


# when a tensor exists: (arch, this stage also holds the word embedding) -> bool
def _always(arch, holds_embedding: bool) -> bool:
    return True


def _layernorm(arch, holds_embedding: bool) -> bool:
    return arch.normalization == "LayerNorm"  # RMSNorm has no bias


def _qk_layernorm(arch, holds_embedding: bool) -> bool:
    return bool(arch.qk_layernorm)


def _qk_layernorm_bias(arch, holds_embedding: bool) -> bool:
    return bool(arch.qk_layernorm) and arch.normalization == "LayerNorm"


def _qkv_bias(arch, holds_embedding: bool) -> bool:
    return bool(arch.add_bias_linear or arch.add_qkv_bias)


def _linear_bias(arch, holds_embedding: bool) -> bool:
    return bool(arch.add_bias_linear)


def _learned_positions(arch, holds_embedding: bool) -> bool:
    return arch.position_embedding == "learned_absolute"


def _output_layer(arch, holds_embedding: bool) -> bool:
    # tied: the output layer reuses the embedding on its stage; a last stage that is not the first keeps a copy
    return not arch.tie_embeddings or not holds_embedding


@dataclass(frozen=True)
class Tensor:
    """One tensor kind of the GPTModel."""
    name: str  # megatron-core name (local spec); per-layer names relative to ``decoder.layers.<i>.``
    place: str  # EMBEDDING_STAGE | LAYER | OUTPUT_STAGE
    axes: Tuple[str, ...]  # names in AXES, outermost first
    tp_axis: Optional[int]  # index into ``axes`` that TP splits; None: replicated on every TP rank
    exists: Callable = _always  # (arch, holds_embedding) -> bool
    fused_name: Optional[str] = None  # Transformer Engine spec: the norm fused into the next linear

    def shape(self, arch, tp: int = 1) -> Tuple[int, ...]:
        """Global (unsharded) shape; ``tp`` only sets the vocab padding."""
        return tuple(AXES[a].size(arch, tp) for a in self.axes)

    def local_shape(self, arch, tp: int = 1) -> Tuple[int, ...]:
        """Shape of one TP rank's shard."""
        shape = list(self.shape(arch, tp))
        if self.tp_axis is not None:
            shape[self.tp_axis] //= tp
        return tuple(shape)

    def numel(self, arch, tp: int = 1) -> int:
        n = 1
        for size in self.shape(arch, tp):
            n *= size
        return n

    @property
    def pruned_by(self) -> Tuple[Optional[str], ...]:
        """The pruning dimension each axis follows (None: never cut)."""
        return tuple(AXES[a].pruned_by for a in self.axes)

    @property
    def dropped_by(self) -> Optional[str]:
        """LAYERS for a transformer layer's tensors (depth pruning drops them with their layer), else None."""
        return LAYERS if self.place == LAYER else None

    @property
    def is_embedding(self) -> bool:
        return any(a in EMBEDDING_AXES for a in self.axes)

    @property
    def tp_axis_name(self) -> Optional[str]:
        return None if self.tp_axis is None else self.axes[self.tp_axis]


# Order: the embedding stage, one layer (the order hf/mapping.py has always listed them in), the output stage.
TENSORS: Tuple[Tensor, ...] = (
    Tensor("embedding.word_embeddings.weight", EMBEDDING_STAGE, ("vocab", "hidden"), 0),
    Tensor("embedding.position_embeddings.weight", EMBEDDING_STAGE, ("positions", "hidden"), None,
           _learned_positions),
    Tensor("input_layernorm.weight", LAYER, ("hidden",), None,
           fused_name="self_attention.linear_qkv.layer_norm_weight"),
    Tensor("self_attention.linear_qkv.weight", LAYER, ("qkv", "hidden"), 0),
    Tensor("self_attention.linear_proj.weight", LAYER, ("hidden", "attn"), 1),
    Tensor("pre_mlp_layernorm.weight", LAYER, ("hidden",), None, fused_name="mlp.linear_fc1.layer_norm_weight"),
    Tensor("mlp.linear_fc1.weight", LAYER, ("fc1", "hidden"), 0),
    Tensor("mlp.linear_fc2.weight", LAYER, ("hidden", "ffn"), 1),
    Tensor("input_layernorm.bias", LAYER, ("hidden",), None, _layernorm,
           fused_name="self_attention.linear_qkv.layer_norm_bias"),
    Tensor("pre_mlp_layernorm.bias", LAYER, ("hidden",), None, _layernorm,
           fused_name="mlp.linear_fc1.layer_norm_bias"),
    Tensor("self_attention.linear_qkv.bias", LAYER, ("qkv",), 0, _qkv_bias),
    Tensor("self_attention.linear_proj.bias", LAYER, ("hidden",), None, _linear_bias),  # row-parallel: replicated
    Tensor("mlp.linear_fc1.bias", LAYER, ("fc1",), 0, _linear_bias),
    Tensor("mlp.linear_fc2.bias", LAYER, ("hidden",), None, _linear_bias),  # row-parallel: replicated
    # Qwen3's per-head norms: applied to every head's d channels with one shared weight, replicated on every TP
    # rank (megatron all-reduces their grads over TP); no pruning dimension cuts them
    Tensor("self_attention.q_layernorm.weight", LAYER, ("head_dim",), None, _qk_layernorm),
    Tensor("self_attention.k_layernorm.weight", LAYER, ("head_dim",), None, _qk_layernorm),
    Tensor("self_attention.q_layernorm.bias", LAYER, ("head_dim",), None, _qk_layernorm_bias),
    Tensor("self_attention.k_layernorm.bias", LAYER, ("head_dim",), None, _qk_layernorm_bias),
    Tensor("decoder.final_layernorm.weight", OUTPUT_STAGE, ("hidden",), None),
    Tensor("decoder.final_layernorm.bias", OUTPUT_STAGE, ("hidden",), None, _layernorm),
    Tensor("output_layer.weight", OUTPUT_STAGE, ("vocab", "hidden"), 0, _output_layer),
)

_BY_NAME = {}
for _t in TENSORS:
    for _n in (_t.name, _t.fused_name):
        if _n is not None:
            _BY_NAME[(_t.place == LAYER, _n)] = _t


def find(name: str, per_layer: bool) -> Optional[Tensor]:
    """The table row of a megatron name (relative to the layer prefix when ``per_layer``), local or TE spec;
    None when the table has no such tensor."""
    return _BY_NAME.get((per_layer, name))


def layer_tensors(arch) -> List[Tensor]:
    """The tensor kinds of one transformer layer of ``arch``, in table order."""
    return [t for t in TENSORS if t.place == LAYER and t.exists(arch, True)]


def stage_tensors(arch, layers: Optional[Iterable[int]] = None, first_stage: bool = True,
                  last_stage: bool = True) -> List[Tuple[str, Tensor]]:
    """[(full megatron name, row)] of a pipeline stage (default: the whole model), layers numbered as given."""
    layers = range(arch.num_layers) if layers is None else layers
    out = [(t.name, t) for t in TENSORS if t.place == EMBEDDING_STAGE and first_stage and t.exists(arch, True)]
    per_layer = layer_tensors(arch)
    for i in layers:
        prefix = LAYER_PREFIX.format(i=i)
        out += [(prefix + t.name, t) for t in per_layer]
    if last_stage:
        out += [(t.name, t) for t in TENSORS if t.place == OUTPUT_STAGE and t.exists(arch, first_stage)]
    return out


def model_parameters(arch, tp: int = 1, include_embeddings: bool = True) -> int:
    """Exact parameter count of the whole (PP=1) model, independent of TP sharding (``tp`` pads the vocab)."""
    return sum(t.numel(arch, tp) for _, t in stage_tensors(arch) if include_embeddings or not t.is_embedding)


def layer_parameters_per_rank(arch, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank: split tensors divided by TP, the rest whole."""
    tensors = layer_tensors(arch)
    split = sum(t.numel(arch) for t in tensors if t.tp_axis is not None)
    replicated = sum(t.numel(arch) for t in tensors if t.tp_axis is None)
    return split // tp + replicated


def outer_parameters_per_rank(arch, tp: int, first_stage: bool, last_stage: bool) -> int:
    """Parameters outside the transformer layers (embeddings, final norm, output layer) on one TP rank of a
    stage; the vocab is padded for ``tp`` so that every rank holds the same number of rows."""
    tensors = [t for _, t in stage_tensors(arch, layers=(), first_stage=first_stage, last_stage=last_stage)]
    return sum(t.numel(arch, tp) // (tp if t.tp_axis is not None else 1) for t in tensors)
