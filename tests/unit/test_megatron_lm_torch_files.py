"""The file-level edges of Megatron-LM's --ckpt-format torch checkpoints (checkpoint/megatron_lm_torch.py) that a
real Megatron-LM run here does not produce (tests/megatron_lm/test_megatron_lm_torch_format.py covers what it
does): rank files whose RNG state numpy 1.x pickled, two saves at different PP in one directory, a legacy-model
file, an uneven pipeline split. Rank files are torch.save'd dicts shaped as Megatron-LM's save_checkpoint writes
them (args, iteration, model, rng_state)."""
import argparse
import os
import zipfile

import numpy as np
import pytest
import torch

from megatron_minitron.checkpoint import megatron_lm, megatron_lm_torch
from megatron_minitron.config import ModelArch, Parallel

ARCH = ModelArch(num_layers=4, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, vocab_size=64,
                 seq_length=8)


def write_rank(directory, name, model, args=None, **extra):
    path = os.path.join(directory, name, megatron_lm_torch.RANK_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"args": args if args is not None else argparse.Namespace(), "iteration": 3, "model": model,
                **extra}, path)
    return path


def layer_keys(layers):
    return {f"decoder.layers.{i}.input_layernorm.weight": torch.ones(16) for i in range(layers)}


def test_rng_state_pickled_by_numpy_1_loads(tmp_path):
    """np.random.get_state() in rng_state pickles numpy's _reconstruct under the writer's module name; numpy 1.x
    (2024 NGC containers) writes numpy.core.multiarray, which megatron-core's safe list (the reader's numpy 2
    name) does not cover."""
    state = np.random.get_state()
    path = write_rank(tmp_path, "mp_rank_00", layer_keys(1), rng_state=[{"np_rng_state": state}])
    with zipfile.ZipFile(path) as archive:
        entries = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    pickle_name = next(n for n in entries if n.endswith("data.pkl"))
    assert b"numpy._core.multiarray" in entries[pickle_name]  # numpy 2 here
    entries[pickle_name] = entries[pickle_name].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # as numpy 1.x writes it
        for name, data in entries.items():
            archive.writestr(name, data)
    loaded = megatron_lm_torch._load(path)
    assert np.array_equal(loaded["rng_state"][0]["np_rng_state"][1], state[1])


def test_an_object_outside_the_safe_list_is_named_not_called_damage(tmp_path):
    path = write_rank(tmp_path, "mp_rank_00", layer_keys(1), extra=zipfile.ZipInfo("x"))
    with pytest.raises(ValueError, match=r"weights-only unpickler refuses \(zipfile.ZipInfo\)"):
        megatron_lm_torch._load(path)


def test_two_saves_at_different_pp_in_one_directory_are_refused(tmp_path):
    write_rank(tmp_path, "mp_rank_00", layer_keys(4))
    write_rank(tmp_path, "mp_rank_00_000", layer_keys(2))
    with pytest.raises(ValueError, match="holds two saves, one without pipeline parallelism"):
        megatron_lm_torch.rank_dirs(str(tmp_path))


def test_a_legacy_model_file_is_named_as_such(tmp_path):
    args = megatron_lm.args_from_arch(ARCH, Parallel())
    write_rank(tmp_path, "mp_rank_00", {"language_model": {"embedding": {}}}, args=args)
    with pytest.raises(ValueError, match=r"legacy \(non-megatron-core\) Megatron-LM model"):
        megatron_lm_torch.TorchFormatCheckpoint(str(tmp_path), ARCH, 1, 1)


def test_an_uneven_pipeline_split_is_described_as_saved(tmp_path):
    """--decoder-first-pipeline-num-layers 1 at PP2: stage 0 holds 1 layer, stage 1 three (counted in the files;
    the args alone would suggest 2 + 2), and the layers are numbered 0.. on each stage."""
    args = megatron_lm.args_from_arch(ARCH, Parallel(pipeline_model_parallel_size=2),
                                      decoder_first_pipeline_num_layers=1)
    write_rank(tmp_path, "mp_rank_00_000", layer_keys(1), args=args)
    write_rank(tmp_path, "mp_rank_00_001", layer_keys(3), args=args)
    meta = megatron_lm.metadata_from_directory(str(tmp_path))
    assert meta["parallel"]["layers_per_stage"] == [[1], [3]]
    assert meta["contents"]["backend"] == "torch"


def test_moe_saved_at_pp1_is_refused_as_moe_not_as_damage(tmp_path):
    """EP2 at PP1: Megatron-LM names the files mp_rank_00_000 / mp_rank_00_001 (TP rank, expert rank), which read
    like PP ranks; the args say MoE, and every check says so before calling anything missing."""
    from megatron_minitron.checkpoint import integrity

    args = megatron_lm.args_from_arch(ARCH, Parallel(), num_experts=2, expert_model_parallel_size=2)
    for expert in range(2):
        write_rank(tmp_path, f"mp_rank_00_{expert:03d}", layer_keys(4), args=args)
    with pytest.raises(ValueError, match="num_experts"):
        integrity.verify_before_load(str(tmp_path))
    with pytest.raises(ValueError, match="num_experts"):
        megatron_lm.metadata_from_directory(str(tmp_path))
