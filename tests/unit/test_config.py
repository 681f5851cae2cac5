import pytest
import yaml

from megatron_minitron.config import (Data, ModelArch, Parallel, Train, TrainConfig, apply_overrides,
                                      dump_yaml, from_dict, load_config, to_dict)


def test_yaml_and_overrides_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 6, "hidden_size": 96},
                                    "train": {"lr": 1e-3}}))
    cfg = load_config(TrainConfig, str(path), ["model.num_layers=8", "train.lr=2e-4",
                                                "parallel.pipeline_split=[3,5]", "model.num_query_groups=2"])
    assert cfg.model.num_layers == 8 and cfg.model.hidden_size == 96
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.parallel.pipeline_split == [3, 5]
    assert cfg.model.query_groups == 2
    dump_yaml(cfg, str(tmp_path / "out.yaml"))
    assert load_config(TrainConfig, str(tmp_path / "out.yaml")) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_sise=3"], "unknown config key(s) model.hidden_sise"),
    (["model.num_layers=abc"], "model.num_layers must be a number"),
    (["model.num_layers=2.5"], "must be an integer"),
    (["train.wandb=3"], "train.wandb must be true or false"),
    (["train"], "is not of the form section.key=value"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TrainConfig, None, overrides)


def _validate(**sections):
    cfg = from_dict(TrainConfig, sections)
    cfg.validate(world_size=sections.pop("world", None) if "world" in sections else None)


@pytest.mark.parametrize("sections, world, message", [
    ({"parallel": {"tensor_model_parallel_size": 3}}, 3, "num_attention_heads=4 is not divisible by "
                                                          "tensor_model_parallel_size=3"),
    ({"model": {"num_query_groups": 2}, "parallel": {"tensor_model_parallel_size": 4}}, 4,
     "num_query_groups=2 is not divisible"),
    ({"model": {"ffn_hidden_size": 100}, "parallel": {"tensor_model_parallel_size": 8},
      "data": {"global_batch_size": 8}}, 8, "num_attention_heads=4 is not divisible"),
    ({"model": {"num_layers": 5}, "parallel": {"pipeline_model_parallel_size": 2}}, 2,
     "num_layers=5 is not divisible by pipeline_model_parallel_size=2"),
    ({"model": {"num_layers": 5}, "parallel": {"pipeline_model_parallel_size": 2, "pipeline_split": [2, 2]}},
     2, "must be positive and sum to model.num_layers=5"),
    ({"model": {"num_query_groups": 3}}, 1, "is not a multiple of model.num_query_groups=3"),
    ({"model": {"activation": "relu"}}, 1, "model.activation='relu'"),
    ({"data": {"global_batch_size": 6, "micro_batch_size": 2}}, 2, "global_batch_size=6 must be a multiple"),
    ({"data": {"train_data": ["/nonexistent/prefix"]}}, 1, "run `minitron preprocess`"),
    ({"train": {"min_lr": 1.0}}, 1, "larger than train.lr"),
    ({"parallel": {"tensor_model_parallel_size": 2}}, 3, "world size 3 is not divisible"),
    ({"parallel": {"sequence_parallel": True}}, 1, "sequence_parallel needs tensor_model_parallel_size > 1"),
    ({"train": {"fp8": "hybrid"}}, 1, "train.fp8 runs through Transformer Engine"),
    ({"train": {"fp8": "e5m2", "transformer_engine": True}}, 1, "train.fp8='e5m2'"),
    ({"model": {"position_embedding": "yarn", "rope_scaling": True}}, 1, "choose one (YaRN, or Llama-3.1"),
    ({"model": {"position_embedding": "yarn", "rotary_percent": 0.5}}, 1, "YaRN rotates the whole head dim"),
    ({"model": {"position_embedding": "yarn", "yarn_rotary_scaling_factor": 0.5}}, 1, "must be >= 1"),
    ({"model": {"position_embedding": "yarn", "yarn_beta_fast": 0.5}}, 1, "yarn_beta_fast=0.5 < yarn_beta_slow"),
    ({"model": {"position_embedding": "yarn", "yarn_mscale": 0.7}}, 1, "used together"),
    ({"model": {"yarn_rotary_scaling_factor": 4.0}}, 1, "only apply with model.position_embedding=yarn"),
    ({"model": {"longrope_attention_factor": 1.2}}, 1, "only apply with model.position_embedding=longrope"),
    ({"model": {"no_rope_freq": [0, 1]}}, 1, "no_rope_freq must list one 0 / 1 per layer (4"),
    ({"model": {"no_rope_freq": [0, 2, 0, 1]}}, 1, "no_rope_freq must list one 0 / 1 per layer"),
    ({"model": {"no_rope_freq": [0, 0, 0, 1], "position_embedding": "learned_absolute"}}, 1,
     "only a rotary model"),
    ({"model": {"position_embedding": "longrope", "longrope_short_factor": [1.0] * 16}}, 1,
     "longrope_long_factor must list 16 positive numbers"),
    ({"model": {"position_embedding": "longrope", "longrope_short_factor": [1.0] * 15,
                "longrope_long_factor": [1.0] * 16}}, 1, "longrope_short_factor must list 16 positive numbers"),
    ({"model": {"position_embedding": "longrope", "longrope_short_factor": [1.0] * 16,
                "longrope_long_factor": [0.0] * 16}}, 1, "longrope_long_factor must list 16 positive numbers"),
    ({"model": {"position_embedding": "yarn", "yarn_original_max_position_embeddings": 0}}, 1,
     "yarn_original_max_position_embeddings must be positive"),
])
def test_validation_messages(sections, world, message):
    cfg = from_dict(TrainConfig, sections)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(
            ")", r"\)").replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        cfg.validate(world_size=world)


def test_uneven_pipeline_split_accepted():
    cfg = from_dict(TrainConfig, {"model": {"num_layers": 5},
                                  "parallel": {"pipeline_model_parallel_size": 2, "pipeline_split": [2, 3]}})
    cfg.validate(world_size=2)
    assert cfg.parallel.layers_per_stage(5) == [2, 3]


def test_apply_overrides_nested():
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d.e=x"]) == {"a": {"b": 1, "c": [1, 2]},
                                                                          "d": {"e": "x"}}


def test_to_dict_is_plain():
    d = to_dict(TrainConfig())
    assert set(d) == {"model", "parallel", "data", "train"}
    assert isinstance(d["model"]["hidden_size"], int)
    assert Data().micro_batch_size == 2 and Train().keep_last == 2 and Parallel().pipeline_split is None
    assert ModelArch().head_dim == 32
