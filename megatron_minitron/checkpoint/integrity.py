"""Checksums of a checkpoint's files: written with every save, verified on load and by `minitron verify`.

``MANIFEST.json`` in the checkpoint directory lists every file (relative path -> size and a fast hash:
xxh3-64 when the ``xxhash`` package is importable, else CRC-32) except itself and the COMMIT marker, which
is written after it. Each rank hashes the shard files it wrote (``__<rank>_<i>.distcp``) and rank 0 the rest, so
the cost is spread like the write. On load each rank verifies a disjoint share of the files, so every byte is
read once more (from the page cache, usually) and no rank reads the whole checkpoint twice.

Checkpoints without a manifest (older ones, Megatron-LM's) are still checked for what can be known without
one: every file torch_dist's ``.metadata`` refers to must exist and be long enough for the bytes it holds.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Optional

MANIFEST_FILE = "MANIFEST.json"
# what loads check: "full" (sizes and checksums, the default), "sizes" (presence and sizes only), "off"
LOAD_VERIFY_ENV = "MINITRON_LOAD_VERIFY"
MANIFEST_VERSION = 1
_SKIP = {MANIFEST_FILE, "COMMIT"}
_BLOCK = 16 << 20


def hash_algorithm() -> str:
    try:
        import xxhash  # noqa: F401
        return "xxh3_64"
    except ImportError:
        return "crc32"


def file_hash(path: str, algorithm: str) -> str:
    """Hex digest of a whole file, streamed in 16 MiB blocks."""
    if algorithm == "xxh3_64":
        try:
            import xxhash
        except ImportError:  # a manifest written where xxhash was installed, read where it is not
            raise ValueError(f"{path} is listed with an xxh3_64 checksum, which needs the xxhash package: "
                             "pip install xxhash (a megatron-minitron requirement), or check sizes only "
                             "(MINITRON_LOAD_VERIFY=sizes for loads, minitron verify --sizes-only)") from None
        h = xxhash.xxh3_64()
        update = h.update
    elif algorithm == "crc32":
        crc = 0

        def update(block):
            nonlocal crc
            crc = zlib.crc32(block, crc)
    else:
        raise ValueError(f"unknown checksum algorithm {algorithm!r} in a manifest; upgrade megatron-minitron")
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            update(block)
    return h.hexdigest() if algorithm == "xxh3_64" else f"{crc:08x}"


def list_files(directory: str) -> list:
    """Relative paths of the files a manifest covers, sorted."""
    found = []
    for dirpath, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            if rel not in _SKIP:
                found.append(rel)
    return sorted(found)


def files_written_by(files: list, rank: int) -> list:
    """The share of ``files`` a rank hashes at save time: its own torch_dist shards; rank 0 also the rest."""
    own = [f for f in files if os.path.basename(f).startswith(f"__{rank}_")]
    if rank == 0:
        own += [f for f in files if not (os.path.basename(f).startswith("__") and f.endswith(".distcp"))]
    return own


def hash_entries(directory: str, files: list, algorithm: str) -> dict:
    return {rel: {"size": os.path.getsize(os.path.join(directory, rel)),
                  "hash": file_hash(os.path.join(directory, rel), algorithm)} for rel in files}


def write_manifest(directory: str, entries: dict, algorithm: str) -> None:
    path = os.path.join(directory, MANIFEST_FILE)
    with open(path, "w") as f:
        json.dump({"version": MANIFEST_VERSION, "algorithm": algorithm, "files": dict(sorted(entries.items()))},
                  f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: str) -> Optional[dict]:
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        files = data["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ValueError(f"{path} is damaged (not a readable manifest); restore it from a copy, or delete it "
                         f"to load the checkpoint unverified") from None
    return data


def check_files(directory: str, manifest: dict, files: Optional[list] = None, hashes: bool = True) -> list:
    """Problems with ``files`` (default: all the manifest lists), one readable line each: missing, wrong
    size (truncated / zero-length), or wrong checksum (damaged bytes)."""
    algorithm = manifest.get("algorithm", "crc32")
    listed = manifest["files"]
    problems = []
    for rel in (sorted(listed) if files is None else files):
        entry = listed[rel]
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size != entry["size"]:
            problems.append(f"{path} has {size} bytes, {entry['size']} were written (truncated or overwritten)")
        elif hashes and file_hash(path, algorithm) != entry["hash"]:
            problems.append(f"{path} is damaged: its {algorithm} checksum differs from the one written at save")
    return problems


def check_storage_references(directory: str) -> list:
    """Without a manifest: every file torch_dist's ``.metadata`` points into exists and holds the bytes."""
    meta_path = os.path.join(directory, ".metadata")
    if not os.path.isfile(meta_path):
        return []
    import pickle

    try:
        with open(meta_path, "rb") as f:
            metadata = pickle.load(f)
    except Exception as e:  # any unpickling failure means the file is damaged
        return [f"{meta_path} is damaged ({type(e).__name__}); the checkpoint cannot be read"]
    needed = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
            needed[rel] = max(needed.get(rel, 0), end)
    problems = []
    for rel, end in sorted(needed.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif os.path.getsize(path) < end:
            problems.append(f"{path} has {os.path.getsize(path)} bytes but holds data up to byte {end} "
                            f"(truncated)")
    return problems


def damage_message(directory: str, problems: list) -> str:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return (f"checkpoint {directory} is damaged:\n  {shown}\nRestore these files from a copy, or load an "
            f"earlier checkpoint (the root keeps the newest train.keep_last); `minitron verify` checks a whole "
            f"checkpoint")


# ------------------------------------------------------------------------------------------ across ranks
def _world() -> tuple:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value) -> list:
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def shard_hashes(staging: str) -> dict:
    """Every rank, after all ranks wrote ``staging``: the hashes of this rank's share, gathered on all."""
    rank, _ = _world()
    algorithm = hash_algorithm()
    mine = hash_entries(staging, files_written_by(list_files(staging), rank), algorithm)
    merged = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def finish_manifest(staging: str, entries: dict) -> None:
    """Rank 0, once the last file (our metadata) is in ``staging``: hash what is not hashed yet, write."""
    algorithm = hash_algorithm()
    missing = [f for f in list_files(staging) if f not in entries]
    write_manifest(staging, {**entries, **hash_entries(staging, missing, algorithm)}, algorithm)


def verify_before_load(directory: str, hashes: bool = True) -> None:
    """Every rank, before reading tensors: each checks a disjoint share of the manifest's files (or, with no
    manifest, rank 0 checks torch_dist's file references; a legacy torch-format checkpoint's rank files are
    shared out and CRC-checked); all raise the same ValueError naming the damage."""
    from . import megatron_lm_torch

    rank, world = _world()
    manifest = read_manifest(directory)
    if manifest is None and megatron_lm_torch.is_torch_format_dir(directory):
        problems = megatron_lm_torch.check_files(directory, checksums=hashes, rank=rank, world=world)
    elif manifest is None:
        problems = check_storage_references(directory) if rank == 0 else []
    else:
        problems = check_files(directory, manifest, sorted(manifest["files"])[rank::world], hashes=hashes)
    found = sorted({p for part in _gather(problems) for p in part})
    if found:
        raise ValueError(damage_message(directory, found))


def verify_on_load(directory: str) -> None:
    """What every load runs before reading tensors (``MINITRON_LOAD_VERIFY`` = full | sizes | off)."""
    mode = os.environ.get(LOAD_VERIFY_ENV, "full")
    if mode not in ("full", "sizes", "off"):
        raise ValueError(f"{LOAD_VERIFY_ENV}={mode!r}: full, sizes or off")
    if mode != "off":
        verify_before_load(directory, hashes=mode == "full")
