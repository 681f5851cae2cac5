"""`minitron verify CKPT`: check a whole checkpoint's files against its manifest, without loading a model."""
from __future__ import annotations

import time


def register(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check a checkpoint's files (sizes and checksums) without loading it",
                              description="Every file of the checkpoint against the MANIFEST.json written at\n"
                                          "save time: missing, truncated, zero-length and damaged files are\n"
                                          "named. Checkpoints without a manifest (older ones, Megatron-LM's)\n"
                                          "get the checks possible without one: the files torch_dist's\n"
                                          ".metadata refers to exist and hold their bytes; a legacy\n"
                                          "--ckpt-format torch one's rank files are all there, complete,\n"
                                          "and match their zip CRC-32s.")
    p.add_argument("checkpoint", help="a checkpoint root (follows its latest / tracker file) or directory")
    p.add_argument("--sizes-only", action="store_true", help="check presence and sizes, skip the checksums")
    p.set_defaults(handler=run)


def run(args) -> int:
    from . import integrity, megatron_lm_torch
    from .layout import resolve_checkpoint_dir
    from .description import describe_directory

    started = time.time()
    directory = resolve_checkpoint_dir(args.checkpoint)
    manifest = integrity.read_manifest(directory)
    if manifest is None and megatron_lm_torch.is_torch_format_dir(directory):
        problems = megatron_lm_torch.check_files(directory, checksums=not args.sizes_only)  # before any unpickling
        if problems:
            raise ValueError(integrity.damage_message(directory, problems))
        describe_directory(directory)  # the args describe a model we build
        what = "complete zip archives" + ("" if args.sizes_only else " whose entries match their CRC-32")
        print(f"{directory}: Megatron-LM --ckpt-format torch checkpoint: every rank file its args' TP x PP needs "
              f"is present, {what} ({time.time() - started:.1f} s)", flush=True)
        return 0
    describe_directory(directory)  # the description parses (our metadata or Megatron-LM's common.pt)
    if manifest is None:
        problems = integrity.check_storage_references(directory)
        if problems:
            raise ValueError(integrity.damage_message(directory, problems))
        print(f"{directory}: no {integrity.MANIFEST_FILE} (an older or foreign checkpoint): the files its "
              f".metadata refers to are present and long enough; contents not checksummed", flush=True)
        return 0
    problems = integrity.check_files(directory, manifest, hashes=not args.sizes_only)
    if problems:
        raise ValueError(integrity.damage_message(directory, problems))
    files = manifest["files"]
    size = sum(entry["size"] for entry in files.values())
    what = "sizes" if args.sizes_only else f"sizes and {manifest.get('algorithm')} checksums"
    print(f"{directory}: OK, {len(files)} files ({size / 2**20:.1f} MiB), {what} match the manifest "
          f"({time.time() - started:.1f} s)", flush=True)
    return 0
