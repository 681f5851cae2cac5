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
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}}, "'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                          "original_max_position_embeddings": 16}}, "needs short_factor and long_factor"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 3,
                          "long_factor": [2.0] * 3}}, "longrope_short_factor must list 4 positive numbers"),
    ({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, "'su' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "transformers' llama rotates the whole head dim"),  # LlamaConfig ignores it
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


YARN_ROPES = [  # (config.json rope fields, max_position_embeddings)
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 40960),  # Qwen3's card
    ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
      "mscale_all_dim": 0.5, "beta_fast": 32, "beta_slow": 1}, 163840),  # the mscale pair (DeepSeek's knobs)
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "attention_factor": 1.3,
      "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}, 16384),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 0.7}, 16384),
]


@pytest.mark.parametrize("rope,max_positions", YARN_ROPES)
def test_yarn_frequencies_and_concentration_match_transformers(rope, max_positions):
    """megatron-core's YarnRotaryEmbedding, built from the converted arch, gives transformers' YaRN inverse
    frequencies and attention factor; so does transformers reading our export back."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding, _yarn_get_concentration_factor_from_config)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_minitron.config import Parallel
    from megatron_minitron.model.builder import transformer_config
    from megatron_minitron.runtime import cpu_mode

    if not torch.cuda.is_available():
        cpu_mode.enable()  # YarnRotaryEmbedding moves its frequencies to torch.cuda.current_device()
    cfg = _hf_config("llama").to_dict()
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=500000.0, rope_scaling=dict(rope), max_position_embeddings=max_positions)
    arch, _ = arch_from_hf_config(cfg)
    assert arch.position_embedding == "yarn"
    source = transformers.LlamaConfig(**copy.deepcopy(cfg))
    expected_freq, expected_attention = ROPE_INIT_FUNCTIONS["yarn"](source, "cpu")

    config = transformer_config(arch, Parallel())
    yarn = YarnRotaryEmbedding(
        kv_channels=arch.head_dim, rotary_base=int(arch.rotary_base), use_cpu_initialization=True,
        **{name[len("yarn_"):] if name != "yarn_rotary_scaling_factor" else "scaling_factor": getattr(arch, name)
           for name in ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast",
                        "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim",
                        "yarn_correction_range_round_to_int")})
    emb, concentration = yarn.get_emb(2)
    torch.testing.assert_close(emb[1, 0, 0, : arch.head_dim // 2].float(), expected_freq.float(), rtol=1e-6, atol=0)
    assert concentration == pytest.approx(expected_attention, rel=1e-12)
    # attention scales q and k by the concentration megatron reads off the config we build
    assert _yarn_get_concentration_factor_from_config(config) == pytest.approx(expected_attention, rel=1e-12)
    plain = 1.0 / (arch.rotary_base ** (torch.arange(0, arch.head_dim, 2).float() / arch.head_dim))
    assert not torch.allclose(expected_freq.float(), plain)  # YaRN really moved some frequencies

    exported = hf_config_from_arch(arch, "llama")
    again_freq, again_attention = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**exported), "cpu")
    assert torch.equal(again_freq, expected_freq)
    assert again_attention == pytest.approx(expected_attention, rel=1e-12)
    assert arch_from_hf_config(exported)[0] == arch


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 16}, "factor >= 1"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 16}, "lacks 'factor'.*= 4"),
    ({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16, "mscale": 1.0,
      "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}, r"\['llama_4_scaling_beta'\] are not part of the YaRN"),
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64, "attention_factor": 1.2},
     "no attention scaling without a factor > 1"),
])
def test_yarn_settings_megatron_cannot_express_are_rejected(rope, message):
    cfg = _hf_config("llama").to_dict()
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling=rope)
    with pytest.raises(ValueError, match=message):
        arch_from_hf_config(cfg)


def test_yarn_with_partial_rotary_is_rejected():
    """megatron-core's YaRN computes frequencies over the whole head dim (Nemotron rotates half of it)."""
    cfg = _hf_config("nemotron").to_dict()
    cfg["rope_parameters"] = dict(cfg["rope_parameters"], rope_type="yarn", factor=4.0,
                                  original_max_position_embeddings=16)
    with pytest.raises(ValueError, match="YaRN rotates the whole head dim"):
        arch_from_hf_config(cfg)


def test_phi3_sliding_window_shorter_than_the_context_is_named():
    """Phi-3-mini-4k ships sliding_window=2047 < 4096 positions: megatron attends over the whole context, which
    matches transformers only up to the window, so the import says so (as for Mistral)."""
    cfg = _hf_config("phi3").to_dict()
    cfg["sliding_window"] = 8
    with pytest.warns(UserWarning, match="sliding_window=8 is ignored"):
        arch, family = arch_from_hf_config(cfg)
    assert family == "phi3" and arch.position_embedding == "rope"
    assert hf_config_from_arch(arch, "phi3", base=cfg)["sliding_window"] == 8  # the source's own is kept


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_family_inferred_from_an_arch_can_export_it(case):
    """Without an HF lineage (a model trained from scratch, a Megatron-LM checkpoint) mcore-to-hf picks the
    family from the arch: one that holds it, the source's own where the arch tells them apart."""
    from megatron_minitron.hf import family_for_arch

    arch, family = arch_from_hf_config(_hf_config(case).to_dict())
    inferred = family_for_arch(arch)
    hf_config_from_arch(arch, inferred)  # raises if that family cannot hold the arch
    if family in ("qwen2", "qwen3", "nemotron", "smollm3", "arcee") or arch.rotary_percent != 1.0:
        assert inferred == family
    else:  # llama, mistral, phi3 with full rotary: the same architecture, written as llama
        assert inferred == "llama"


def test_phi3_exports_what_transformers_phi3config_accepts():
    """Phi3Config refuses any rope but default / longrope, and checks longrope's factor lists against
    hidden_size // num_attention_heads instead of head_dim: such exports fail here, naming the fix."""
    import dataclasses

    arch, _ = arch_from_hf_config(_hf_config("phi3_longrope").to_dict())
    assert arch.position_embedding == "longrope" and arch.head_dim == 8
    hf_config_from_arch(dataclasses.replace(arch, hidden_size=16, num_attention_heads=2, num_query_groups=1),
                        "phi3")  # hidden / heads = head_dim: fine
    with pytest.raises(ValueError, match=r"hidden_size // num_attention_heads \(12\), not head_dim \(8\)"):
        hf_config_from_arch(dataclasses.replace(arch, hidden_size=24, num_attention_heads=2, num_query_groups=1),
                            "phi3")
    yarn, _ = arch_from_hf_config(_hf_config("qwen3_yarn").to_dict())
    with pytest.raises(ValueError, match="Phi3Config takes default or longrope rope only"):
        hf_config_from_arch(dataclasses.replace(yarn, qk_layernorm=False), "phi3")


def test_longrope_attention_factor_and_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_minitron.model.longrope import LongRopeRotaryEmbedding, concentration_config

    config = _hf_config("phi3_longrope")
    arch, _ = arch_from_hf_config(config.to_dict())
    short, attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=17)
    assert arch.longrope_attention_factor == pytest.approx(attention, rel=1e-12) and attention > 1
    rope = LongRopeRotaryEmbedding(arch)
    assert torch.equal(rope.short_inv_freq, short) and torch.equal(rope.long_inv_freq, long)
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

    scaled = concentration_config(arch)
    assert _yarn_get_concentration_factor(scaled["yarn_rotary_scaling_factor"], scaled["yarn_mscale"],
                                          scaled["yarn_mscale_all_dim"]) == pytest.approx(attention, rel=1e-12)


def test_smollm3_rope_flags_follow_the_config_class():
    """no_rope_layers (1 = rotates) or, without it, a NoPE layer every no_rope_layer_interval layers, as
    SmolLM3Config derives it; megatron's no_rope_freq is the complement; sliding-window layers are refused."""
    cfg = {k: v for k, v in _hf_config("smollm3").to_dict().items() if k not in ("no_rope_layers", "layer_types")}
    cfg.update(num_hidden_layers=8, no_rope_layer_interval=4)
    arch, family = arch_from_hf_config(cfg)
    expected = transformers.SmolLM3Config(**copy.deepcopy(cfg)).no_rope_layers
    assert family == "smollm3" and arch.no_rope_freq == [1 - x for x in expected] == [0, 0, 0, 1, 0, 0, 0, 1]
    exported = hf_config_from_arch(arch, "smollm3", base=cfg)
    assert transformers.SmolLM3Config(**exported).no_rope_layers == expected
    assert arch_from_hf_config(dict(cfg, no_rope_layer_interval=100))[0].no_rope_freq is None  # all rotate
    with pytest.raises(ValueError, match="smollm3 with sliding-window layers"):
        arch_from_hf_config(dict(cfg, use_sliding_window=True, sliding_window=4))
    with pytest.raises(ValueError, match="layers without RoPE .* are smollm3's"):
        hf_config_from_arch(arch, "llama")


def test_phi3_reads_its_old_rope_type_names_as_longrope():
    """Phi3Config renames "su" and "yarn" to longrope (early Phi-3-128k configs): so does the import."""
    cfg = _hf_config("phi3_longrope").to_dict()
    expected, _ = arch_from_hf_config(cfg)
    for old in ("su", "yarn"):
        legacy = dict(cfg, rope_parameters=None, rope_theta=cfg["rope_parameters"]["rope_theta"],
                      rope_scaling={k: v for k, v in cfg["rope_parameters"].items() if k not in ("rope_type", "rope_theta")}
                      | {"type": old})
        assert transformers.Phi3Config(**copy.deepcopy(legacy)).rope_parameters["rope_type"] == "longrope"
        assert arch_from_hf_config(legacy)[0] == expected


def test_a_config_with_two_disagreeing_rope_blocks_is_refused():
    """transformers 5 takes rope_scaling whole in place of rope_parameters (4.x merged the other way): a
    transformers-5 config with a model card's rope_scaling pasted in means different models to the two."""
    cfg = _hf_config("qwen3").to_dict()
    assert cfg["rope_parameters"]["rope_type"] == "default"
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    with pytest.raises(ValueError, match=r"both rope_parameters and rope_scaling.*\['factor'.*'rope_type'\]"):
        arch_from_hf_config(cfg)
    # a key in one only: transformers 5 would drop rope_parameters' rope_theta (1e6) for its default 1e4
    with pytest.raises(ValueError, match=r"differ in \['rope_theta'\]"):
        arch_from_hf_config(dict(cfg, rope_scaling={"type": "default"}))
    same = dict(cfg, rope_scaling=dict(cfg["rope_parameters"]))  # the same thing twice: fine
    assert arch_from_hf_config(same)[0] == arch_from_hf_config(_hf_config("qwen3").to_dict())[0]


def test_phi3_smollm3_arcee_exports_without_token_ids_build_in_transformers():
    """Phi3Config / SmolLM3Config / ArceeConfig default their ids past a small vocabulary (pad 32000 / 128004, the
    embedding's padding_idx; Arcee's bos 128000): an export with no source ids writes null until a tokenizer
    fills them."""
    from megatron_minitron.config import ModelArch

    for family, arch in (("phi3", ModelArch(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                            vocab_size=96, rotary_percent=0.5, seq_length=64)),
                         ("smollm3", ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64,
                                               num_attention_heads=4, vocab_size=96, seq_length=64,
                                               no_rope_freq=[0, 1])),
                         ("arcee", ModelArch(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                             vocab_size=96, seq_length=64, activation="squared_relu"))):
        exported = hf_config_from_arch(arch)  # no lineage: the family comes from the arch
        assert exported["model_type"] == family
        assert exported["pad_token_id"] is exported["bos_token_id"] is exported["eos_token_id"] is None
        config = transformers.AutoConfig.for_model(**exported)
        with torch.device("meta"):
            transformers.AutoModelForCausalLM.from_config(config)  # raised "Padding_idx must be within ..."


def test_phi3_longrope_context_lengths_and_export_form_follow_phi3config():
    """Phi3Config's own original_max_position_embeddings (default 4096) overrides the rope dict's; the export
    uses the three-key rope_scaling transformers 4.x's Phi3Config requires when the attention factor is the
    one derived from the context lengths, and spells the factor out otherwise."""
    import dataclasses

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _hf_config("phi3_longrope").to_dict()
    for without in ({"original_max_position_embeddings": None}, {"original_max_position_embeddings": None,
                                                                 "rope_parameters": dict(cfg["rope_parameters"],
                                                                 original_max_position_embeddings=8)}):
        legacy = {k: v for k, v in dict(cfg, **without).items() if v is not None}
        legacy["max_position_embeddings"] = 16384
        arch, _ = arch_from_hf_config(legacy)
        source = transformers.Phi3Config(**copy.deepcopy(legacy))
        _, attention = ROPE_INIT_FUNCTIONS["longrope"](source, "cpu")
        assert arch.longrope_original_max_position_embeddings == source.rope_parameters[
            "original_max_position_embeddings"] == 4096
        assert arch.longrope_attention_factor == pytest.approx(attention, rel=1e-12)
    arch, _ = arch_from_hf_config(cfg)
    exported = hf_config_from_arch(arch, "phi3", base=cfg)
    assert exported["rope_scaling"].keys() == {"type", "short_factor", "long_factor"}
    assert exported["original_max_position_embeddings"] == 16
    again = transformers.Phi3Config(**exported)
    for seq_len in (None, 17):
        got, scale = ROPE_INIT_FUNCTIONS["longrope"](again, "cpu", seq_len=seq_len)
        want, expected_scale = ROPE_INIT_FUNCTIONS["longrope"](transformers.Phi3Config(**cfg), "cpu", seq_len=seq_len)
        assert torch.equal(got, want) and scale == pytest.approx(expected_scale, rel=1e-12)
    other = dataclasses.replace(arch, longrope_attention_factor=1.5)
    spelled = hf_config_from_arch(other, "phi3", base=cfg)["rope_scaling"]
    assert spelled["attention_factor"] == 1.5 and spelled["rope_type"] == "longrope"
    assert arch_from_hf_config(hf_config_from_arch(other, "phi3", base=cfg))[0] == other


def test_llama3_rope_exports_for_every_family_whose_rope_takes_it():
    """transformers' rope for these families takes any rope type it knows: a Llama-3.1-scaled arch exported as
    mistral (or arcee, smollm3) gets the llama3 frequencies; Phi3Config takes default / longrope only."""
    import dataclasses

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    source = _hf_config("llama31")
    arch, _ = arch_from_hf_config(source.to_dict())
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](source, "cpu")
    for family, variant in (("mistral", arch), ("smollm3", arch),
                            ("arcee", dataclasses.replace(arch, activation="squared_relu"))):
        exported = transformers.AutoConfig.for_model(**hf_config_from_arch(variant, family))
        assert torch.equal(ROPE_INIT_FUNCTIONS["llama3"](exported, "cpu")[0], expected), family
    with pytest.raises(ValueError, match="phi3 has no llama3 rope scaling"):
        hf_config_from_arch(arch, "phi3")


def test_rms_norm_eps_defaults_to_the_config_class_default():
    for case in ("arcee", "phi3", "llama", "qwen3"):
        cfg = {k: v for k, v in _hf_config(case).to_dict().items() if k != "rms_norm_eps"}
        expected = getattr(transformers, CASES[case][0])().rms_norm_eps
        assert arch_from_hf_config(cfg)[0].norm_epsilon == expected, case
