"""Files of a Hugging Face model directory: lazy safetensors reading, sharded writing, config, tokenizer.

Reading goes through ``safetensors.safe_open(...).get_slice`` so that a rank reads only the rows or
columns of its own TP shard. Every user-facing failure (missing directory, missing or corrupt shard,
.bin-only checkpoint) is a FileNotFoundError / ValueError that says what to do.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def read_hf_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist")
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory needs config.json "
                                "(download the whole repository, not only the weights)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from e


def _safetensors_error(path: str, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file ({err}); the file is corrupt or "
                      "truncated: download it again")


class SafetensorsReader:
    """Lazy access to the tensors of an HF directory (one file, or shards named by the index)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        single = os.path.join(hf_dir, SINGLE_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    self.weight_map = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index_path} is not a valid safetensors index ({e}); re-download it") from e
            missing = sorted({fn for fn in self.weight_map.values()
                              if not os.path.exists(os.path.join(hf_dir, fn))})
            if missing:
                raise FileNotFoundError(
                    f"{hf_dir}: shard file(s) {missing} named in {INDEX_FILE} are missing; download them")
        elif os.path.exists(single):
            self.weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            has_bin = any(f.endswith(".bin") for f in os.listdir(hf_dir))
            hint = (" It has PyTorch .bin weights only: re-save it with save_pretrained(..., "
                    "safe_serialization=True) first.") if has_bin else ""
            raise FileNotFoundError(f"{hf_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found.{hint}")
        self._handles = {}

    def _open(self, filename: str):
        path = os.path.join(self.dir, filename)
        try:
            return self._safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # SafetensorError and OSError variants
            raise _safetensors_error(path, e) from e

    def _handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = self._open(filename)
        return self._handles[filename]

    def names(self) -> list:
        return list(self.weight_map)

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        if name not in self.weight_map:
            raise ValueError(f"{self.dir}: tensor {name} is not in the checkpoint; check that config.json "
                             "matches the weights")
        filename = self.weight_map[name]
        handle = self._handle(filename)
        try:
            if rows is None and cols is None:
                return handle.get_tensor(name)
            part = handle.get_slice(name)
            if cols is None:
                return part[rows]
            return part[rows if rows is not None else slice(None), cols]
        except Exception as e:
            if isinstance(e, ValueError) and "not a readable safetensors" in str(e):
                raise
            raise _safetensors_error(os.path.join(self.dir, filename), e) from e

    def close(self) -> None:
        self._handles.clear()


def copy_tokenizer_files(src_dir: str, dst_dir: str, names=TOKENIZER_FILES) -> list:
    """Copy the tokenizer files present in ``src_dir``; returns their names."""
    copied = []
    os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def tokenizer_record(hf_dir: str, checkpoint_dir: str, files: list) -> Optional[dict]:
    """The checkpoint's record of the HF tokenizer in ``hf_dir`` (its files are copied into
    ``checkpoint_dir``): what it is (vocabulary fingerprint, EOD, BOS convention) and where it will be.
    None when ``files`` hold no tokenizer (a generation_config.json alone)."""
    from ..data.tokenizer import HuggingFaceTokenizer

    if not set(files) & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}:
        return None
    record = {"type": "huggingface", "path": checkpoint_dir, "files": list(files)}
    try:
        described = HuggingFaceTokenizer(hf_dir).describe()
    except Exception as e:  # noqa: BLE001  transformers raises anything on odd files; the weights still convert
        print(f"[convert] note: the tokenizer in {hf_dir} could not be read ({e}); recorded by path only",
              flush=True)
        return record
    return {**described, **record}


def write_hf_config(config: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


GENERATION_CONFIG_FILE = "generation_config.json"


def fill_token_ids(config: dict, ids: dict, override: bool = False) -> dict:
    """config.json / generation_config.json with bos/eos/pad ids: those it has are kept (an imported
    model's own, e.g. Llama-3.1-Instruct's list of EOS ids), missing ones come from the tokenizer; with
    ``override`` the tokenizer's replace them (``tokenizer_export.ids_follow_tokenizer``)."""
    out = dict(config)
    for key, value in ids.items():
        if value is not None and (override or out.get(key) is None):
            out[key] = int(value)
    return out


def write_generation_config(out_dir: str, ids: dict, override: bool = False) -> None:
    """generation_config.json with the bos/eos/pad ids (``fill_token_ids``) over an existing one (copied from
    the source model)."""
    path = os.path.join(out_dir, GENERATION_CONFIG_FILE)
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    config = fill_token_ids(config, ids, override)
    if not config:
        return
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str) -> None:
    """Give a file the mode an ordinary write would (0666 less the umask): safetensors writes 0600."""
    os.chmod(path, 0o666 & ~_umask())


def save_tensor_file(tensors: dict, path: str) -> int:
    """Write one safetensors file (contiguous copies, HF's metadata); returns the bytes of tensor data."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def finalize_shards(out_dir: str, parts: list) -> None:
    """Rename temporary part files to HF's ``model-0000i-of-0000n.safetensors`` and write the index.

    ``parts``: [(temporary file name, [tensor names], data bytes)] in model order.
    """
    total = len(parts)
    weight_map, size = {}, 0
    for i, (tmp_name, names, nbytes) in enumerate(parts):
        final = SINGLE_FILE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        make_readable(os.path.join(out_dir, tmp_name))
        os.replace(os.path.join(out_dir, tmp_name), os.path.join(out_dir, final))
        weight_map.update({n: final for n in names})
        size += nbytes
    if total > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
            f.write("\n")
