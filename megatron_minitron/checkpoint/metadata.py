"""``minitron.yaml``: the human-readable description written into every checkpoint directory.

It records what the tensors are (architecture), how they were laid out when saved (TP, PP, DP, layers per
stage), where they came from (provenance), and which parts the checkpoint holds, so that tools can check a
checkpoint before reading a single tensor and people can inspect one with ``cat``.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Optional

import yaml

from ..config import ModelArch, from_dict, to_dict
from ..runtime.files import write_yaml_durably
from .layout import METADATA_FILE

FORMAT_NAME = "megatron-minitron-checkpoint"
MEGATRON_LM_FORMAT = "megatron-lm"  # the "format" of a checkpoint in Megatron-LM's layout (see megatron_lm.py)
SAVE_FORMATS = ("minitron", MEGATRON_LM_FORMAT)
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "iteration", "architecture", "parallel", "contents")
# Fields that do not change the weights or the function they compute; a checkpoint may be loaded into a
# model that differs only in these (e.g. training on at a longer sequence length, with dropout on).
RUNTIME_ONLY_FIELDS = ("hidden_dropout", "attention_dropout", "init_method_std", "seq_length")


def plain(value: Any) -> Any:
    """``value`` as YAML-safe builtins (dataclasses, tuples, paths, numpy/torch scalars, anything else -> str)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        try:
            return plain(value.item())
        except (ValueError, RuntimeError):
            pass
    return str(value)


def build_metadata(arch: ModelArch, iteration: int, parallel: dict, contents: dict,
                   provenance: Optional[dict] = None, tokenizer: Any = None, format: str = "minitron") -> dict:
    if isinstance(tokenizer, str):
        tokenizer = {"path": tokenizer}
    return {
        "format": MEGATRON_LM_FORMAT if format == MEGATRON_LM_FORMAT else FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "iteration": int(iteration),
        "architecture": architecture_record(arch),
        "parallel": plain(parallel),
        "contents": plain(contents),
        "provenance": plain(provenance or {}),
        "tokenizer": plain(tokenizer),
    }


# ModelArch fields added after checkpoints were first written, recorded only when not at their default: a
# checkpoint that does not use them stays readable by a megatron-minitron that predates them (its reader refuses
# unknown keys), and one that does is refused there, as it must be (that version cannot build it)
ARCH_FIELDS_RECORDED_WHEN_SET = {f.name: f.default for f in dataclasses.fields(ModelArch)
                                 if f.name in ("qk_layernorm", "no_rope_freq")
                                 or f.name.startswith(("yarn_", "longrope_"))}


def architecture_record(arch) -> dict:
    record = to_dict(arch)
    for name, default in ARCH_FIELDS_RECORDED_WHEN_SET.items():
        if record.get(name) == default:
            record.pop(name)
    return record


def write_metadata(directory: str, metadata: dict) -> None:
    write_yaml_durably(os.path.join(directory, METADATA_FILE), plain(metadata))


def read_metadata_file(directory: str) -> dict:
    """Parse and check ``directory/minitron.yaml`` (no resolution of roots)."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no {METADATA_FILE}: it was not written by megatron-minitron's "
                         f"checkpoint module (or the file was deleted); re-save it with save_checkpoint")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is corrupt ({e.__class__.__name__}: {str(e)[:200]}); restore it from the "
                         f"previous checkpoint or re-save") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt: expected a mapping, found {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path} is corrupt or incomplete: missing {missing}; restore it or re-save")
    version = data["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this megatron-minitron reads versions up to "
                         f"{FORMAT_VERSION}. Upgrade megatron-minitron to load it")
    if not isinstance(data["architecture"], dict):
        raise ValueError(f"{path} is corrupt: `architecture` is not a mapping")
    return data


def checkpoint_format(metadata: dict) -> str:
    """"megatron-lm" or "minitron": the layout of the checkpoint ``metadata`` describes (what a save that
    keeps the input's format, e.g. `prune --in-place`, writes)."""
    return MEGATRON_LM_FORMAT if metadata.get("format") == MEGATRON_LM_FORMAT else "minitron"


def arch_from_metadata(metadata: dict) -> ModelArch:
    saved = metadata["architecture"]
    try:
        return from_dict(ModelArch, saved, "architecture.")
    except ValueError as e:
        raise ValueError(f"checkpoint architecture cannot be read by this version: {e}") from None


def _saved_arch(described) -> tuple:
    """(architecture, directory) of a CheckpointInfo (description.py) or of a metadata record."""
    if isinstance(described, dict):
        return arch_from_metadata(described), described.get("checkpoint_dir", "the checkpoint")
    return described.arch, described.directory


def arch_differences(arch: ModelArch, described, ignore=RUNTIME_ONLY_FIELDS) -> list:
    """[(field, value in checkpoint, value given)] for every ModelArch field that differs. ``described``:
    the checkpoint's CheckpointInfo (describe_checkpoint) or metadata record (read_metadata)."""
    saved = to_dict(_saved_arch(described)[0])
    given = to_dict(arch)
    ignored = set(ignore)
    if arch.position_embedding == "learned_absolute":
        ignored.discard("seq_length")  # the position table's size
    return [(name, saved[name], given[name]) for name in given
            if name not in ignored and saved[name] != given[name]]


def check_arch(arch: ModelArch, described, ignore=RUNTIME_ONLY_FIELDS) -> None:
    """Raise ValueError listing every field where ``arch`` and the checkpoint's architecture differ."""
    diffs = arch_differences(arch, described, ignore)
    if diffs:
        where = _saved_arch(described)[1] or "the checkpoint"
        lines = "\n".join(f"  {name}: checkpoint {saved!r}, given {given!r}" for name, saved, given in diffs)
        raise ValueError(f"architecture mismatch between {where} and the model being loaded "
                         f"({len(diffs)} field(s)):\n{lines}\nBuild the model from the checkpoint's "
                         f"architecture (checkpoint.read_arch(path)) or point at the right checkpoint.")
