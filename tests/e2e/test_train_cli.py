"""`minitron preprocess` -> `minitron train` on the embedded corpus, and SIGTERM reaching one rank of a
two-rank run: every rank saves at the same iteration and exits 0; the next launch resumes from there."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.vocab_size=512", "model.seq_length=32"]


def minitron(*args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "megatron_minitron.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"minitron {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def preloaded(preloaded_cli):
    """`minitron` as above, in a fork of the session's preloaded process (tests/e2e/conftest.py): for the
    commands after a test's first, which stays a plain process."""
    def run(*args, check=True, timeout=300):
        proc = preloaded_cli.run(*args, env=ENV, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"minitron {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc
    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", "300000", "--train-tokenizer",
             "--vocab-size", "512", "--output-prefix", str(out / "stdlib"))
    return str(out / "stdlib_train"), str(out / "stdlib_valid")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(save):
    path = os.path.join(save, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_learns_and_checkpoints(corpus, preloaded, tmp_path):
    train, valid = corpus
    save = str(tmp_path / "run")
    proc = minitron("train", *MODEL, f"data.train_data=[{train}]", f"data.valid_data=[{valid}]",
                    "data.global_batch_size=8", "train.train_iters=30", "train.lr=3e-3", "train.eval_interval=15",
                    "train.eval_iters=2", f"train.save={save}", "train.log_interval=5")
    assert "Warning" not in proc.stderr, proc.stderr  # library deprecation notices are filtered for users
    # a summary at the start (size, layout, tokens per step) and at the end (final and best validation loss)
    assert f"TP1 PP1 DP1; 256 tokens per step (8 x 32); iterations 0 -> 30; checkpoints to {save}" in proc.stdout
    assert "done: 30 iterations (0 -> 30), 7,680 tokens in" in proc.stdout, proc.stdout
    records = read_metrics(save)
    losses = [r["lm_loss"] for r in records if "lm_loss" in r]
    vals = [r["val_lm_loss"] for r in records if "val_lm_loss" in r]
    assert len(losses) == 30 and len(vals) == 2
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # it learns real text
    assert vals[1] < vals[0]
    assert f"final val_lm_loss {vals[1]:.4f} (iteration 30), best {min(vals):.4f}" in proc.stdout, proc.stdout
    with open(os.path.join(save, "latest")) as f:
        assert f.read().strip() == "iter_0000030"
    assert os.path.exists(os.path.join(save, "iter_0000030", "minitron.yaml"))
    assert os.path.exists(os.path.join(save, "config.yaml"))
    # the same command again: already at train_iters, so nothing is trained or rewritten
    before = {name: os.stat(os.path.join(save, name)).st_mtime_ns for name in ("config.yaml", "metrics.jsonl")}
    again = preloaded("train", *MODEL, f"data.train_data=[{train}]", f"data.valid_data=[{valid}]",
                      "data.global_batch_size=8", "train.train_iters=30", f"train.save={save}")
    assert "nothing to do" in again.stdout, again.stdout
    assert before == {name: os.stat(os.path.join(save, name)).st_mtime_ns for name in before}


def test_bad_config_fails_before_work(preloaded, tmp_path):
    proc = minitron("train", "model.num_attention_heads=5", check=False)
    assert proc.returncode == 2
    assert "model.hidden_size=128 is not divisible by num_attention_heads=5" in proc.stderr
    proc = preloaded("train", "data.train_data=[/nonexistent/x]", check=False)
    assert proc.returncode == 2 and "run `minitron preprocess`" in proc.stderr


def test_sigterm_on_one_rank_saves_and_exits_cleanly(corpus, preloaded, tmp_path):
    train, _ = corpus
    save = str(tmp_path / "run")
    args = ["train", *MODEL, f"data.train_data=[{train}]", "data.global_batch_size=4",
            "data.micro_batch_size=1", "parallel.pipeline_model_parallel_size=2", "train.train_iters=2000",
            "train.eval_interval=0", "train.eval_iters=0", f"train.save={save}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "-m", "megatron_minitron.cli", *args]
    log_path = tmp_path / "log.txt"
    log = open(log_path, "w")  # a file, not a pipe: nobody reads while it runs
    launcher = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: cleaned up as a whole
    try:
        deadline = time.time() + 240
        while len(read_metrics(save)) < 3:
            assert launcher.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "training did not start: " + log_path.read_text()[-3000:]
            time.sleep(0.5)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if p.environ().get("LOCAL_RANK") == "1"]
        assert workers, "rank 1 not found"
        workers[0].send_signal(signal.SIGTERM)  # only one rank hears it, as on a cluster
        launcher.wait(timeout=240)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        log.close()
    out = log_path.read_text()
    assert launcher.returncode == 0, out[-3000:]
    assert "exit signal received" in out
    stopped = len(read_metrics(save))
    assert 3 <= stopped < 2000
    with open(os.path.join(save, "latest")) as f:
        assert f.read().strip() == f"iter_{stopped:07d}"
    # the next launch resumes from the saved iteration
    preloaded("train", *MODEL, f"data.train_data=[{train}]", "data.global_batch_size=4",
              "data.micro_batch_size=1", f"train.train_iters={stopped + 2}", "train.eval_interval=0",
              "train.eval_iters=0", f"train.save={save}")
    iterations = [r["iteration"] for r in read_metrics(save)]
    assert iterations[-2:] == [stopped + 1, stopped + 2]


def test_checkpoints_name_the_tokenizer_through_the_pipeline(corpus, preloaded, tmp_path):
    """Trained from a dataset: the checkpoint names the dataset's tokenizer; trained on from that checkpoint
    (train.load, e.g. distillation or teacher correction): the new checkpoint names the same one."""
    from megatron_minitron.checkpoint import read_metadata
    from megatron_minitron.data import load_tokenizer_sidecar

    train, _ = corpus
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    common = [*MODEL, f"data.train_data=[{train}]", "data.global_batch_size=4", "train.train_iters=1",
              "train.eval_interval=0", "train.eval_iters=0"]
    minitron("train", *common, f"train.save={first}")
    expected = load_tokenizer_sidecar(train).describe()
    assert read_metadata(first)["tokenizer"] == expected
    preloaded("train", *common, f"train.save={second}", f"train.load={first}")
    assert read_metadata(second)["tokenizer"] == expected
