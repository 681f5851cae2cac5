"""The sequence length is the job's choice (issue 12, items 2 and 3), through the real CLI: a model whose
checkpoint records a long maximum context (as an HF import does) is trained with `train.load` and an otherwise
empty `model:` section, pruned with a short calibration window, distilled and evaluated at a short window.
Every job's data windows have the requested length (read from the dataset cache megatron writes), every saved
checkpoint keeps the source's maximum context and architecture, and overrides a job cannot honour fail."""
import glob
import json
import os

import pytest
import yaml

from megatron_minitron.checkpoint import read_metadata

from test_train_cli import ENV, corpus, minitron  # noqa: F401  (the shared corpus fixture)

MAX_CONTEXT = 256  # what the source checkpoint records (an HF import: max_position_embeddings)
WINDOW = 32  # what the jobs run at
SOURCE_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
                "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=512",
                f"model.seq_length={MAX_CONTEXT}", "model.rotary_base=50000"]


def window_lengths(cache_dir):
    """The sequence_length of every GPTDataset megatron built (and cached) for a job."""
    lengths = set()
    for path in glob.glob(os.path.join(cache_dir, "**", "*-GPTDataset-*-description.txt"), recursive=True):
        with open(path) as f:
            lengths.add(json.load(f)["sequence_length"])
    return lengths


def architecture(path):
    return read_metadata(path)["architecture"]


@pytest.fixture
def preloaded(preloaded_cli):
    """`minitron` for the commands after the first: forks of the session's preloaded process (tests/e2e/conftest.py)."""
    def run(*args, check=True):
        proc = preloaded_cli.run(*args, env=ENV, timeout=300)
        if check and proc.returncode != 0:
            pytest.fail(f"minitron {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc
    return run


def test_jobs_run_at_the_requested_window_and_saves_keep_the_max_context(corpus, preloaded, tmp_path):  # noqa: F811
    train, valid = corpus
    data = [f"data.train_data=[{train}]", f"data.valid_data=[{valid}]", "data.micro_batch_size=2",
            "data.global_batch_size=2", "train.eval_interval=0", "train.lr=1e-3"]
    source = str(tmp_path / "source")
    minitron("train", *SOURCE_MODEL, *data, "train.train_iters=1", f"train.save={source}",
             f"data.cache_dir={tmp_path / 'cache0'}")
    source_arch = architecture(source)
    assert source_arch["seq_length"] == MAX_CONTEXT and window_lengths(tmp_path / "cache0") == {MAX_CONTEXT}

    # train.load with no architecture in the config: the checkpoint's, at the window asked for
    tuned = str(tmp_path / "tuned")
    preloaded("train", *data, "train.train_iters=2", f"train.load={source}", f"model.seq_length={WINDOW}",
              f"train.save={tuned}", f"data.cache_dir={tmp_path / 'cache1'}")
    assert window_lengths(tmp_path / "cache1") == {WINDOW}
    assert architecture(tuned) == source_arch  # seq_length included: the max context, not the window
    with open(os.path.join(tuned, "config.yaml")) as f:
        assert yaml.safe_load(f)["model"]["seq_length"] == WINDOW  # the run's config records its window
    # resuming the same run (train.save holds it) keeps both
    preloaded("train", *data, "train.train_iters=3", f"train.load={source}", f"model.seq_length={WINDOW}",
              f"train.save={tuned}", f"data.cache_dir={tmp_path / 'cache1'}")
    assert read_metadata(tuned)["iteration"] == 3 and architecture(tuned) == source_arch

    # prune calibrates on windows of --seq-length; the pruned model keeps the max context
    pruned = str(tmp_path / "pruned")
    preloaded("prune", "--load", source, "--save", pruned, "--data", train, "--num-samples", "4",
              "--micro-batch-size", "2", "--seq-length", str(WINDOW), "--target", "hidden_size=48",
              "ffn_hidden_size=96")
    head_dim = source_arch["hidden_size"] // source_arch["num_attention_heads"]  # kept when hidden shrinks
    assert architecture(pruned) == {**source_arch, "hidden_size": 48, "ffn_hidden_size": 96,
                                    "kv_channels": head_dim}

    # distill: the student's architecture from its checkpoint, the window from model.seq_length
    distilled = str(tmp_path / "distilled")
    preloaded("distill", *data, "train.train_iters=2", f"distill.teacher={source}", f"distill.student={pruned}",
              f"model.seq_length={WINDOW}", f"train.save={distilled}", f"data.cache_dir={tmp_path / 'cache2'}")
    assert window_lengths(tmp_path / "cache2") == {WINDOW}
    assert architecture(distilled) == architecture(pruned)

    # eval at a window, and a window that is not one
    out = tmp_path / "eval.json"
    preloaded("eval", "--load", distilled, "--data", valid, "--num-samples", "4", "--seq-length", str(WINDOW),
              "--output", str(out))
    assert json.loads(out.read_text())["lm"]["seq_length"] == WINDOW
    for bad in ("0", "-3"):
        proc = preloaded("eval", "--load", distilled, "--data", valid, "--seq-length", bad, check=False)
        assert proc.returncode == 2 and "must be a positive integer" in proc.stderr, proc.stderr[-2000:]

    # overrides a job cannot honour are errors naming the field, never dropped
    proc = preloaded("distill", *data, f"distill.teacher={source}", f"distill.student={pruned}",
                     "model.hidden_size=64", f"train.save={tmp_path / 'never'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"model.hidden_size=64: the student checkpoint {pruned} has 48" in proc.stderr
    proc = preloaded("train", *data, f"train.load={source}", "model.num_layers=4", check=False)
    assert proc.returncode == 2 and "model.num_layers=4: the train.load checkpoint" in proc.stderr
    assert not os.path.exists(tmp_path / "never")
