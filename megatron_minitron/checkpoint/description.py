"""What a checkpoint is, as one typed value: ``describe_checkpoint(path) -> CheckpointInfo``.

Two on-disk formats describe a checkpoint: our ``minitron.yaml`` (metadata.py) and, for a directory written
by Megatron-LM itself, the ``args`` in its common.pt (megatron_lm.py maps them to the same record). This
module is the one place that picks the reader, so a further format plugs in here; everything else reads the
typed fields instead of the record's keys.

    info = describe_checkpoint("checkpoints/tiny")   # a root (follows its pointer) or a checkpoint directory
    info.arch, info.iteration, info.format, info.layout.tensor_model_parallel_size, info.params_dtype,
    info.tokenizer, info.provenance, info.contents.optimizer, info.weights_only
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelArch
from .layout import METADATA_FILE, is_committed, resolve_checkpoint_dir
from .metadata import arch_from_metadata, checkpoint_format, read_metadata_file

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _dtype_name(value) -> Optional[str]:
    """"bfloat16" for bfloat16 / "torch.bfloat16" (older saves wrote the torch repr); None when unrecorded."""
    if value is None:
        return None
    return str(value).replace("torch.", "")


def _tuple_or_none(value) -> Optional[tuple]:
    if value is None:
        return None
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


@dataclass(frozen=True)
class SavedLayout:
    """How the tensors were split when saved. Weights and fully_reshardable optimizer state load at any
    layout; per-rank state (RNG, dp_reshardable optimizer state) only at this one."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1
    world_size: int = 1
    model_chunks: int = 1
    layers_per_stage: Optional[tuple] = None  # per pipeline stage, per virtual chunk: ((16,), (16,))
    pipeline_split: Optional[tuple] = None  # the layers per stage the job was given, when it was

    @classmethod
    def from_record(cls, parallel: dict) -> "SavedLayout":
        tp = int(parallel.get("tensor_model_parallel_size", 1))
        pp = int(parallel.get("pipeline_model_parallel_size", 1))
        dp = int(parallel.get("data_parallel_size", 1))
        return cls(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp,
                   world_size=int(parallel.get("world_size", tp * pp * dp)),
                   model_chunks=int(parallel.get("model_chunks", 1) or 1),
                   layers_per_stage=_tuple_or_none(parallel.get("layers_per_stage")),
                   pipeline_split=_tuple_or_none(parallel.get("pipeline_split")))

    def as_record(self) -> dict:
        """The ``parallel`` mapping of minitron.yaml (the shape state.current_layout returns)."""
        record = dataclasses.asdict(self)
        for key in ("layers_per_stage", "pipeline_split"):
            if record[key] is not None:
                record[key] = [list(v) if isinstance(v, tuple) else v for v in record[key]]
        if record["pipeline_split"] is None:
            del record["pipeline_split"]
        return record


@dataclass(frozen=True)
class Contents:
    """Which parts of a training state the checkpoint holds, and how."""
    model: bool = True
    optimizer: bool = False
    optimizer_sharding: Optional[str] = None  # fully_reshardable, dp_reshardable, per_parameter, None
    scheduler: bool = False
    rng: bool = False
    extra_keys: tuple = ()  # the keys of the saved ``extra`` dict (e.g. consumed_samples)
    params_dtype: Optional[str] = None  # "float32", "bfloat16", "float16"; None when not recorded
    backend: str = "torch_dist"
    release: bool = False  # Megatron-LM's layout: weights in ROOT/release (no optimizer state)

    @classmethod
    def from_record(cls, contents: dict) -> "Contents":
        return cls(model=bool(contents.get("model", True)), optimizer=bool(contents.get("optimizer")),
                   optimizer_sharding=contents.get("optimizer_sharding"),
                   scheduler=bool(contents.get("scheduler")), rng=bool(contents.get("rng")),
                   extra_keys=tuple(str(k) for k in contents.get("extra_keys") or ()),
                   params_dtype=_dtype_name(contents.get("params_dtype")),
                   backend=str(contents.get("backend") or "torch_dist"), release=bool(contents.get("release")))


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint directory, described without reading a tensor (``describe_checkpoint``)."""
    directory: str  # the resolved, loadable directory (a root's ``latest`` / tracker followed)
    format: str  # "minitron" or "megatron-lm": the layout a save that keeps the input's format writes
    arch: ModelArch  # the architecture of the saved weights (seq_length = the model's maximum context)
    iteration: int
    layout: SavedLayout
    contents: Contents
    # {"path", "type", "files", "eod_token", "add_bos", ...} (data.tokenizer.tokenizer_from_record reads it);
    # a bare path is given as {"path": path}; None when the checkpoint records none
    tokenizer: Optional[dict]
    provenance: dict  # free form: pruned_from, converted_from + family + hf_config, written_by, ...
    format_version: int = 1
    created: Optional[str] = None
    megatron_core: Optional[str] = None  # the megatron-core version that wrote it, when recorded
    metadata: dict = field(default_factory=dict, repr=False, compare=False)  # the record it was read from

    @classmethod
    def from_metadata(cls, metadata: dict) -> "CheckpointInfo":
        """The description of a metadata record (minitron.yaml's shape, plus ``checkpoint_dir``)."""
        tokenizer = _tokenizer_record(metadata.get("tokenizer"))
        return cls(directory=str(metadata.get("checkpoint_dir", "")), format=checkpoint_format(metadata),
                   arch=arch_from_metadata(metadata), iteration=int(metadata.get("iteration") or 0),
                   layout=SavedLayout.from_record(metadata.get("parallel") or {}),
                   contents=Contents.from_record(metadata.get("contents") or {}),
                   tokenizer=tokenizer, provenance=dict(metadata.get("provenance") or {}),
                   format_version=int(metadata.get("format_version", 1)), created=metadata.get("created"),
                   megatron_core=metadata.get("megatron_core"), metadata=metadata)

    @property
    def params_dtype(self) -> Optional[str]:
        return self.contents.params_dtype

    def torch_dtype(self, default=None):
        """The weights' torch dtype as saved; ``default`` (torch.float32 when not given) when not recorded."""
        import torch

        if self.params_dtype in DTYPE_NAMES:
            return getattr(torch, self.params_dtype)
        return torch.float32 if default is None else default

    @property
    def weights_only(self) -> bool:
        """No optimizer, scheduler or RNG state (a prune output, an HF import): a run starts from it afresh."""
        return not (self.contents.optimizer or self.contents.scheduler or self.contents.rng)

    @property
    def tokenizer_path(self) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.get("path")

    @property
    def hf_family(self) -> Optional[str]:
        """The Hugging Face family its weights come from (see ``hf_lineage``), else None."""
        return self.provenance.get("family")

    @property
    def hf_config(self) -> Optional[dict]:
        """The config.json of the Hugging Face model its weights come from (see ``hf_lineage``), else None."""
        return self.provenance.get("hf_config")

    @property
    def hf_lineage(self) -> dict:
        """``{"family", "hf_config"}`` of the Hugging Face model these weights descend from: recorded by
        ``convert hf-to-mcore`` and carried on by prune, train and distill into what they save, so that
        ``mcore-to-hf`` of a pruned or distilled model writes the source's family and keeps its config's
        non-architecture fields (token ids, generation defaults); {} for weights not imported from HF."""
        return {key: self.provenance[key] for key in ("family", "hf_config")
                if self.provenance.get(key) is not None}


# ------------------------------------------------------------------------------------------ readers
def recorded_tokenizer(checkpoint) -> Optional[dict]:
    """The tokenizer record of a CheckpointInfo, or of a raw metadata record (callers that still hold one);
    None for None."""
    if checkpoint is None:
        return None
    if isinstance(checkpoint, CheckpointInfo):
        return checkpoint.tokenizer
    return _tokenizer_record(checkpoint.get("tokenizer"))


def _tokenizer_record(tokenizer) -> Optional[dict]:
    if isinstance(tokenizer, str):
        tokenizer = {"path": tokenizer}
    return tokenizer if isinstance(tokenizer, dict) and tokenizer else None


def read_directory_metadata(directory: str) -> dict:
    """The metadata record of a resolved checkpoint directory, plus ``checkpoint_dir``: its minitron.yaml
    (ours, in either layout), else what a Megatron-LM-written directory's common.pt says (same shape).
    A further on-disk format is recognised here."""
    if os.path.isfile(os.path.join(directory, METADATA_FILE)) or is_committed(directory):
        data = read_metadata_file(directory)  # ours (a COMMIT without minitron.yaml: that file was lost)
    else:
        from .megatron_lm import metadata_from_directory
        data = metadata_from_directory(directory)
    data["checkpoint_dir"] = directory
    return data


def read_metadata(path: str) -> dict:
    """The metadata record of the checkpoint ``path`` means (a ROOT follows ``latest`` or Megatron-LM's
    tracker), plus ``checkpoint_dir``. ``format`` is "megatron-lm" for a checkpoint in Megatron-LM's layout.
    Prefer ``describe_checkpoint``, its typed reading."""
    return read_directory_metadata(resolve_checkpoint_dir(path))


def describe_directory(directory: str) -> CheckpointInfo:
    """The description of a resolved checkpoint directory (no pointer followed)."""
    return CheckpointInfo.from_metadata(read_directory_metadata(directory))


def describe_checkpoint(path: str) -> CheckpointInfo:
    """The checkpoint ``path`` means (a ROOT follows ``latest`` or Megatron-LM's tracker), described from its
    minitron.yaml or Megatron-LM's args. FileNotFoundError / ValueError with the fix when it is none."""
    return describe_directory(resolve_checkpoint_dir(path))


def read_arch(path: str) -> ModelArch:
    """The ModelArch a checkpoint holds, e.g. to build a model before loading it."""
    return describe_checkpoint(path).arch
