"""Megatron-LM's legacy ``torch`` checkpoints (``--ckpt-format torch``, and what its tools/checkpoint/convert.py
writes: "only 'torch' supported for conversion"), read as weights at any TP x PP.

    ROOT/latest_checkpointed_iteration.txt
    ROOT/iter_0000007/mp_rank_00/model_optim_rng.pt        PP = 1: one file per TP rank
                      mp_rank_00_000/model_optim_rng.pt    PP > 1: TP rank, PP rank (an expert rank after them
                                                           means MoE: refused, from the args at PP1)
      each file: torch.save of {"args", "checkpoint_version", "iteration", "model" ("model0", "model1", ...
      with a virtual pipeline), "optimizer", "opt_param_scheduler", "rng_state", ...}; "model" is that rank's
      GPTModel.state_dict(): its TP shards, layers numbered from 0 on every stage / chunk.

Unlike torch_dist, nothing in the files says where a shard sits in the global tensor, so the TP layout of each
tensor kind comes from model/params.py (the same table the HF mapping and the trimming read) and the global
layer index from counting the layers of the stages before. A rank reads the files memory-mapped and
touches only the saved shards of its own parameters: at the saved TP its own, at another TP every TP shard of
each (to cut its new one from).
Optimizer state, scheduler and RNG are not read: training resumes from such a checkpoint in Megatron-LM, or
after converting it there (``--ckpt-convert-format torch_dist --ckpt-convert-save DIR``); loading its weights
(prune, distill, eval, convert, ``train.load``) needs neither.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..config import ModelArch
from ..model import params

BACKEND = "torch"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER_KEY_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MODEL_KEY_RE = re.compile(r"^model(\d*)$")


def rank_dirs(directory: str) -> dict:
    """{(tp_rank, pp_rank): path of its file} of a torch-format iteration directory ({} when it is none)."""
    found, schemes = {}, set()
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    for name in names:
        match = _RANK_DIR_RE.match(name)
        path = os.path.join(directory, name, RANK_FILE)
        if match and os.path.isfile(path):
            if match.group(3) is not None:
                raise ValueError(f"{os.path.join(directory, name)}: a Megatron-LM checkpoint with expert "
                                 f"parallelism (MoE), which megatron-minitron does not build")
            schemes.add(match.group(2) is not None)
            found[(int(match.group(1)), int(match.group(2) or 0))] = path
    if len(schemes) > 1:  # Megatron-LM never empties the directory it saves into
        raise ValueError(f"{directory} holds two saves, one without pipeline parallelism (mp_rank_TT) and one with "
                         f"it (mp_rank_TT_PPP): a later save at another PP size went into the same iteration "
                         f"directory. Move the stale set away, or save again into an empty directory")
    return found


def is_torch_format_dir(directory: str) -> bool:
    return bool(rank_dirs(directory))


def _numpy_aliases() -> list:
    """numpy's array-unpickling function under the module names numpy 1.x and 2.x pickle it with: the RNG state
    Megatron-LM saves (np.random.get_state()) names the writer's, megatron-core registers only the reader's."""
    import numpy

    core = getattr(numpy, "_core", None) or numpy.core
    reconstruct = core.multiarray._reconstruct
    return [(reconstruct, f"{name}.multiarray._reconstruct") for name in ("numpy.core", "numpy._core")]


def _load(path: str) -> dict:
    """One rank file, memory-mapped (tensor bytes are read when touched). weights_only, with the classes
    megatron-core registers as safe (argparse.Namespace, its enums), as Megatron-LM's own load does."""
    import pickle

    import megatron.core  # noqa: F401  registers megatron-core's safe globals

    try:
        with torch.serialization.safe_globals(_numpy_aliases()):
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:  # an object outside the safe list
        unsupported = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{path} holds an object torch's weights-only unpickler refuses "
                         f"({', '.join(unsupported) or str(e)[:300]}): it was written by a Megatron-LM or library "
                         f"version whose saved objects this environment does not know") from None
    except Exception as e:  # truncated, or not a zip-format torch.save
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:300]}); the file is incomplete "
                         f"or damaged") from None
    if not isinstance(state, dict) or "args" not in state:
        raise ValueError(f"{path} is not a Megatron-LM checkpoint file (no `args`)")
    return state


def _chunk_states(state: dict, path: str) -> list:
    """The model state dicts of one file, in virtual-chunk order."""
    keys = sorted((k for k in state if _MODEL_KEY_RE.match(str(k))),
                  key=lambda k: int(_MODEL_KEY_RE.match(k).group(1) or 0))
    if not keys:
        raise ValueError(f"{path} holds no model weights (no `model` entry): it was saved without them")
    return [state[k] for k in keys]


def read_common(directory: str) -> dict:
    """The first rank's file without its tensors touched: args, iteration, checkpoint_version and which other
    entries (optimizer, opt_param_scheduler, rng_state) exist."""
    files = rank_dirs(directory)
    if (0, 0) not in files:
        raise ValueError(f"{directory} has no mp_rank_00 or mp_rank_00_000/{RANK_FILE}: an incomplete "
                         f"Megatron-LM torch-format checkpoint")
    return _load(files[(0, 0)])


def layer_counts(directory: str, args) -> Optional[list]:
    """[[layers of chunk 0, chunk 1, ...] per pipeline stage], counted in TP rank 0's files (None when a file is
    missing: the load names it)."""
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    files = rank_dirs(directory)
    if any((0, p) not in files for p in range(pp)):
        return None
    counts = []
    for p in range(pp):
        chunks = _chunk_states(_load(files[(0, p)]), files[(0, p)])
        counts.append([len({m.group(1) for m in map(_LAYER_KEY_RE.match, chunk) if m}) for chunk in chunks])
    return counts


def _check_args(args) -> None:
    """What the file names alone cannot tell: at PP1 an expert rank's suffix reads like a pipeline rank
    (mp_rank_TT_EEE), so MoE is refused from the args (describe_checkpoint refuses the rest)."""
    experts = getattr(args, "num_experts", None)
    if experts or int(getattr(args, "expert_model_parallel_size", 1) or 1) > 1:
        raise ValueError(f"a Megatron-LM checkpoint of a mixture-of-experts model (num_experts={experts}, "
                         f"expert_model_parallel_size={getattr(args, 'expert_model_parallel_size', 1)}), which "
                         f"megatron-minitron does not build")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """The directory Megatron-LM's get_checkpoint_name gives a rank's file."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def check_files(directory: str, checksums: bool = True, rank: int = 0, world: int = 1) -> list:
    """Problems with the rank files (an empty list when none): every file the args' TP x PP needs exists, and
    this rank's share of them is a complete zip archive (torch.save's format: a truncated file has no central
    directory) whose members match their stored CRC-32 when ``checksums``."""
    import zipfile

    first = rank_dirs(directory).get((0, 0))
    try:
        with zipfile.ZipFile(first or os.path.join(directory, "mp_rank_00", RANK_FILE)):
            pass
    except (zipfile.BadZipFile, OSError) as e:
        return [f"{first} is not a complete torch.save file ({e}): truncated or damaged" if first else
                f"{directory} has no mp_rank_00 or mp_rank_00_000/{RANK_FILE}"]
    args = read_common(directory)["args"]  # an object it cannot unpickle is not damage: its own ValueError
    _check_args(args)
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    problems, present = [], []
    for name in (rank_dir_name(t, p, pp) for t in range(tp) for p in range(pp)):
        path = os.path.join(directory, name, RANK_FILE)
        (present if os.path.isfile(path) else problems).append(path)
    problems = [f"{path} is missing" for path in problems] if rank == 0 else []
    for path in present[rank::world]:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip() if checksums else None
            if bad is not None:
                problems.append(f"{path}: its entry {bad} does not match its CRC-32 (damaged)")
        except (zipfile.BadZipFile, OSError) as e:
            problems.append(f"{path} is not a complete torch.save file ({e}): truncated or damaged")
    return problems


class TorchFormatCheckpoint:
    """Where every saved shard is: ``shards(name)`` -> the TP shards of one tensor (global layer numbering,
    model/params.py names), in TP-rank order."""

    def __init__(self, directory: str, arch: ModelArch, tp: int, pp: int):
        files = rank_dirs(directory)
        missing = [rank_dir_name(t, p, pp) for t in range(tp) for p in range(pp) if (t, p) not in files]
        if missing:
            raise ValueError(f"{directory} lacks {missing} (args say TP{tp} PP{pp}): files were lost or the save "
                             f"did not finish; use another iteration")
        self.directory, self.arch, self.tp = directory, arch, tp
        self._index = {}  # name -> [(state dict, key)] per TP rank
        states = {key: _chunk_states(_load(path), path) for key, path in files.items() if key[0] < tp and key[1] < pp}
        chunks = len(states[(0, 0)])
        offset = 0
        for chunk in range(chunks):  # megatron's interleaved order: chunk 0 of every stage, then chunk 1, ...
            for stage in range(pp):
                count = self._add_stage([states[(t, stage)][chunk] for t in range(tp)], offset)
                offset += count
        if offset != arch.num_layers:
            raise ValueError(f"{directory} holds {offset} transformer layers, its args say num_layers="
                             f"{arch.num_layers}")

    def _add_stage(self, tp_states: list, offset: int) -> int:
        layers = set()
        for key in tp_states[0]:
            match = _LAYER_KEY_RE.match(key)
            if key.endswith("_extra_state"):
                continue
            if match:
                layers.add(int(match.group(1)))
                row = params.find(match.group(2), per_layer=True)
                name = None if row is None else params.LAYER_PREFIX.format(i=offset + int(match.group(1))) + row.name
            else:
                row = params.find(key, per_layer=False)
                name = None if row is None else row.name
            if row is None and key.startswith("language_model"):
                raise ValueError(f"{self.directory} holds a legacy (non-megatron-core) Megatron-LM model "
                                 f"(`language_model.*` modules), which megatron-minitron does not read: convert it to "
                                 f"megatron-core with Megatron-LM's tools/checkpoint/convert.py --loader legacy "
                                 f"--saver core first")
            if row is None:
                raise ValueError(f"{self.directory}: the saved tensor {key} is not one megatron-minitron's GPT has "
                                 f"(a feature its args do not declare, or a custom layer spec)")
            self._index[name] = [(state, key) for state in tp_states]
        if layers != set(range(len(layers))):
            raise ValueError(f"{self.directory}: a stage holds layers {sorted(layers)}, not 0..n-1")
        return len(layers)

    def shards(self, name: str) -> list:
        if name == "output_layer.weight" and name not in self._index and self.arch.tie_embeddings:
            name = "embedding.word_embeddings.weight"  # saved at PP1, where the output layer reuses it
        if name not in self._index:
            raise ValueError(f"{self.directory} has no {name} (the model being loaded has it): the checkpoint's "
                             f"args do not describe its weights")
        return [state[key] for state, key in self._index[name]]


# ------------------------------------------------------------------------------------------ resharding
def _kind(row: params.Tensor, arch: ModelArch) -> Optional[str]:
    axis = row.tp_axis_name
    if axis == "fc1" and arch.activation == "swiglu":
        return "glu"  # every TP rank holds [gate_r; up_r]
    return axis


def reshard(row: params.Tensor, arch: ModelArch, saved: list, tp_rank: int, tp_size: int) -> torch.Tensor:
    """One TP rank's shard at ``tp_size`` from the shards ``saved`` at another TP size (megatron-core's
    layouts: column-parallel tensors split their first axis into contiguous blocks - for linear_qkv whole
    query groups - row-parallel ones their second; SwiGLU's fc1 splits each half; the padded vocabulary keeps
    the saved rows the new TP size's padding has room for, then zero rows)."""
    kind = _kind(row, arch)
    if kind is None:
        return saved[0]
    same_rows = kind != "vocab" or sum(s.shape[0] for s in saved) == arch.padded_vocab_size(tp_size)
    if len(saved) == tp_size and same_rows:
        return saved[tp_rank]  # loaded at the saved TP: this rank's own file only
    if kind == "glu":
        halves = [torch.chunk(s, 2, dim=0) for s in saved]
        gate, up = (torch.cat([h[i] for h in halves]) for i in (0, 1))
        return torch.cat([torch.chunk(gate, tp_size)[tp_rank], torch.chunk(up, tp_size)[tp_rank]])
    full = torch.cat(saved, dim=row.tp_axis)
    if kind == "vocab":  # the saved rows the new padding has room for (the real ones, and trained padding)
        rows = arch.padded_vocab_size(tp_size)
        full = full[:rows]
        if full.shape[0] < rows:
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    return torch.chunk(full, tp_size, dim=row.tp_axis)[tp_rank]


def read_model_weights(directory: str, arch: ModelArch, saved_tp: int, saved_pp: int, model_chunks: list) -> list:
    """This rank's shards of ``model_chunks`` (any TP x PP x virtual layout) from a torch-format checkpoint:
    one {model state key: new tensor} per chunk, in the models' dtypes; the models are only the template."""
    from megatron.core import parallel_state as ps

    from ..runtime.forward import unwrap_model

    source = TorchFormatCheckpoint(directory, arch, saved_tp, saved_pp)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    out = []
    for chunk in model_chunks:
        model = unwrap_model(chunk)
        global_layers = [layer.layer_number - 1 for layer in model.decoder.layers]
        read = {}
        for key, param in model.state_dict(keep_vars=True).items():
            if key.endswith("_extra_state"):
                continue
            match = _LAYER_KEY_RE.match(key)
            row = params.find(match.group(2) if match else key, per_layer=bool(match))
            assert row is not None, f"model parameter {key} is not in model/params.py"
            name = (params.LAYER_PREFIX.format(i=global_layers[int(match.group(1))]) + row.name) if match else row.name
            shard = reshard(row, arch, source.shards(name), tp_rank, tp_size)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"{directory}: {name} gives shape {tuple(shard.shape)} for TP rank {tp_rank}/"
                                 f"{tp_size}, the model has {tuple(param.shape)}: the checkpoint's args do not "
                                 f"describe its weights")
            read[key] = shard.to(dtype=param.dtype, copy=True)
        out.append(read)
    return out


@torch.no_grad()
def load_model_weights(directory: str, arch: ModelArch, saved_tp: int, saved_pp: int, model_chunks: list) -> int:
    """Fill this rank's model chunks from a torch-format checkpoint; returns the number of tensors set."""
    from ..runtime.forward import unwrap_model

    count = 0
    for chunk, read in zip(model_chunks, read_model_weights(directory, arch, saved_tp, saved_pp, model_chunks)):
        state = unwrap_model(chunk).state_dict(keep_vars=True)
        for key, tensor in read.items():
            state[key].data.copy_(tensor)
            count += 1
    return count
