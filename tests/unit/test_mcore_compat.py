"""What keeps megatron-minitron working from megatron-core 0.16 to 0.19 (docs/checkpoints.md, "megatron-core
versions"), checked here on the installed 0.16.1 with the 0.19 shapes built by hand."""
import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from megatron_minitron.checkpoint import layout
from megatron_minitron.checkpoint.state import adopt_saved_group_schedule


def _dist_dir(path, common_pt: bool, inline: bool):
    os.makedirs(path)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    keys = {"decoder.weight": BytesStorageMetadata()}
    if inline:  # megatron-core >= 0.19: the common state is a sharded object in the shards
        keys["common_state/shard_0_1"] = BytesStorageMetadata()
    with open(path / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata=keys), f)
    if common_pt:
        torch.save({"iteration": 3}, path / "common.pt")
    return str(path)


def test_a_019_directory_counts_as_complete_and_older_cores_say_why(tmp_path, monkeypatch):
    old = _dist_dir(tmp_path / "old", common_pt=True, inline=False)
    new = _dist_dir(tmp_path / "new", common_pt=False, inline=True)
    lost = _dist_dir(tmp_path / "lost", common_pt=False, inline=False)  # a 0.16 save that lost common.pt
    assert layout.is_megatron_lm_dir(old) and layout.is_megatron_lm_dir(new)
    assert not layout.is_megatron_lm_dir(lost) and not layout.has_inline_common_state(lost)
    assert layout.resolve_checkpoint_dir(new) == new
    layout.check_readable_by_installed_core(old)
    monkeypatch.setattr(layout, "installed_megatron_core", lambda: "0.16.1")
    with pytest.raises(ValueError, match=r"written by megatron-core >= 0.19 .* megatron-core 0.16.1 cannot read"):
        layout.check_readable_by_installed_core(new)
    monkeypatch.setattr(layout, "installed_megatron_core", lambda: "0.19.1")
    layout.check_readable_by_installed_core(new)


def test_resume_adopts_the_saved_groups_schedule():
    w1, w2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    inner = torch.optim.Adam([
        {"params": [w1], "wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
         "max_lr": 1e-3, "min_lr": 1e-4},
        {"params": [w2], "wd_mult": 0.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
         "max_lr": 1e-3, "min_lr": 1e-4}], lr=1e-3)
    opt = type("MegatronOptimizer", (), {"optimizer": inner})()
    saved = {"optimizer": {"param_groups": [
        {"wd_mult": 0.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
         "max_lr": 3e-3, "min_lr": 3e-5, "params": [1]},
        {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
         "max_lr": 2e-3, "min_lr": 2e-5, "params": [0]}]}}
    adopt_saved_group_schedule(opt, saved)
    # matched by structure (wd_mult), not by position; the keys a group lacks in the save stay as they are
    assert [(g["max_lr"], g["min_lr"]) for g in inner.param_groups] == [(2e-3, 2e-5), (3e-3, 3e-5)]
    assert "start_wd" not in inner.param_groups[0]
    adopt_saved_group_schedule(opt, {"param_groups": []})  # nothing saved: nothing changes
    assert inner.param_groups[1]["max_lr"] == 3e-3
