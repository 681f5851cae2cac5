"""model/params.py's tensor table against the models megatron-core really builds: for each architecture
variant, the table's names and shapes are those of ``build_gpt``'s state dict, its count is the sum of the
parameters' numel, and its TP-rank shapes are those of the HF mapping's shards (cut another way)."""
import dataclasses

import pytest

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.model import params
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed

BASE = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=200, seq_length=16)
ARCHS = {
    "gqa_swiglu_rmsnorm": BASE,
    "mha": dataclasses.replace(BASE, num_query_groups=None),
    "layernorm_bias_gelu": dataclasses.replace(BASE, normalization="LayerNorm", add_bias_linear=True,
                                               activation="gelu"),
    "tied": dataclasses.replace(BASE, tie_embeddings=True),
    "learned_positions": dataclasses.replace(BASE, position_embedding="learned_absolute",
                                             normalization="LayerNorm"),
    "squared_relu": dataclasses.replace(BASE, activation="squared_relu"),
    "qkv_bias_mqa": dataclasses.replace(BASE, add_qkv_bias=True, num_query_groups=1),
    "swiglu_all_biases_head_dim_24": dataclasses.replace(BASE, add_bias_linear=True, kv_channels=24),
    "qk_layernorm_head_dim_16": dataclasses.replace(BASE, qk_layernorm=True, kv_channels=16),  # Qwen3
    "qk_layernorm_layernorm": dataclasses.replace(BASE, qk_layernorm=True, normalization="LayerNorm"),
}


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    init_distributed(1, 1)


@pytest.fixture(scope="module")
def models():
    return {}


def built(models, name):
    if name not in models:
        models[name] = build_gpt(ARCHS[name], Parallel())
    return models[name]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_table_names_and_shapes_are_the_built_models(name, models):
    arch = ARCHS[name]
    model = built(models, name)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if v is not None and not k.endswith("_extra_state")}
    table = {full: t.shape(arch) for full, t in params.stage_tensors(arch)}
    assert table == actual
    # a stage of layers 3 and 5 only (no embedding, no output layer) is numbered as asked
    middle = dict(params.stage_tensors(arch, layers=[3, 5], first_stage=False, last_stage=False))
    assert {k.split(".")[2] for k in middle} == {"3", "5"}
    assert len(middle) == 2 * len(params.layer_tensors(arch))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_table_count_is_the_sum_of_numel(name, models):
    arch = ARCHS[name]
    model = built(models, name)
    counted = sum(p.numel() for p in model.parameters())
    assert params.model_parameters(arch) == counted == arch.num_parameters()
    embedding = sum(p.numel() for n, p in model.named_parameters()
                    if n.startswith("embedding.") or n.startswith("output_layer."))
    assert params.model_parameters(arch, include_embeddings=False) == counted - embedding


def test_tied_output_layer_lives_on_a_last_stage_that_is_not_the_first():
    tied, untied = ARCHS["tied"], ARCHS["gqa_swiglu_rmsnorm"]

    def names(arch, first):
        return {n for n, _ in params.stage_tensors(arch, layers=[], first_stage=first, last_stage=True)}

    assert "output_layer.weight" not in names(tied, first=True)
    assert "output_layer.weight" in names(tied, first=False)
    assert "output_layer.weight" in names(untied, first=True)


@pytest.mark.parametrize("name", ["gqa_swiglu_rmsnorm", "layernorm_bias_gelu", "mha",
                                  "swiglu_all_biases_head_dim_24"])
def test_tp2_shard_shapes_match_the_hf_mapping_cut(name, models):
    hf = pytest.importorskip("megatron_minitron.hf")
    arch = ARCHS[name]
    model = built(models, name)
    hf_state = hf.megatron_to_hf([model.state_dict()], arch)
    read = hf.dict_reader(hf_state)
    tables = dict(params.stage_tensors(arch))
    for spec in hf.param_specs(arch):
        for rank in range(2):
            shard = hf.megatron_shard(spec, read, arch, tp_rank=rank, tp_size=2)
            assert tuple(shard.shape) == tables[spec.mcore_name].local_shape(arch, tp=2), spec.mcore_name


def test_pruning_axes_and_te_names():
    qkv = params.find("self_attention.linear_qkv.weight", per_layer=True)
    assert qkv.pruned_by == (params.HEADS, params.HIDDEN) and qkv.tp_axis_name == "qkv"
    proj = params.find("self_attention.linear_proj.weight", per_layer=True)
    assert proj.pruned_by == (params.HIDDEN, params.HEADS) and proj.tp_axis == 1
    fc2 = params.find("mlp.linear_fc2.weight", per_layer=True)
    assert fc2.pruned_by == (params.HIDDEN, params.FFN) and fc2.tp_axis == 1
    assert qkv.dropped_by == fc2.dropped_by == params.LAYERS
    emb = params.find("embedding.word_embeddings.weight", per_layer=False)
    assert emb.pruned_by == (None, params.HIDDEN) and emb.is_embedding and emb.dropped_by is None
    # Transformer Engine fuses the norms into the next linear: same row, other name
    assert params.find("self_attention.linear_qkv.layer_norm_weight", per_layer=True) is \
        params.find("input_layernorm.weight", per_layer=True)
    assert params.find("mlp.linear_fc1.layer_norm_bias", per_layer=True) is \
        params.find("pre_mlp_layernorm.bias", per_layer=True)
    assert params.find("input_layernorm.weight", per_layer=False) is None
