"""One writer per output: a second writer fails at once naming the holder; the lock dies with its process."""
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_minitron.checkpoint.lock import OutputLock

HOLD = """
import sys, time
from megatron_minitron.checkpoint.lock import OutputLock
lock = OutputLock(sys.argv[1], is_root=sys.argv[2] == "root", what="train.save").acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(target, kind):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, target, kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("kind", ["root", "exact"])
def test_second_writer_fails_naming_the_holder_and_a_killed_holder_frees_it(tmp_path, kind):
    target = str(tmp_path / "out")
    holder = _holder(target, kind)
    try:
        with pytest.raises(ValueError, match=rf"being written by another job \(host .* pid {holder.pid} since"):
            OutputLock(target, is_root=kind == "root", what="train.save").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
        holder.wait()
    with OutputLock(target, is_root=kind == "root") as lock:  # resuming after the crash is unaffected
        assert os.path.exists(lock.path)
    again = OutputLock(target, is_root=kind == "root").acquire()
    again.release()


def test_lock_files_stay_out_of_the_checkpoint_names(tmp_path):
    root = OutputLock(str(tmp_path / "root"), is_root=True)
    exact = OutputLock(str(tmp_path / "pruned") + "/", is_root=False)
    assert root.path == str(tmp_path / "root" / ".minitron.lock")
    assert exact.path == str(tmp_path / "pruned.lock")


def test_jobs_of_one_process_share_the_lock_and_release_it_last(tmp_path):
    target = str(tmp_path / "root")
    first = OutputLock(target, is_root=True).acquire()
    second = OutputLock(target, is_root=True).acquire()  # e.g. a resumed Trainer built while the first lives
    first.release()
    probe = subprocess.run([sys.executable, "-c", HOLD, target, "root"], capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "being written by another job" in probe.stderr  # still held by `second`
    second.release()
    holder = _holder(target, "root")  # now free for another process
    holder.send_signal(signal.SIGKILL)
    holder.wait()
