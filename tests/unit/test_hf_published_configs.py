"""Published config.json files (hyperparameters as their model repositories give them, every key kept):
they import, transformers builds the same model from our export, and the parameter counts agree with
transformers' own model of the source config (built on the meta device: no weights)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_minitron.hf import arch_from_hf_config, hf_config_from_arch  # noqa: E402

# microsoft/phi-4 (model_type phi3: fused qkv_proj / gate_up_proj in its files)
PHI_4 = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "auto_map": {},
    "bos_token_id": 100257, "embd_pdrop": 0.0, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 17920, "max_position_embeddings": 16384, "model_type": "phi3",
    "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 10,
    "original_max_position_embeddings": 16384, "pad_token_id": 100257, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 250000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.47.0", "use_cache": True, "vocab_size": 100352,
}
# Qwen/Qwen3-8B with the rope_scaling block its model card says to add for contexts past 32768 tokens
QWEN3_8B_YARN = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def _transformers_parameters(config_dict) -> int:
    config = transformers.AutoConfig.for_model(**copy.deepcopy(config_dict))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("published,family,position", [(PHI_4, "phi3", "rope"), (QWEN3_8B_YARN, "qwen3", "yarn")])
def test_published_config_imports_and_exports(published, family, position):
    arch, detected = arch_from_hf_config(copy.deepcopy(published))
    assert detected == family and arch.position_embedding == position
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads, arch.query_groups,
            arch.vocab_size) == (published["num_hidden_layers"], published["hidden_size"],
                                 published["intermediate_size"], published["num_attention_heads"],
                                 published["num_key_value_heads"], published["vocab_size"])
    assert arch.head_dim == 128 and arch.seq_length == published["max_position_embeddings"]
    assert arch.num_parameters() == _transformers_parameters(published)  # 14.66e9 and 8.19e9

    exported = hf_config_from_arch(arch, family, base=published)
    assert {k: exported[k] for k in published if k not in ("rope_scaling", "transformers_version", "torch_dtype")} \
        == {k: v for k, v in published.items() if k not in ("rope_scaling", "transformers_version", "torch_dtype")}
    source, again = (transformers.AutoConfig.for_model(**copy.deepcopy(c)) for c in (published, exported))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = source.rope_parameters["rope_type"]
    assert again.rope_parameters["rope_type"] == rope_type
    expected_freq, expected_scale = ROPE_INIT_FUNCTIONS[rope_type](source, "cpu") if rope_type != "default" else \
        (None, 1.0)
    if expected_freq is not None:
        freq, scale = ROPE_INIT_FUNCTIONS[rope_type](again, "cpu")
        assert torch.equal(freq, expected_freq) and scale == pytest.approx(expected_scale, rel=1e-12)
    assert arch_from_hf_config(exported)[0] == arch
