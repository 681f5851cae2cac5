"""Checkpoint manifests: every file's size and checksum, damage named by file (missing, truncated, zero-length,
flipped bytes), torch_dist file references checked when there is no manifest."""
import os
import pickle
import zlib

import pytest

from megatron_minitron.checkpoint import integrity


def _tree(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(os.urandom(300_000))
    (d / "__1_0.distcp").write_bytes(os.urandom(200_000))
    (d / "common.pt").write_bytes(b"common")
    (d / "minitron.yaml").write_text("iteration: 3\n")
    (d / "COMMIT").write_text("iteration 3\n")
    return str(d)


@pytest.mark.parametrize("algorithm", ["crc32"] + (["xxh3_64"] if integrity.hash_algorithm() == "xxh3_64" else []))
def test_hash_matches_a_one_shot_computation(tmp_path, algorithm):
    data = os.urandom(40 << 20)  # several 16 MiB blocks plus a partial one
    path = tmp_path / "f"
    path.write_bytes(data)
    if algorithm == "crc32":
        expected = f"{zlib.crc32(data):08x}"
    else:
        import xxhash
        expected = xxhash.xxh3_64(data).hexdigest()
    assert integrity.file_hash(str(path), algorithm) == expected



def test_xxh3_manifest_without_xxhash_names_the_fix(tmp_path, monkeypatch):
    """A manifest hashed with xxh3_64 read where xxhash is missing: a ValueError naming the package and the
    sizes-only switch, not a ModuleNotFoundError from deep inside a load."""
    path = tmp_path / "f"
    path.write_bytes(b"bytes")
    monkeypatch.setitem(__import__("sys").modules, "xxhash", None)  # `import xxhash` now raises ImportError
    assert integrity.hash_algorithm() == "crc32"
    with pytest.raises(ValueError, match="pip install xxhash.*MINITRON_LOAD_VERIFY=sizes"):
        integrity.file_hash(str(path), "xxh3_64")

def test_shares_cover_every_file_once():
    files = ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__12_0.distcp", "common.pt", "metadata.json"]
    shares = [integrity.files_written_by(files, r) for r in range(13)]
    assert sorted(f for s in shares for f in s) == sorted(files)
    assert shares[1] == ["__1_0.distcp"] and "__12_0.distcp" not in shares[1]


def test_manifest_names_each_kind_of_damage(tmp_path):
    d = _tree(tmp_path)
    algorithm = integrity.hash_algorithm()
    files = integrity.list_files(d)
    assert "COMMIT" not in files and integrity.MANIFEST_FILE not in files
    integrity.write_manifest(d, integrity.hash_entries(d, files, algorithm), algorithm)
    manifest = integrity.read_manifest(d)
    assert integrity.check_files(d, manifest) == []

    shard = os.path.join(d, "__0_0.distcp")
    with open(shard, "r+b") as f:  # 2000 flipped bytes in the middle of a shard
        f.seek(100_000)
        block = bytearray(f.read(2000))
        f.seek(100_000)
        f.write(bytes(b ^ 0xFF for b in block))
    open(os.path.join(d, "__1_0.distcp"), "wb").close()  # zero-length
    os.remove(os.path.join(d, "common.pt"))
    problems = integrity.check_files(d, manifest)
    assert len(problems) == 3, problems
    assert any("__0_0.distcp is damaged" in p for p in problems)
    assert any("__1_0.distcp has 0 bytes, 200000 were written" in p for p in problems)
    assert any("common.pt is missing" in p for p in problems)
    assert integrity.check_files(d, manifest, hashes=False) == [p for p in problems if "damaged" not in p]
    message = integrity.damage_message(d, problems)
    assert "__0_0.distcp" in message and "minitron verify" in message


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    d = _tree(tmp_path)
    with open(os.path.join(d, integrity.MANIFEST_FILE), "w") as f:
        f.write('{"files": ')
    with pytest.raises(ValueError, match="MANIFEST.json is damaged"):
        integrity.read_manifest(d)


class _Info:
    def __init__(self, rel, offset, length):
        self.relative_path, self.offset, self.length = rel, offset, length


class _Meta:
    def __init__(self, storage):
        self.storage_data = storage


def test_without_manifest_the_storage_references_are_checked(tmp_path):
    d = _tree(tmp_path)
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(_Meta({"a": _Info("__0_0.distcp", 0, 300_000), "b": _Info("__1_0.distcp", 150_000, 50_000),
                           "c": _Info("__2_0.distcp", 0, 10)}), f)
    problems = integrity.check_storage_references(d)
    assert problems == [os.path.join(d, "__2_0.distcp") + " is missing"]
    with open(os.path.join(d, "__0_0.distcp"), "r+b") as f:
        f.truncate(1000)
    assert any("__0_0.distcp has 1000 bytes but holds data up to byte 300000" in p
               for p in integrity.check_storage_references(d))
    with open(os.path.join(d, ".metadata"), "wb") as f:
        f.write(b"\x80\x04garbage")
    assert "is damaged" in integrity.check_storage_references(d)[0]
