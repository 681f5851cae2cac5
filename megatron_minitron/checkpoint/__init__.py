"""Checkpoints: megatron-core distributed checkpoints (``torch_dist``) with atomic saves, a ``latest``
pointer, readable ``minitron.yaml`` metadata and loading at any TP x PP; Megatron-LM's own checkpoints
read and written too (megatron_lm.py). ``describe_checkpoint(path)`` says what a checkpoint of either
format holds (description.py). See docs/checkpoints.md."""
from .layout import (COMMIT_FILE, LATEST_FILE, METADATA_FILE, RELEASE_DIR, TRACKER_FILE, committed_iterations,
                     iter_dir_name, latest_iteration, resolve_checkpoint_dir)
from . import megatron_lm  # noqa: F401  (Megatron-LM layout: args <-> ModelArch, checkpoint.megatron_lm.*)
from .load import load_checkpoint, load_weights, read_weights
from .description import (CheckpointInfo, Contents, SavedLayout, describe_checkpoint, describe_directory,
                          read_arch, read_metadata)
from .metadata import (FORMAT_VERSION, MEGATRON_LM_FORMAT, SAVE_FORMATS, arch_differences, arch_from_metadata,
                       check_arch, checkpoint_format)
from .save import save_checkpoint, save_checkpoint_to

__all__ = [
    "save_checkpoint", "save_checkpoint_to", "load_checkpoint", "load_weights", "read_weights", "read_metadata",
    "read_arch", "resolve_checkpoint_dir", "latest_iteration", "committed_iterations", "iter_dir_name", "check_arch",
    "arch_differences", "arch_from_metadata", "FORMAT_VERSION", "COMMIT_FILE", "LATEST_FILE", "METADATA_FILE",
    "TRACKER_FILE", "RELEASE_DIR", "MEGATRON_LM_FORMAT", "SAVE_FORMATS", "checkpoint_format",
    "CheckpointInfo", "Contents", "SavedLayout", "describe_checkpoint", "describe_directory",
]
