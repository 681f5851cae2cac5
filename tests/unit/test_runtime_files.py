"""runtime/files.py (the one durable small-file write) and runtime/collectives.py in a single process."""
import json
import os

import pytest
import torch

from megatron_minitron.runtime import collectives, files


def test_durable_write_replaces_whole_and_syncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "sub" / "plan.json"
    files.write_json_durably(str(path), {"a": [1, 2]}, make_parents=True)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert len(synced) == 2  # the file, then its directory
    files.write_file_durably(str(path), "new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["plan.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "scores.pt"
    files.write_durably(str(path), lambda f: torch.save({"x": torch.arange(3)}, f), binary=True)

    def half_then_fail(f):
        f.write(b"partial")
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        files.write_durably(str(path), half_then_fail, binary=True)
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["scores.pt"]  # no temporary file left


def test_rank0_step_single_process():
    assert collectives.run_on_rank0(lambda: {"n": 3}, "counting") == {"n": 3}

    def fail():
        raise KeyError("nope")

    with pytest.raises(ValueError, match=r"^job: counting failed on rank 0: KeyError: 'nope'$"):
        collectives.run_on_rank0(fail, "counting", error=ValueError, prefix="job: ")
    values = torch.tensor([1.0, 2.0])
    assert collectives.sum_to_all_ranks(values) is values and values.tolist() == [1.0, 2.0]
    assert collectives.all_ranks_agree(True) and not collectives.all_ranks_agree(False)
