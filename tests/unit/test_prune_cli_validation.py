"""`minitron prune` argument checks (pure `validate_targets`, and every user mistake failing before a model is
built or a file written), the summary's parameter counts vs real models, tokenizer/plan/summary files, and
`--in-place` on an exact directory and on a checkpoint root (no crash; crashes: tests/distributed)."""
import argparse
import json
import os
import shutil
import sys

import pytest
import torch

from megatron_minitron import checkpoint
from megatron_minitron.checkpoint import layout
from megatron_minitron.checkpoint.lock import is_lock_file
from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.data import write_indexed_dataset
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune import (ImportanceScores, PrunePlan, PruneTargets, make_plan, prune_model_state,
                                     validate_targets)
from megatron_minitron.prune import cli as prune_cli
from megatron_minitron.prune.rewrite import recover_interrupted_rewrite, rewrite_paths
from megatron_minitron.prune.summary import read_summary
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ARCH = ModelArch(num_layers=3, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=16)
TARGETS = ["hidden_size=24", "ffn_hidden_size=32", "num_attention_heads=2", "num_layers=2"]
TARGET_OBJ = PruneTargets(hidden_size=24, ffn_hidden_size=32, num_attention_heads=2, num_layers=2)


def parse(argv):
    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers())
    return parser.parse_args(["prune", *argv])


def tree(path):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files + [""])


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A source checkpoint whose tokenizer lives inside it (as after an HF import), calibration data, scores."""
    base = tmp_path_factory.mktemp("prune_cli")
    init_distributed(1, 1)
    set_seed(3)
    model = build_gpt(ARCH, Parallel())
    ckpt = str(base / "src")
    checkpoint.save_checkpoint_to(ckpt, [model], arch=ARCH,
                                  tokenizer={"type": "huggingface", "path": ckpt, "files": ["tokenizer.json"]})
    with open(os.path.join(ckpt, "tokenizer.json"), "w") as f:
        f.write('{"fake": "tokenizer"}')
    g = torch.Generator().manual_seed(0)
    write_indexed_dataset(str(base / "calib"), [torch.randint(1, 128, (40,), generator=g).tolist()
                                                for _ in range(8)], eod=0, vocab_size=128)
    scores = str(base / "scores.pt")
    assert prune_cli.run(parse(["--load", ckpt, "--data", str(base / "calib"), "--scores", scores,
                                "--scores-only", "--num-samples", "8", "--micro-batch-size", "2"])) == 0
    return {"base": base, "ckpt": ckpt, "calib": str(base / "calib"), "scores": scores, "model": model}


def test_validate_targets_is_pure_and_complete():
    r = validate_targets(ARCH, PruneTargets(hidden_size=16, num_attention_heads=2, drop_range=[1, 2]), tp=2)
    assert (r.hidden_size, r.ffn_hidden_size, r.num_attention_heads, r.num_query_groups, r.num_layers,
            r.drop) == (16, 48, 2, 2, 1, [1, 2])
    assert validate_targets(ARCH, PruneTargets(num_layers=2)).drop is None
    bad = [
        (PruneTargets(hidden_size=64), "between 1 and the source's 32"),
        (PruneTargets(ffn_hidden_size=33), "not divisible by tensor_model_parallel_size=2"),
        (PruneTargets(num_attention_heads=3, num_query_groups=2), "not a multiple of num_query_groups"),
        (PruneTargets(num_attention_heads=6, num_query_groups=1), "between 1 and the source's 4"),
        (PruneTargets(drop_layers=[0, 5]), r"layer ids \[5\] are out of range"),
        (PruneTargets(drop_range=[2, 1]), "must be \\[first, last\\]"),
        (PruneTargets(drop_range=[0, 2]), "drop every layer"),
        (PruneTargets(num_layers=0), "between 1 and the source's 3"),
        (PruneTargets(num_layers=4), "between 1 and the source's 3"),
        (PruneTargets(num_layers=2, drop_layers=[0, 1]), "disagrees"),
        (PruneTargets(drop_layers=[0], drop_range=[1, 1]), "only one of"),
    ]
    for targets, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_targets(ARCH, targets, tp=2)


def test_mistakes_fail_before_building_or_writing(src, tmp_path, monkeypatch):
    import megatron_minitron.model.builder as builder

    def no_build(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")
    monkeypatch.setattr(builder, "build_gpt", no_build)
    not_ckpt = tmp_path / "notes"
    not_ckpt.mkdir()
    (not_ckpt / "keep.txt").write_text("mine")
    ck, calib, scores = src["ckpt"], src["calib"], src["scores"]
    out = str(tmp_path / "out")
    cases = [
        (["--load", ck, "--save", out, "--data", calib, "--target", "hidden_size=64"], ValueError, "between 1"),
        (["--load", ck, "--save", out, "--data", calib, "--tp", "2", "--target", "ffn_hidden_size=31"],
         ValueError, "not divisible by tensor_model_parallel_size=2"),
        (["--load", ck, "--save", out, "--data", calib, "--target", "num_attention_heads=3",
          "num_query_groups=2"], ValueError, "not a multiple of num_query_groups"),
        (["--load", ck, "--save", out, "--data", calib, "--target", "drop_layers=[7]"], ValueError,
         "out of range"),
        (["--load", ck, "--save", out, "--data", calib, "--num-samples", "64"], ValueError,
         "fewer than --num-samples 64"),
        (["--load", ck, "--save", out, "--data", str(tmp_path / "nodata")], FileNotFoundError, "not found"),
        (["--load", str(tmp_path / "missing"), "--save", out, "--data", calib], FileNotFoundError,
         "does not exist"),
        (["--load", str(not_ckpt), "--save", out, "--data", calib], FileNotFoundError, "is not a checkpoint"),
        (["--load", ck, "--save", str(not_ckpt), "--data", calib], ValueError, "not a megatron-minitron"),
        (["--load", ck, "--save", ck, "--scores", scores], ValueError, "pass --in-place"),
        (["--load", ck, "--in-place", "--save", out, "--scores", scores], ValueError, "drop --save"),
        (["--load", ck, "--scores", scores], ValueError, "give --save OUT"),
        (["--load", ck, "--save", out], ValueError, "give --data PREFIX"),
        (["--load", ck, "--save", out, "--scores", scores, "--target", "num_layers=1", "contiguous=true"],
         ValueError, "no 'bi' scores for blocks of 2"),  # made up front from the scores file
        (["--load", ck, "--save", out, "--data", calib, "--depth-task", str(tmp_path / "no.jsonl")],
         FileNotFoundError, "--depth-task"),
        (["--load", ck, "--save", out, "--data", calib, "--num-samples", "8", "--pp", "3",
          "--target", "drop_layers=[1]"], ValueError, "without layers"),
    ]
    before = tree(src["base"]), tree(tmp_path)
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            prune_cli.run(parse(argv))
    task = tmp_path / "task.jsonl"
    task.write_text("{}\n")
    monkeypatch.setitem(sys.modules, "megatron_minitron.eval.depth", None)  # the eval module is absent
    with pytest.raises(ValueError, match="--depth-task needs megatron_minitron.eval.depth"):
        prune_cli.run(parse(["--load", ck, "--save", out, "--data", calib, "--depth-task", str(task)]))
    task.unlink()
    assert (tree(src["base"]), tree(tmp_path)) == before


def _param_counts(model):
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters()
              if n.startswith(("embedding.", "output_layer.")))
    return {"total": total, "non_embedding": total - emb}


def _expected_state(src, plan):
    return prune_model_state(src["model"], plan)


def test_save_keeps_tokenizer_and_writes_plan_and_summary(src, tmp_path):
    out = str(tmp_path / "out")
    assert prune_cli.run(parse(["--load", src["ckpt"], "--save", out, "--scores", src["scores"],
                                "--target", *TARGETS])) == 0
    meta = checkpoint.read_metadata(out)
    assert meta["tokenizer"]["path"] == out and meta["tokenizer"]["type"] == "huggingface"
    with open(os.path.join(out, "tokenizer.json")) as f:
        assert f.read() == '{"fake": "tokenizer"}'
    plan = make_plan(ImportanceScores.load(src["scores"]), ARCH, TARGET_OBJ)
    with open(os.path.join(out, "prune_plan.json")) as f:
        assert PrunePlan.from_dict(json.load(f)).to_dict() == plan.to_dict()
    summary = read_summary(out)
    pruned = build_gpt(plan.target, Parallel())
    checkpoint.load_weights(out, [pruned], arch=plan.target)
    assert summary["parameters"]["before"] == _param_counts(src["model"])
    assert summary["parameters"]["after"] == _param_counts(pruned)
    assert summary["kept"]["layers"] == plan.kept_layers
    assert summary["architecture"]["hidden_size"] == {"before": 32, "after": 24}
    assert set(summary["seconds"]) >= {"validate", "load", "calibration", "plan", "trim", "save"}
    assert summary["importance"]["num_samples"] == 8


def _assert_holds(directory, arch, state):
    model = build_gpt(arch, Parallel())
    checkpoint.load_weights(directory, [model], arch=arch)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state"):
            assert torch.equal(v, state[k]), k


def test_in_place_exact_directory_and_root(src, tmp_path):
    plan = make_plan(ImportanceScores.load(src["scores"]), ARCH, TARGET_OBJ)
    expected = _expected_state(src, plan)
    exact = str(tmp_path / "exact")
    shutil.copytree(src["ckpt"], exact)
    assert prune_cli.run(parse(["--load", exact, "--in-place", "--scores", src["scores"],
                                "--target", *TARGETS])) == 0
    _assert_holds(exact, plan.target, expected)
    meta = checkpoint.read_metadata(exact)
    # the copy's record points at the original directory (not into the copy), so it is kept as it is
    assert meta["tokenizer"]["path"] == src["ckpt"] and meta["provenance"]["in_place"]
    assert meta["provenance"]["source_architecture"]["hidden_size"] == 32
    assert os.path.exists(os.path.join(exact, "tokenizer.json"))
    assert sorted(n for n in os.listdir(tmp_path) if not is_lock_file(n)) == ["exact"]  # no staged/aside/trash copy

    root = str(tmp_path / "root")
    checkpoint.save_checkpoint(root, 5, [src["model"]], arch=ARCH, save_rng=False)
    checkpoint.save_checkpoint(root, 9, [src["model"]], arch=ARCH, save_rng=False)
    assert prune_cli.run(parse(["--load", root, "--in-place", "--scores", src["scores"],
                                "--target", *TARGETS])) == 0
    assert checkpoint.latest_iteration(root) == 9
    _assert_holds(root, plan.target, expected)
    assert checkpoint.read_metadata(root)["iteration"] == 9
    assert checkpoint.read_arch(os.path.join(root, "iter_0000005")) == ARCH  # older iterations untouched
    assert sorted(n for n in os.listdir(root) if not is_lock_file(n)) == ["iter_0000005", "iter_0000009", "latest"]


def _fake_ckpt(path, label):
    os.makedirs(path)
    for name, text in ((layout.COMMIT_FILE, "x"), (layout.METADATA_FILE, "{}"), ("label", label)):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)


def _label(path):
    with open(os.path.join(checkpoint.resolve_checkpoint_dir(path), "label")) as f:
        return f.read()


@pytest.mark.parametrize("state,loads", [("after_write", "old"), ("after_aside", "old"),
                                         ("before_delete", "new")])
def test_recovery_settles_an_interrupted_swap_as_loads_see_it(tmp_path, state, loads):
    for kind in ("exact", "root"):
        if kind == "exact":
            load = str(tmp_path / kind / "SRC")
            os.makedirs(os.path.dirname(load))
        else:
            load = str(tmp_path / kind)
            os.makedirs(load)
            layout.write_latest(load, "iter_0000003")
        paths = rewrite_paths(load)
        if state == "after_write":
            _fake_ckpt(paths.final, "old")
            _fake_ckpt(paths.staging, "new")
        elif state == "after_aside":
            _fake_ckpt(paths.aside, "old")
            _fake_ckpt(paths.staging, "new")
        else:
            _fake_ckpt(paths.final, "new")
            _fake_ckpt(paths.aside, "old")
        assert _label(load) == loads
        recover_interrupted_rewrite(paths)
        assert _label(load) == loads
        assert not os.path.exists(paths.staging) and not os.path.exists(paths.aside)
