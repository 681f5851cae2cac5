"""Published config.json files (hyperparameters as their model repositories give them, every key kept):
they import (Phi-4, Qwen3-8B with its card's YaRN, Phi-3.5-mini's LongRoPE), transformers builds the same
model from our export, and the parameter counts agree with
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

# microsoft/Phi-3.5-mini-instruct: LongRoPE, 48 factors per list (head dim 96 / 2), 4096 -> 131072 positions
PHI_35_MINI = {
    "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0,
    "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
    "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "longrope", "long_factor": [
        1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
        1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
        4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
        17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
        32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
        50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
        62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
        63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
        64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
        64.51000213623047, 64.52999877929688, 64.83999633789062], "short_factor": [
        1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
        1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
        1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
        1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
        1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
        2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
        2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
        2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
        2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
        2.749999523162842, 2.8399994373321533]},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 32064,
}


def _transformers_parameters(config_dict) -> int:
    config = transformers.AutoConfig.for_model(**copy.deepcopy(config_dict))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("published,family,position", [(PHI_4, "phi3", "rope"), (QWEN3_8B_YARN, "qwen3", "yarn"),
                                                       (PHI_35_MINI, "phi3", "longrope")])
def test_published_config_imports_and_exports(published, family, position):
    arch, detected = arch_from_hf_config(copy.deepcopy(published))
    assert detected == family and arch.position_embedding == position
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads, arch.query_groups,
            arch.vocab_size) == (published["num_hidden_layers"], published["hidden_size"],
                                 published["intermediate_size"], published["num_attention_heads"],
                                 published["num_key_value_heads"], published["vocab_size"])
    assert arch.head_dim == published.get("head_dim", published["hidden_size"] // published["num_attention_heads"])
    assert arch.seq_length == published["max_position_embeddings"]
    assert arch.num_parameters() == _transformers_parameters(published)  # 14.66e9, 8.19e9 and 3.82e9

    exported = hf_config_from_arch(arch, family, base=published)
    rewritten = ("rope_scaling", "transformers_version", "torch_dtype", "auto_map")
    assert {k: exported[k] for k in published if k not in rewritten} \
        == {k: v for k, v in published.items() if k not in rewritten}
    assert "auto_map" not in exported  # remote-code classes are not copied and not written for pruned sizes
    source, again = (transformers.AutoConfig.for_model(**copy.deepcopy(c)) for c in (published, exported))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = source.rope_parameters["rope_type"]
    assert again.rope_parameters["rope_type"] == rope_type
    expected_freq, expected_scale = ROPE_INIT_FUNCTIONS[rope_type](source, "cpu") if rope_type != "default" else \
        (None, 1.0)
    if expected_freq is not None:
        freq, scale = ROPE_INIT_FUNCTIONS[rope_type](again, "cpu")
        assert torch.equal(freq, expected_freq) and scale == pytest.approx(expected_scale, rel=1e-12)
    if rope_type == "longrope":  # the long factors too (a sequence past the original 4096 positions)
        from megatron_minitron.model.longrope import longrope_inv_freq

        long_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](again, "cpu", seq_len=4097)
        assert torch.equal(long_freq, ROPE_INIT_FUNCTIONS[rope_type](source, "cpu", seq_len=4097)[0])
        assert torch.equal(longrope_inv_freq(arch, arch.longrope_long_factor), long_freq)
        assert arch.longrope_attention_factor == pytest.approx(expected_scale, rel=1e-12)  # 1.19
    assert arch_from_hf_config(exported)[0] == arch
