"""Checkpoint directory handling and metadata, on fabricated checkpoints (no torch.distributed): the same
commit / latest / purge functions the distributed save runs on rank 0, with a dummy file for the shards."""
import os

import pytest
import yaml

from megatron_minitron import checkpoint
from megatron_minitron.checkpoint import layout
from megatron_minitron.checkpoint.metadata import (FORMAT_VERSION, arch_differences, build_metadata, check_arch,
                                                   write_metadata)
from megatron_minitron.config import ModelArch

ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=128)
LAYOUT = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "data_parallel_size": 1,
          "world_size": 2, "model_chunks": 1, "layers_per_stage": [[2]]}


def fake_save(paths, iteration, payload="shards", arch=ARCH, provenance=None, keep_last=None):
    """What save_checkpoint does on rank 0, with a text file standing in for the dist-ckpt shards."""
    layout.prepare_staging(paths)
    with open(os.path.join(paths.staging, "shards.distcp"), "w") as f:
        f.write(payload)
    contents = {"model": True, "optimizer": False, "rng": False}
    write_metadata(paths.staging, build_metadata(arch, iteration, LAYOUT, contents, provenance, "tok.model"))
    layout.commit_staged(paths, f"iteration {iteration}\n")
    if paths.root is not None:
        layout.write_latest(paths.root, os.path.basename(paths.final))
        layout.purge(paths.root, keep_last)
    return paths.final


def payload_of(directory):
    with open(os.path.join(directory, "shards.distcp")) as f:
        return f.read()


def save_iter(root, iteration, **kw):
    return fake_save(layout.iteration_paths(str(root), iteration), iteration, payload=f"it{iteration}", **kw)


def test_metadata_round_trip(tmp_path):
    provenance = {"pruned_from": tmp_path / "teacher", "targets": {"hidden": 24, "heads": (2, 3)}}
    path = save_iter(tmp_path, 100, provenance=provenance)
    meta = checkpoint.read_metadata(str(tmp_path))
    assert meta["checkpoint_dir"] == path and os.path.basename(path) == "iter_0000100"
    assert meta["iteration"] == 100 and meta["format_version"] == FORMAT_VERSION
    assert meta["parallel"] == LAYOUT and meta["tokenizer"] == {"path": "tok.model"}
    assert meta["provenance"] == {"pruned_from": str(tmp_path / "teacher"), "targets": {"hidden": 24, "heads": [2, 3]}}
    assert checkpoint.read_arch(path) == ARCH
    with open(os.path.join(path, checkpoint.METADATA_FILE)) as f:  # plain YAML, readable by anyone
        assert yaml.safe_load(f)["architecture"]["hidden_size"] == 32


def test_fields_added_later_are_recorded_only_when_set(tmp_path):
    """A checkpoint that does not use qk_layernorm (YaRN) has no such key(s), so a megatron-minitron that predates the
    field (its reader refuses unknown keys) still reads it; one that uses it records it and reads back."""
    import dataclasses

    plain = save_iter(tmp_path / "plain", 1)
    qk = dataclasses.replace(ARCH, qk_layernorm=True)
    with_qk = save_iter(tmp_path / "qk", 1, arch=qk)
    # YaRN's fields too (a YaRN checkpoint names position_embedding=yarn, which an older reader refuses anyway)
    yarn = dataclasses.replace(ARCH, position_embedding="yarn", yarn_rotary_scaling_factor=4.0, yarn_mscale=1.0,
                               yarn_mscale_all_dim=0.5)
    with_yarn = save_iter(tmp_path / "yarn", 1, arch=yarn)
    pairs = ARCH.head_dim // 2
    longrope = dataclasses.replace(ARCH, position_embedding="longrope", longrope_short_factor=[1.5] * pairs,
                                   longrope_long_factor=[4.0] * pairs, longrope_attention_factor=1.2)
    with_longrope = save_iter(tmp_path / "longrope", 1, arch=longrope)
    nope = dataclasses.replace(ARCH, no_rope_freq=[0, 1])
    with_nope = save_iter(tmp_path / "nope", 1, arch=nope)
    for path, arch in ((plain, ARCH), (with_qk, qk), (with_yarn, yarn), (with_longrope, longrope),
                       (with_nope, nope)):
        with open(os.path.join(path, checkpoint.METADATA_FILE)) as f:
            recorded = yaml.safe_load(f)["architecture"]
        assert ("qk_layernorm" in recorded) is arch.qk_layernorm
        assert recorded.get("no_rope_freq") == arch.no_rope_freq
        assert sorted(k for k in recorded if k.startswith(("yarn_", "longrope_"))) == {
            id(yarn): ["yarn_mscale", "yarn_mscale_all_dim", "yarn_rotary_scaling_factor"],
            id(longrope): ["longrope_attention_factor", "longrope_long_factor", "longrope_short_factor"],
        }.get(id(arch), [])
        assert checkpoint.read_arch(path) == arch


def test_latest_pointer(tmp_path):
    assert checkpoint.latest_iteration(str(tmp_path / "missing")) is None
    assert checkpoint.latest_iteration(str(tmp_path)) is None
    save_iter(tmp_path, 5)
    save_iter(tmp_path, 20)
    assert checkpoint.latest_iteration(str(tmp_path)) == 20
    assert checkpoint.resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / "iter_0000020")
    layout.write_latest(str(tmp_path), "iter_0000005")  # `latest` is authoritative, not the highest number
    assert payload_of(checkpoint.resolve_checkpoint_dir(str(tmp_path))) == "it5"
    layout.write_latest(str(tmp_path), "iter_0000007")
    with pytest.raises(ValueError, match=r"iter_0000007.*\['iter_0000005', 'iter_0000020'\]"):
        checkpoint.latest_iteration(str(tmp_path))
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path))


def test_purge_keeps_newest_n_and_latest(tmp_path):
    for it in (1, 2, 3, 4):
        save_iter(tmp_path, it, keep_last=None)
    (tmp_path / ".tmp.iter_0000009").mkdir()  # leftovers of a crashed save
    layout.write_latest(str(tmp_path), "iter_0000001")
    removed = layout.purge(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000003", "iter_0000004", "latest"]
    assert len(removed) == 2
    save_iter(tmp_path, 6, keep_last=2)
    assert layout.committed_iterations(str(tmp_path)) == [4, 6]
    save_iter(tmp_path, 7, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000007", "latest"]
    with pytest.raises(ValueError, match="keep_last"):
        layout.purge(str(tmp_path), keep_last=0)


def test_arch_mismatch_lists_every_field(tmp_path):
    path = save_iter(tmp_path, 1)
    meta = checkpoint.read_metadata(path)
    other = ModelArch(**{**vars(ARCH), "hidden_size": 48, "num_layers": 3, "hidden_dropout": 0.1,
                         "seq_length": 4096})
    with pytest.raises(ValueError) as info:
        check_arch(other, meta)
    message = str(info.value)
    assert "hidden_size: checkpoint 32, given 48" in message and "num_layers: checkpoint 2, given 3" in message
    assert "2 field(s)" in message and "dropout" not in message and "seq_length" not in message
    check_arch(ModelArch(**{**vars(ARCH), "seq_length": 4096}), meta)  # runtime-only field: fine
    learned = ModelArch(**{**vars(ARCH), "position_embedding": "learned_absolute", "seq_length": 4096})
    assert {d[0] for d in arch_differences(learned, meta)} == {"position_embedding", "seq_length"}


def test_uncommitted_and_stale_dirs_are_ignored(tmp_path):
    save_iter(tmp_path, 1)
    stale = tmp_path / ".tmp.iter_0000002"
    stale.mkdir()
    (stale / checkpoint.METADATA_FILE).write_text("iteration: 2\n")
    uncommitted = tmp_path / "iter_0000003"  # e.g. copied by hand, half-way
    uncommitted.mkdir()
    (uncommitted / checkpoint.METADATA_FILE).write_text("iteration: 3\n")
    assert layout.committed_iterations(str(tmp_path)) == [1]
    assert checkpoint.resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / "iter_0000001")
    for directory in (stale, uncommitted):
        with pytest.raises(ValueError, match="no COMMIT marker"):
            checkpoint.resolve_checkpoint_dir(str(directory))
    save_iter(tmp_path, 4)  # the next save wipes the stale staging dir, leaves the unknown one alone
    assert not stale.exists() and uncommitted.exists()


def test_missing_paths_explain_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path))
    save_iter(tmp_path, 3)
    os.remove(tmp_path / "latest")
    with pytest.raises(FileNotFoundError, match=r"no `latest` file.*iter_0000003"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path))
    assert checkpoint.latest_iteration(str(tmp_path)) is None  # nothing to resume: a run starts fresh


def test_corrupt_metadata(tmp_path):
    path = save_iter(tmp_path, 1)
    meta_file = os.path.join(path, checkpoint.METADATA_FILE)
    with open(meta_file, "w") as f:
        f.write("architecture: [unclosed\n")
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.read_metadata(str(tmp_path))
    with open(meta_file, "w") as f:
        yaml.safe_dump({"format_version": FORMAT_VERSION + 1, "iteration": 1, "architecture": {},
                        "parallel": {}, "contents": {}}, f)
    with pytest.raises(ValueError, match="Upgrade"):
        checkpoint.read_metadata(path)
    os.remove(meta_file)
    with pytest.raises(ValueError, match="no minitron.yaml"):
        checkpoint.read_metadata(path)


def test_replace_is_safe_at_every_step(tmp_path):
    out = tmp_path / "pruned"
    paths = layout.exact_paths(str(out))
    fake_save(paths, 0, payload="first")
    assert payload_of(checkpoint.resolve_checkpoint_dir(str(out))) == "first"
    fake_save(paths, 0, payload="second")  # replaces a checkpoint
    assert payload_of(str(out)) == "second" and sorted(os.listdir(tmp_path)) == ["pruned"]
    # a crash between moving the old copy aside and moving the new one in: the old one still loads
    os.rename(paths.final, paths.aside)
    assert payload_of(checkpoint.resolve_checkpoint_dir(str(out))) == "second"
    fake_save(paths, 0, payload="third")
    assert payload_of(str(out)) == "third" and sorted(os.listdir(tmp_path)) == ["pruned"]


def test_exact_save_refuses_foreign_directory(tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        checkpoint.save_checkpoint_to(str(foreign), [object()], arch=ARCH)
    assert (foreign / "important.txt").read_text() == "keep me"
