"""The architecture + window of a job whose model comes from a checkpoint (job_arch.py): every rule, every
error, and which model.* fields count as given (config.given_fields)."""
import dataclasses
import os

import pytest
import yaml

from megatron_minitron.config import ModelArch, TrainConfig, given_fields, load_config
from megatron_minitron.distill.config import DistillConfig
from megatron_minitron.job_arch import (HONOURED_FIELDS, check_seq_length, model_arch, resolve_job_arch)

# an HF-import-like checkpoint: long maximum context, dropout 0
SOURCE = ModelArch(num_layers=3, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6, num_query_groups=2,
                   vocab_size=300, seq_length=8192, rotary_base=100000.0, tie_embeddings=True,
                   init_method_std=0.041, hidden_dropout=0.0, attention_dropout=0.0)
LEARNED = dataclasses.replace(SOURCE, position_embedding="learned_absolute", seq_length=64)
ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelArch)]


def fields_of(arch):
    return {name: getattr(arch, name) for name in ARCH_FIELDS}


def test_from_scratch_the_config_is_the_architecture_and_its_window():
    configured = ModelArch(num_layers=2, seq_length=32)
    job = resolve_job_arch(configured, {"num_layers", "seq_length"}, None)
    assert job.arch == configured and job.seq_length == 32 and job.warnings == ()
    assert model_arch(configured, None) is configured


def test_nothing_given_takes_everything_from_the_checkpoint():
    job = resolve_job_arch(ModelArch(), set(), SOURCE)  # the defaults differ from SOURCE in most fields
    assert fields_of(job.arch) == fields_of(SOURCE)
    assert job.seq_length == SOURCE.seq_length and job.warnings == ()


def test_given_seq_length_is_the_window_and_the_max_context_is_kept():
    job = resolve_job_arch(ModelArch(seq_length=256), {"seq_length"}, SOURCE)
    assert job.seq_length == 256
    assert job.arch.seq_length == SOURCE.seq_length  # what saved checkpoints record
    expected_window = {**fields_of(SOURCE), "seq_length": 256}
    assert fields_of(job.window_arch) == expected_window
    # the Trainer, given the window arch and the source, rebuilds the same architecture
    assert model_arch(job.window_arch, SOURCE) == job.arch


def test_given_fields_equal_to_the_checkpoint_are_fine():
    configured = dataclasses.replace(SOURCE, seq_length=128)
    job = resolve_job_arch(configured, set(ARCH_FIELDS), SOURCE)  # a full model: section that matches
    assert job.arch == SOURCE and job.seq_length == 128


def test_spelled_out_head_dim_and_groups_match_a_checkpoint_that_derives_them():
    """Megatron-LM's args give kv_channels = hidden / heads, read back as None (derived): a config that writes
    the head dim (and, for MHA, the group count) out, as examples/*.yaml do, is the same model; another head
    dim is still an error."""
    derived = dataclasses.replace(SOURCE, kv_channels=None, num_query_groups=None)
    spelled = dataclasses.replace(derived, kv_channels=48 // 6, num_query_groups=6)
    job = resolve_job_arch(spelled, {"kv_channels", "num_query_groups"}, derived)
    assert job.arch == derived
    with pytest.raises(ValueError, match=r"model.kv_channels=16: the checkpoint has None \(derived: 8\)"):
        resolve_job_arch(dataclasses.replace(spelled, kv_channels=16), {"kv_channels"}, derived)


def test_given_fields_that_differ_are_an_error_naming_each():
    configured = dataclasses.replace(ModelArch(), hidden_size=64, num_layers=2)
    with pytest.raises(ValueError) as e:
        resolve_job_arch(configured, {"hidden_size", "num_layers", "seq_length"}, SOURCE, "the student S")
    text = str(e.value)
    assert "model.hidden_size=64: the student S has 48" in text
    assert "model.num_layers=2: the student S has 3" in text
    assert "2 model.* value(s)" in text and "seq_length" in text
    # a differing field that was NOT given is taken from the checkpoint silently (it is a default)
    job = resolve_job_arch(configured, {"seq_length"}, SOURCE)
    assert job.arch.hidden_size == SOURCE.hidden_size and job.arch.num_layers == SOURCE.num_layers


def test_fields_that_change_no_weight_are_honoured():
    values = {"hidden_dropout": 0.1, "attention_dropout": 0.05, "init_method_std": 0.01}
    assert set(values) == set(HONOURED_FIELDS)
    job = resolve_job_arch(ModelArch(**values), set(values), SOURCE)
    for name, value in values.items():
        assert getattr(job.arch, name) == value != getattr(SOURCE, name)
    assert job.arch.hidden_size == SOURCE.hidden_size


def test_learned_positions_bound_the_window():
    with pytest.raises(ValueError, match="model.seq_length=65 exceeds the 64 learned positions"):
        resolve_job_arch(ModelArch(seq_length=65), {"seq_length"}, LEARNED)
    job = resolve_job_arch(ModelArch(seq_length=16), {"seq_length"}, LEARNED)
    assert job.seq_length == 16 and job.arch.seq_length == 64  # built with the whole table
    with pytest.raises(ValueError, match="exceeds the 64 learned positions"):
        model_arch(dataclasses.replace(LEARNED, seq_length=128), LEARNED)


def test_rope_past_the_trained_context_warns_and_none_does_not():
    job = resolve_job_arch(ModelArch(seq_length=16384), {"seq_length"}, SOURCE, "the checkpoint C")
    assert job.seq_length == 16384 and job.arch.seq_length == 8192
    assert len(job.warnings) == 1 and "longer than the context the checkpoint C was trained for" in job.warnings[0]
    nope = dataclasses.replace(SOURCE, position_embedding="none")
    assert resolve_job_arch(ModelArch(seq_length=16384), {"seq_length"}, nope).warnings == ()
    assert check_seq_length(8192, SOURCE) == []


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_a_window_that_is_not_a_positive_integer_is_an_error(bad):
    with pytest.raises(ValueError, match=r"--seq-length=.*positive integer"):
        check_seq_length(bad, SOURCE, "--seq-length")
    if isinstance(bad, int) and not isinstance(bad, bool):
        with pytest.raises(ValueError, match="positive integer"):
            resolve_job_arch(ModelArch(seq_length=bad), {"seq_length"}, SOURCE)


def test_given_fields_come_from_yaml_and_overrides_not_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 4, "seq_length": 256}, "train": {"lr": 1e-3}}))
    cfg = load_config(TrainConfig, str(path), ["model.hidden_size=128", "train.train_iters=3"])
    # num_layers=4 and hidden_size=128 equal the defaults: still given (the user asked for them)
    assert given_fields(cfg.model) == {"num_layers", "seq_length", "hidden_size"}
    assert given_fields(cfg.train) == {"lr", "train_iters"}
    assert given_fields(load_config(DistillConfig, None, []).model) == frozenset()
    # so a checkpoint of 3 layers refuses the explicit num_layers=4 ...
    with pytest.raises(ValueError, match="model.num_layers=4"):
        resolve_job_arch(cfg.model, given_fields(cfg.model), dataclasses.replace(SOURCE, hidden_size=128))
    # ... and built in code (no record), the fields that differ from the defaults count as given
    coded = ModelArch(seq_length=256, hidden_dropout=0.1)
    assert given_fields(coded) == {"seq_length", "hidden_dropout"}
    assert given_fields(dataclasses.replace(cfg.model)) == {"seq_length"}


def test_search_refuses_a_model_section_it_would_not_use(tmp_path):
    """A search prunes every candidate from search.load: a model field given is an error before any work, and
    the message names search.seq_length for the window (a dumped config's defaults are harmless)."""
    from megatron_minitron.search.run import SearchConfig, run_search

    base = [f"search.load={tmp_path / 'nothing'}", f"search.output={tmp_path / 'out'}", "search.param_budget=100"]
    with pytest.raises(ValueError, match=r"does not use the model section \(model.seq_length given\).*"
                                         r"search.seq_length"):
        run_search(load_config(SearchConfig, None, base + ["model.seq_length=64"]))
    # without it (or with the window where it belongs) the search goes on to read search.load (missing here)
    for extra in ([], ["search.seq_length=64"]):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            run_search(load_config(SearchConfig, None, base + extra))
        assert "model section" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")
