"""Checkpoints under attack, through the commands users run: flipped bytes, truncated, zero-length and deleted
shard files are named (verify, and every load); a second writer into the same root fails at once naming the
first; a full disk is one clear error, with the partial save removed and the previous checkpoint intact."""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
ENV.pop("MINITRON_DEBUG", None)
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
         "model.vocab_size=512", "model.seq_length=32", "data.global_batch_size=4", "data.micro_batch_size=2",
         "train.eval_iters=0", "train.progress_bar=false"]


def minitron(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "megatron_minitron.cli", *args], capture_output=True, text=True,
                          env=dict(ENV, **(env or {})), cwd=ROOT, timeout=timeout)


@pytest.fixture
def preloaded(preloaded_cli):
    """`minitron` as above, in a fork of the session's preloaded process (tests/e2e/conftest.py): the commands
    after each test's first; that one and the lock holder stay plain `python -m megatron_minitron.cli`."""
    return lambda *args, env=None, timeout=600: preloaded_cli.run(*args, env=dict(ENV, **(env or {})),
                                                                   timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    proc = minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", "200000", "--train-tokenizer",
                    "--vocab-size", "512", "--output-prefix", str(out / "stdlib"))
    assert proc.returncode == 0, proc.stderr
    return [f"data.train_data=[{out / 'stdlib_train'}]", f"data.valid_data=[{out / 'stdlib_valid'}]"]


def _train(data, save, *extra, env=None, run=minitron):
    return run("train", *MODEL, *data, f"train.save={save}", *extra, env=env)


def _shards(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".distcp"))


def test_damage_is_named_by_file(data, preloaded, tmp_path):
    save = tmp_path / "run"
    proc = _train(data, save, "train.train_iters=2")
    assert proc.returncode == 0, proc.stderr
    ckpt = save / "iter_0000002"
    assert (ckpt / "MANIFEST.json").exists()
    ok = preloaded("verify", str(save))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    shard = _shards(ckpt)[0]
    pristine = open(shard, "rb").read()

    damaged = bytearray(pristine)
    middle = len(damaged) // 2
    damaged[middle:middle + 2000] = bytes(b ^ 0x5A for b in damaged[middle:middle + 2000])
    open(shard, "wb").write(bytes(damaged))
    for args in (["verify", str(save)], ["eval", "--load", str(save), "--data", data[1].split("[")[1][:-1],
                                         "--num-samples", "2", "--seq-length", "32"]):
        bad = preloaded(*args)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert f"{shard} is damaged" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr

    open(shard, "wb").write(pristine[:len(pristine) // 3])
    bad = preloaded("verify", str(save), "--sizes-only")
    assert bad.returncode == 2 and f"{shard} has {len(pristine) // 3} bytes, {len(pristine)} were written" in bad.stderr
    open(shard, "wb").close()
    assert "has 0 bytes" in preloaded("verify", str(save)).stderr
    os.remove(shard)
    bad = preloaded("eval", "--load", str(save), "--data", data[1].split("[")[1][:-1], "--num-samples", "2")
    assert bad.returncode == 2 and f"{shard} is missing" in bad.stderr, bad.stderr

    open(shard, "wb").write(pristine)  # restored: loads again; and a foreign checkpoint (no manifest) loads too
    os.remove(ckpt / "MANIFEST.json")
    fine = preloaded("verify", str(save))
    assert fine.returncode == 0 and "no MANIFEST.json" in fine.stdout, fine.stderr


def test_second_writer_fails_at_once_naming_the_first(data, preloaded, tmp_path):
    save = tmp_path / "shared_root"
    first = subprocess.Popen([sys.executable, "-m", "megatron_minitron.cli", "train", *MODEL, *data,
                              f"train.save={save}", "train.train_iters=100000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        lock = save / ".minitron.lock"
        deadline = time.time() + 300
        while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.5)
        second = _train(data, save, "train.train_iters=5", run=preloaded)
        assert second.returncode == 2, second.stderr
        assert "is being written by another job" in second.stderr and f"pid {first.pid}" in second.stderr
        assert not os.path.exists(save / "iter_0000005")
    finally:
        first.kill()
        first.wait()
    # the holder died (as in a crash): the root is free again and the next run proceeds
    assert _train(data, save, "train.train_iters=1", run=preloaded).returncode == 0


@pytest.fixture
def small_disk():
    mount = tempfile.mkdtemp(prefix="minitron_full_")

    def make(size_kib):
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", mount],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here to fill ({proc.stderr.strip()}); needs root")
        return mount
    yield make
    subprocess.run(["umount", mount], capture_output=True)
    shutil.rmtree(mount, ignore_errors=True)


def test_full_disk_is_one_clear_error_and_loses_nothing(data, preloaded, tmp_path, small_disk):
    probe = tmp_path / "probe"
    assert _train(data, probe, "train.train_iters=1").returncode == 0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(probe / "iter_0000001") for f in fs)

    disk = small_disk(int(size * 1.6) // 1024)  # room for one checkpoint, not two
    save = os.path.join(disk, "run")
    ran = _train(data, save, "train.train_iters=4", "train.save_interval=2", "train.keep_last=2",
                 env={"MINITRON_SKIP_SPACE_CHECK": "1"}, run=preloaded)  # let the write itself hit the full disk
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "No space left on device" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
    assert sorted(n for n in os.listdir(save) if n.startswith((".tmp", ".trash"))) == []
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000002"
    assert preloaded("verify", save).returncode == 0  # the previous checkpoint is intact

    checked = _train(data, os.path.join(disk, "other"), "train.train_iters=1", run=preloaded)  # estimate first
    assert checked.returncode == 2 and "not enough disk space" in checked.stderr, checked.stderr
