"""A depth target reusing a scores file that lacks the depth scores it ranks by (issue 12, item 6: the
README's 4B-Depth example after a width-only pass): with calibration data the missing scores are computed
(the file is rewritten holding them), without it the error names the exact flags; and the README's fixed flow
(--block-sizes in the first pass) reuses the file without data."""
import argparse
import json
import os
import shutil

import pytest
import torch

from megatron_minitron import checkpoint
from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.data import write_indexed_dataset
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune import ImportanceScores, PruneTargets, make_plan
from megatron_minitron.prune import cli as prune_cli
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ARCH = ModelArch(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=16)
CALIB = ["--num-samples", "8", "--micro-batch-size", "2"]
DEPTH = ["--target", "num_layers=2", "contiguous=true"]  # drop the lowest-BI block of 2 layers


def parse(argv):
    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers())
    return parser.parse_args(["prune", *argv])


def kept_layers(directory):
    with open(os.path.join(directory, "prune_plan.json")) as f:
        return json.load(f)["kept_layers"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    base = tmp_path_factory.mktemp("depth_scores")
    init_distributed(1, 1)
    set_seed(5)
    ckpt = str(base / "src")
    checkpoint.save_checkpoint_to(ckpt, [build_gpt(ARCH, Parallel())], arch=ARCH)
    g = torch.Generator().manual_seed(1)
    write_indexed_dataset(str(base / "calib"), [torch.randint(1, 128, (40,), generator=g).tolist()
                                                for _ in range(8)], eod=0, vocab_size=128)
    width_only = str(base / "width_only.pt")  # the first pass of the old README example
    assert prune_cli.run(parse(["--load", ckpt, "--data", str(base / "calib"), "--scores", width_only,
                                "--scores-only", *CALIB])) == 0
    with_blocks = str(base / "with_blocks.pt")  # the same pass with the block size the depth target needs
    assert prune_cli.run(parse(["--load", ckpt, "--data", str(base / "calib"), "--scores", with_blocks,
                                "--scores-only", "--block-sizes", "2", *CALIB])) == 0
    return {"base": base, "ckpt": ckpt, "calib": str(base / "calib"), "width_only": width_only,
            "with_blocks": with_blocks}


def test_without_data_the_error_names_the_flags(src, tmp_path):
    assert not ImportanceScores.load(src["width_only"]).has_depth("bi", 2)
    with pytest.raises(ValueError) as e:
        prune_cli.run(parse(["--load", src["ckpt"], "--save", str(tmp_path / "out"), "--scores",
                             src["width_only"], *DEPTH]))
    text = str(e.value)
    assert "no 'bi' scores for blocks of 2 layers" in text
    assert "--depth-metrics bi --block-sizes 2" in text and "--data PREFIX" in text
    assert not os.path.exists(tmp_path / "out")


def test_with_data_the_missing_block_scores_are_computed(src, tmp_path):
    scores = str(tmp_path / "scores.pt")
    shutil.copy(src["width_only"], scores)
    before = ImportanceScores.load(scores)
    out = str(tmp_path / "depth")
    assert prune_cli.run(parse(["--load", src["ckpt"], "--save", out, "--scores", scores, "--data",
                                src["calib"], *CALIB, *DEPTH])) == 0
    after = ImportanceScores.load(scores)
    reference = ImportanceScores.load(src["with_blocks"])  # computed from scratch with --block-sizes 2
    torch.testing.assert_close(after.blocks["bi"][2], reference.blocks["bi"][2])
    for name in ("heads", "neurons", "hidden"):  # the file keeps what it held
        torch.testing.assert_close(getattr(after, name), getattr(before, name))
    expected = make_plan(reference, ARCH, PruneTargets(num_layers=2, contiguous=True)).kept_layers
    assert kept_layers(out) == expected and len(expected) == 2


def test_the_readme_flow_reuses_the_file_without_data(src, tmp_path):
    out = str(tmp_path / "depth")
    assert prune_cli.run(parse(["--load", src["ckpt"], "--save", out, "--scores", src["with_blocks"],
                                *DEPTH])) == 0
    reference = ImportanceScores.load(src["with_blocks"])
    block = reference.blocks["bi"][2]
    start = int(torch.argmin(block))  # the lowest-importance block of 2 is dropped
    assert kept_layers(out) == [i for i in range(ARCH.num_layers) if i not in (start, start + 1)]


def test_calibration_window_is_checked_before_any_work(src, tmp_path):
    """--seq-length is the calibration window: 0 or negative is an error (not "the default"), longer than the
    data allows fails on the data check, not later."""
    out = str(tmp_path / "out")
    for bad in ("0", "-4"):
        with pytest.raises(ValueError, match="--seq-length=.*must be a positive integer"):
            prune_cli.run(parse(["--load", src["ckpt"], "--save", out, "--data", src["calib"], *CALIB,
                                 "--seq-length", bad]))
    # 8 documents x 40 tokens hold 320 tokens: 8 windows of 32 (+1) fit, 8 of 64 do not
    with pytest.raises(ValueError, match="sequences of 64"):
        prune_cli.run(parse(["--load", src["ckpt"], "--save", out, "--data", src["calib"], *CALIB,
                             "--seq-length", "64"]))
    assert not os.path.exists(out)
