"""Tensor mapping: megatron logits == transformers logits, bit-exact round trips, TP shards."""
import pytest
import torch

pytest.importorskip("transformers")

from megatron_minitron.hf import (arch_from_hf_config, dict_reader, hf_to_megatron,  # noqa: E402
                                  megatron_shard, megatron_to_hf, param_specs)
from megatron_minitron.runtime.distributed import init_distributed  # noqa: E402
from megatron_minitron.hf.fused import FusedView  # noqa: E402
from tests.hf_tiny_models import (CASES, build_hf_model, convert_in_memory, hf_logits,  # noqa: E402
                                  megatron_logits, sample_tokens)


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    init_distributed(1, 1)
    yield


@pytest.mark.parametrize("case", sorted(CASES))
def test_megatron_logits_match_transformers(case):
    hf = build_hf_model(case)
    arch, family, model = convert_in_memory(hf)
    tokens = sample_tokens()
    ours = megatron_logits(model, tokens)
    reference = hf_logits(hf, tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_round_trip_is_bit_identical(case):
    hf_state = build_hf_model(case).state_dict()
    arch, family = arch_from_hf_config(build_hf_model(case).config.to_dict())
    for tp in (1, 2):
        shards = [hf_to_megatron(hf_state, arch, r, tp, family) for r in range(tp)]
        back = megatron_to_hf(shards, arch, family)  # phi3: fused qkv_proj / gate_up_proj again
        expected = {k: v for k, v in hf_state.items()
                    if not (arch.tie_embeddings and k == "lm_head.weight")}
        assert sorted(back) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(back[name], tensor), (tp, name)


@pytest.mark.parametrize("case", ["llama", "nemotron", "qwen2", "qwen3", "mistral_nemo", "phi3"])
def test_tp_shards_are_megatron_splits_of_the_full_tensor(case):
    """Reference: megatron's own TP split of the TP1 tensor — contiguous rows (columns for row-parallel),
    except SwiGLU fc1, whose [gate; up] halves are split separately (phi3: read from the fused tensors'
    row ranges)."""
    hf = build_hf_model(case)
    arch, family = arch_from_hf_config(hf.config.to_dict())
    full = hf_to_megatron(hf.state_dict(), arch, family=family)
    read = FusedView(dict_reader(hf.state_dict()), hf.state_dict(), arch, family).read
    tp = 2
    for spec in param_specs(arch):
        whole = full[spec.mcore_name]
        for rank in range(tp):
            shard = megatron_shard(spec, read, arch, rank, tp)
            if spec.kind == "glu_fc1":
                gate, up = torch.chunk(whole, 2)
                expected = torch.cat([torch.chunk(gate, tp)[rank], torch.chunk(up, tp)[rank]])
            elif spec.kind == "row":
                expected = torch.chunk(whole, tp, dim=1)[rank]
            elif spec.kind == "replicated":
                expected = whole
            else:
                expected = torch.chunk(whole, tp)[rank]
            assert torch.equal(shard, expected), (spec.mcore_name, rank)


def test_qkv_interleave_follows_megatron_group_layout():
    """Row blocks of linear_qkv, group by group: [q heads of g, k_g, v_g], checked head by head."""
    hf = build_hf_model("llama")
    arch, _ = arch_from_hf_config(hf.config.to_dict())
    full = hf_to_megatron(hf.state_dict(), arch)
    qkv = full["decoder.layers.1.self_attention.linear_qkv.weight"]
    attn = hf.model.layers[1].self_attn
    d, per_group = arch.head_dim, arch.num_attention_heads // arch.query_groups
    row = 0
    for g in range(arch.query_groups):
        for h in range(g * per_group, (g + 1) * per_group):
            assert torch.equal(qkv[row:row + d], attn.q_proj.weight[h * d:(h + 1) * d])
            row += d
        assert torch.equal(qkv[row:row + d], attn.k_proj.weight[g * d:(g + 1) * d])
        assert torch.equal(qkv[row + d:row + 2 * d], attn.v_proj.weight[g * d:(g + 1) * d])
        row += 2 * d
    assert row == qkv.shape[0]


def test_vocab_not_divisible_by_tp_is_padded_then_stripped():
    hf = build_hf_model("llama")
    state = dict(hf.state_dict())
    config = hf.config.to_dict()
    config["vocab_size"] = 95
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:95].clone()
    arch, _ = arch_from_hf_config(config)
    assert arch.padded_vocab_size(2) == 96
    shards = [hf_to_megatron(state, arch, r, 2) for r in range(2)]
    emb = shards[1]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 48 and torch.equal(emb[:47], state["model.embed_tokens.weight"][48:])
    assert torch.count_nonzero(emb[47]) == 0
    back = megatron_to_hf(shards, arch)
    assert torch.equal(back["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(back["lm_head.weight"], state["lm_head.weight"])


@pytest.mark.parametrize("case", ["qwen3_yarn", "llama_yarn", "phi3_longrope"])
def test_scaled_rope_logits_match_transformers_past_the_original_context(case):
    """YaRN and LongRoPE over 40 positions, past the original context (16, 8, 16): LongRoPE switches to its
    long factors there, as transformers does for a sequence longer than original_max_position_embeddings."""
    hf = build_hf_model(case)
    arch, family, model = convert_in_memory(hf)
    assert arch.position_embedding in ("yarn", "longrope")
    tokens = sample_tokens(seq=40)
    assert (megatron_logits(model, tokens) - hf_logits(hf, tokens)).abs().max().item() < 1e-4
