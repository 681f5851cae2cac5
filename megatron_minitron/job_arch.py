"""The architecture and sequence length of a job whose model comes from a checkpoint.

A checkpoint's ``seq_length`` is the model's maximum context (for an HF import: ``max_position_embeddings``);
the sequence length a job trains, calibrates or evaluates at is the job's choice. One set of rules, used by
train (``train.load`` / resume), distill (the student), prune (calibration) and eval:

* The architecture is the checkpoint's. A ``model.*`` value the user gave (YAML or override) that differs from
  it is an error naming the field: the job loads those weights and cannot change their shape.
  ``hidden_dropout``, ``attention_dropout`` and ``init_method_std`` change no weight and are honoured.
* A user-given ``model.seq_length`` (or ``--seq-length``) is the job's window; otherwise the window is the
  checkpoint's ``seq_length``. A window <= 0 is an error, and so is one longer than a learned position table
  (``position_embedding=learned_absolute``); past a rope model's trained context it is a warning.
* What the job saves keeps the checkpoint's ``seq_length`` (the maximum context, so an HF export's
  ``max_position_embeddings`` stays right), not the window.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Collection, Optional

from .config import ROTARY_EMBEDDINGS, ModelArch, given_fields

# Fields that change no weight: a job may set them differently from the checkpoint (e.g. dropout on while
# fine-tuning an HF import, which records 0). seq_length is the window, handled on its own.
HONOURED_FIELDS = ("hidden_dropout", "attention_dropout", "init_method_std")


@dataclass(frozen=True)
class JobArch:
    """``arch``: what to build, load and record in saved checkpoints (``arch.seq_length`` = the model's
    maximum context). ``seq_length``: the job's window. ``warnings``: to show the user (not errors)."""
    arch: ModelArch
    seq_length: int
    warnings: tuple = ()

    @property
    def window_arch(self) -> ModelArch:
        """The architecture with the window as its seq_length (what a job's ``cfg.model`` holds)."""
        return dataclasses.replace(self.arch, seq_length=self.seq_length)


def check_seq_length(seq_length, arch: ModelArch, what: str = "model.seq_length",
                     source: str = "the checkpoint") -> list:
    """Check a job's window against the model it runs: ValueError when it is not positive or longer than a
    learned position table; returns the warnings (longer than a rope model's trained context)."""
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length <= 0:
        raise ValueError(f"{what}={seq_length!r}: the sequence length must be a positive integer")
    if seq_length <= arch.seq_length:
        return []
    if arch.position_embedding == "learned_absolute":
        raise ValueError(f"{what}={seq_length} exceeds the {arch.seq_length} learned positions of {source} "
                         f"(position_embedding=learned_absolute has no position beyond its table); use a "
                         f"sequence length <= {arch.seq_length}")
    if arch.position_embedding in ROTARY_EMBEDDINGS:
        return [f"{what}={seq_length} is longer than the context {source} was trained for "
                f"(seq_length {arch.seq_length}); {arch.position_embedding} extrapolates past it, but quality "
                f"may drop"]
    return []


def resolve_job_arch(configured: ModelArch, given: Collection[str], source: Optional[ModelArch],
                     source_name: str = "the checkpoint") -> JobArch:
    """Architecture + window of a job (the rules are in the module docstring).

    ``configured``: the job's ``model`` section; ``given``: the names of the fields the user set in it
    (``config.given_fields``); ``source``: the architecture of the checkpoint the job's model comes from, or
    None when the job builds ``configured`` from scratch (then the window is ``configured.seq_length``)."""
    if source is None:
        check_seq_length(configured.seq_length, configured)
        return JobArch(arch=configured, seq_length=configured.seq_length)
    unknown = set(given) - {f.name for f in dataclasses.fields(ModelArch)}
    assert not unknown, f"not ModelArch fields: {unknown}"  # given comes from ModelArch's own fields
    differing = [name for name in sorted(given) if name != "seq_length" and name not in HONOURED_FIELDS
                 and _effective(configured, name) != _effective(source, name)]
    if differing:
        lines = "\n".join(f"  model.{name}={getattr(configured, name)!r}: {source_name} has "
                          f"{_shown(source, name)}" for name in differing)
        raise ValueError(
            f"the architecture comes from {source_name}, whose weights this job loads, so it cannot honour "
            f"{len(differing)} model.* value(s) given:\n{lines}\nDrop them (only model.seq_length - the "
            f"job's sequence length - and {', '.join('model.' + n for n in HONOURED_FIELDS)} may differ), or "
            f"prune / convert the checkpoint to the architecture you want")
    window = configured.seq_length if "seq_length" in given else source.seq_length
    warnings = check_seq_length(window, source, source=source_name)
    honoured = {n: getattr(configured, n) for n in HONOURED_FIELDS if n in given}
    arch = model_arch(dataclasses.replace(source, seq_length=window, **honoured), source)
    return JobArch(arch=arch, seq_length=window, warnings=tuple(warnings))


# fields whose None means a derived value: a config that spells it out (kv_channels: 128) matches a checkpoint
# that leaves it derived (Megatron-LM's args give kv_channels = hidden / heads, read back as None)
_DERIVED = {"kv_channels": "head_dim", "num_query_groups": "query_groups"}


def _effective(arch: ModelArch, name: str):
    return getattr(arch, _DERIVED.get(name, name))


def _shown(arch: ModelArch, name: str) -> str:
    value = getattr(arch, name)
    if value is None and name in _DERIVED:
        return f"None (derived: {_effective(arch, name)})"
    return repr(value)


def model_arch(window_arch: ModelArch, source: Optional[ModelArch]) -> ModelArch:
    """What a job builds and saves when its ``cfg.model`` is ``window_arch`` (seq_length = the window) and its
    weights come from a checkpoint of architecture ``source`` (None: from scratch, the window is the model's
    context): the source's maximum context, which is also a learned position table's size."""
    if source is None:
        return window_arch
    check_seq_length(window_arch.seq_length, source)
    return dataclasses.replace(window_arch, seq_length=source.seq_length)


def resolve_from_checkpoint(configured: ModelArch, path: Optional[str], role: str = "checkpoint") -> JobArch:
    """``resolve_job_arch`` with the user-given fields of ``configured`` and the architecture saved at
    ``path`` (None: build ``configured`` from scratch)."""
    if not path:
        return resolve_job_arch(configured, given_fields(configured), None)
    from . import checkpoint

    source = checkpoint.describe_checkpoint(path).arch
    return resolve_job_arch(configured, given_fields(configured), source, f"the {role} {path}")


def show_warnings(job: JobArch, prefix: str = "minitron") -> None:
    """Print the warnings once (rank 0 of a torchrun launch, which sets RANK before any process group)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for text in job.warnings:
        print(f"{prefix}: warning: {text}", file=sys.stderr, flush=True)
