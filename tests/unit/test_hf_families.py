"""config.json <-> ModelArch for each family, checked against transformers' own config objects."""
import copy
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_minitron.hf import arch_from_hf_config, hf_config_from_arch  # noqa: E402
from tests.hf_tiny_models import CASES  # noqa: E402


def _hf_config(case):
    cls_name, kwargs = CASES[case]
    return getattr(transformers, cls_name)(**copy.deepcopy(kwargs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_arch_matches_transformers_config(case):
    config = _hf_config(case)
    arch, family = arch_from_hf_config(config.to_dict())
    assert family == config.model_type
    assert arch.hidden_size == config.hidden_size
    assert arch.num_layers == config.num_hidden_layers
    assert arch.ffn_hidden_size == config.intermediate_size
    assert arch.num_attention_heads == config.num_attention_heads
    assert arch.query_groups == config.num_key_value_heads
    assert arch.head_dim == (getattr(config, "head_dim", None)
                             or config.hidden_size // config.num_attention_heads)
    assert arch.vocab_size == config.vocab_size == arch.padded_vocab_size(1)
    assert arch.tie_embeddings == config.tie_word_embeddings
    rope = config.rope_parameters
    assert arch.rotary_base == rope["rope_theta"]
    assert arch.rotary_percent == rope.get("partial_rotary_factor", 1.0)
    assert arch.rope_scaling == (rope["rope_type"] == "llama3")
    assert (arch.normalization == "LayerNorm") == (family == "nemotron") == arch.layernorm_zero_centered_gamma
    assert arch.add_qkv_bias == (family == "qwen2")


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip_through_transformers(case):
    """arch -> exported config.json -> transformers config object -> arch gives the same arch."""
    arch, family = arch_from_hf_config(_hf_config(case).to_dict())
    exported = hf_config_from_arch(arch, family)
    reloaded = transformers.AutoConfig.for_model(**exported)
    assert type(reloaded).__name__ == CASES[case][0]
    again, family_again = arch_from_hf_config(reloaded.to_dict())
    assert (again, family_again) == (arch, family)


def test_export_keeps_non_architecture_fields_and_takes_sizes_from_arch():
    base = _hf_config("llama").to_dict()
    base["bos_token_id"], base["eos_token_id"] = 7, [8, 9]
    arch, _ = arch_from_hf_config(base)
    arch.ffn_hidden_size, arch.num_layers = 48, 1  # as after pruning
    cfg = hf_config_from_arch(arch, "llama", base=base)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (7, [8, 9])
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"]) == (48, 1)


def test_mistral_export_of_a_model_without_a_mistral_source_has_no_window():
    """megatron attends over the whole context; transformers' MistralConfig would default to a 4096-token
    sliding window unless the config says there is none. A source config's own window is kept."""
    import transformers

    arch, _ = arch_from_hf_config(_hf_config("llama").to_dict())
    cfg = hf_config_from_arch(arch, "mistral")
    assert "sliding_window" in cfg and transformers.MistralConfig(**cfg).sliding_window is None
    assert hf_config_from_arch(arch, "mistral", base={"sliding_window": 32})["sliding_window"] == 32


def test_llama3_rope_frequencies_match_transformers():
    """megatron-core's fixed llama3 scaling == transformers' llama3 rope init for Llama-3.1's factors."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _hf_config("llama31")
    arch, _ = arch_from_hf_config(config.to_dict())
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    rope = RotaryEmbedding(kv_channels=arch.head_dim, rotary_percent=arch.rotary_percent,
                           rotary_base=int(arch.rotary_base), rope_scaling=arch.rope_scaling,
                           rope_scaling_factor=arch.rope_scaling_factor, use_cpu_initialization=True)
    torch.testing.assert_close(rope.inv_freq.float(), expected.float(), rtol=1e-6, atol=0)
    base = 1.0 / (arch.rotary_base ** (torch.arange(0, arch.head_dim, 2).float() / arch.head_dim))
    assert not torch.allclose(expected.float(), base)  # the scaling really changes some frequencies


@pytest.mark.parametrize("key,value", [("low_freq_factor", 2.0), ("high_freq_factor", 8.0),
                                       ("original_max_position_embeddings", 4096)])
def test_llama3_factors_megatron_cannot_express_are_rejected(key, value):
    cfg = _hf_config("llama31").to_dict()
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, key: value}
    with pytest.raises(ValueError, match=key):
        arch_from_hf_config(cfg)


def test_legacy_rope_layout_is_read():
    cfg = _hf_config("llama").to_dict()
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=123456.0, rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1,
                                                  "high_freq_factor": 4,
                                                  "original_max_position_embeddings": 8192})
    arch, _ = arch_from_hf_config(cfg)
    assert (arch.rotary_base, arch.rope_scaling, arch.rope_scaling_factor) == (123456.0, True, 32.0)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "supported families: llama"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True, "mlp_bias": False}, "add_bias_linear"),
    ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128},
     "mixture-of-experts.*num_experts"),
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 8},
     "mixture-of-experts.*num_local_experts"),
])
def test_unsupported_configs_are_rejected(change, message):
    cfg = _hf_config("llama").to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        arch_from_hf_config(cfg)


@pytest.mark.parametrize("change", [{"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
                                    {"layer_types": ["full_attention", "sliding_attention"]}])
def test_qwen3_with_sliding_window_layers_is_rejected(change):
    cfg = _hf_config("qwen3").to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match="qwen3 with sliding-window layers"):
        arch_from_hf_config(cfg)


def test_export_rejects_arch_the_family_cannot_hold():
    arch, _ = arch_from_hf_config(_hf_config("nemotron").to_dict())
    with pytest.raises(ValueError, match="cannot export this model as llama"):
        hf_config_from_arch(arch, "llama")


def test_export_names_hidden_sizes_transformers_accepts():
    """A width-pruned hidden size that is not a multiple of the head count (head_dim explicit) is refused by
    transformers 5's config validation; export says so before writing, naming sizes that work."""
    import transformers

    arch, _ = arch_from_hf_config(_hf_config("llama").to_dict())
    heads = arch.num_attention_heads
    odd = dataclasses.replace(arch, hidden_size=heads * 5 + 1, kv_channels=arch.head_dim)
    if int(transformers.__version__.split(".")[0]) < 5:
        hf_config_from_arch(odd, "llama")  # older transformers take it
        return
    with pytest.raises(ValueError, match=rf"not a multiple of num_attention_heads={heads}.*e\.g\. {heads * 5} or "
                                         rf"{heads * 6}"):
        hf_config_from_arch(odd, "llama")
    cfg = hf_config_from_arch(dataclasses.replace(odd, hidden_size=heads * 5), "llama")
    transformers.LlamaConfig(**cfg)  # the suggested size is one transformers accepts
