"""The vendored Megatron-LM files are exactly the ones at the recorded tag (git blob ids in MANIFEST), and
they (or a checkout named by MINITRON_MEGATRON_LM_SRC, see harness.py) import beside the installed
megatron-core without shadowing it."""
import hashlib
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = os.path.join(HERE, "vendor")
sys.path.insert(0, HERE)
import harness  # noqa: E402


def git_blob_id(path):
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_vendored_files_are_unmodified_and_complete():
    with open(os.path.join(VENDOR, "MANIFEST")) as f:
        manifest = dict(reversed(line.split()) for line in f if line.strip())
    assert "LICENSE" in manifest and "megatron/training/checkpointing.py" in manifest
    changed = [p for p, blob in manifest.items() if git_blob_id(os.path.join(VENDOR, p)) != blob]
    assert not changed, f"vendored files differ from Megatron-LM core_v0.16.1: {changed}"
    on_disk = set()
    for root, dirs, files in os.walk(VENDOR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        on_disk.update(os.path.relpath(os.path.join(root, f), VENDOR) for f in files)
    assert on_disk - set(manifest) == {"MANIFEST", "README.md"}, on_disk - set(manifest)


def _python(code):
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_megatron_training_imports_beside_installed_core():
    installed_core = _python("import megatron.core; print(megatron.core.__file__)")[-1]
    core_file, training_file = _python(
        "import sys; sys.path.insert(0, %r); import harness; harness.import_megatron_lm(); "
        "import megatron.core, megatron.training.checkpointing as c; print(megatron.core.__file__); "
        "print(c.__file__)" % HERE)[-2:]
    assert core_file == installed_core and not core_file.startswith(harness.VENDOR)
    assert training_file == os.path.join(harness.VENDOR, "megatron", "training", "checkpointing.py")
