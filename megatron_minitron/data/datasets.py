"""Train / valid GPT datasets from a megatron-style blend, via megatron-core's dataset builder.

A sample is a window of seq_length+1 tokens of the (shuffled-document) concatenated token stream;
``tokens`` are its first seq_length, ``labels`` its last seq_length. Under torch.distributed every rank
builds the datasets: rank 0 first (it writes the index caches), then, after a barrier, the others (which
read them). ``data.cache_dir`` must therefore be on a file system all ranks see.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .tokenizer import Tokenizer, build_tokenizer, load_tokenizer_sidecar, sidecar_path


class DatasetTokenizer:
    """What megatron's GPTDataset reads from its tokenizer: vocab_size (token dtype), eod, pad and
    ``unique_identifiers`` (hashed into the cache names).

    ``pad`` is -1, an id that never occurs in our data: GPTDataset masks the loss wherever a label equals
    the pad id, so a real token id there (HF tokenizers often use pad == eos) would silently drop those
    positions from the loss.
    """

    pad = -1

    def __init__(self, vocab_size: Optional[int], eod: int, description: Optional[dict] = None):
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = dict(description or {}, vocab_size=vocab_size, eod=eod)

    @classmethod
    def wrap(cls, tokenizer) -> "DatasetTokenizer":
        if isinstance(tokenizer, cls):
            return tokenizer
        describe = getattr(tokenizer, "describe", None)
        # the cache key names what the tokenizer is, not where it is (a moved copy reuses the caches)
        description = {k: v for k, v in describe().items() if k != "path"} if describe else None
        return cls(int(tokenizer.vocab_size), int(tokenizer.eod), description)


def parse_blend(entries: Optional[Sequence]) -> Optional[Tuple[List[str], Optional[List[float]]]]:
    """[p1, p2] -> ([p1, p2], None); [w1, p1, w2, p2] -> ([p1, p2], [w1, w2]) (Megatron-LM's format).

    A single string with spaces ("0.3 a 0.7 b", as on Megatron-LM's command line) is split first.
    """
    if entries is None:
        return None
    if isinstance(entries, str):
        entries = entries.split()
    entries = list(entries)
    if not entries:
        return None
    if len(entries) == 1 and isinstance(entries[0], str) and " " in entries[0].strip():
        entries = entries[0].split()

    def is_number(x) -> bool:
        if isinstance(x, bool):
            return False
        if isinstance(x, (int, float)):
            return True
        try:
            float(x)
            return not os.path.exists(str(x) + ".bin")
        except (TypeError, ValueError):
            return False

    if not is_number(entries[0]):
        bad = [e for e in entries if is_number(e)]
        if bad:
            raise ValueError(f"blend {entries}: mixes weights and prefixes; give only prefixes or "
                             f"alternating weight, prefix pairs")
        return [str(e) for e in entries], None
    if len(entries) % 2:
        raise ValueError(f"blend {entries}: weighted blends alternate weight, prefix; got an odd count")
    weights = [float(w) for w in entries[0::2]]
    prefixes = [str(p) for p in entries[1::2]]
    if any(is_number(p) for p in prefixes) or any(w <= 0 for w in weights):
        raise ValueError(f"blend {entries}: expected positive weight, prefix pairs")
    return prefixes, weights


def _check_prefixes(prefixes: Sequence[str]) -> None:
    for p in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(p + ext):
                raise FileNotFoundError(f"dataset {p}{ext} not found; build it with "
                                        f"`minitron preprocess --input FILES --output-prefix {p} ...`")


# Datasets without a recorded largest id (older sidecars, write_indexed_dataset alone) are scanned up to
# this size; past it the check is skipped rather than reading terabytes before a run.
_SCAN_LIMIT_BYTES = 4 << 30


def max_token_id(prefix: str) -> Optional[int]:
    """The largest token id in dataset PREFIX: recorded in its sidecar by `minitron preprocess`, else read
    from a small enough .bin; None when unknown."""
    import yaml

    side = sidecar_path(prefix)
    if os.path.isfile(side):
        with open(side) as f:
            info = yaml.safe_load(f) or {}
        if isinstance(info, dict) and info.get("max_token_id") is not None:
            return int(info["max_token_id"])
    if not os.path.isfile(prefix + ".bin") or os.path.getsize(prefix + ".bin") > _SCAN_LIMIT_BYTES:
        return None
    from megatron.core.datasets.indexed_dataset import _IndexReader

    dtype = _IndexReader(prefix + ".idx", False).dtype
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    return int(tokens.max()) if tokens.size else None


def check_token_ids(entries, vocab_size: int, what: str = "data") -> None:
    """ValueError before any work when a dataset (a prefix list or a Megatron-LM blend) holds token ids the
    model's vocabulary does not cover (it would fail mid-run with an index error, or silently wrap)."""
    blend = parse_blend(entries)
    for prefix in (blend[0] if blend else []):
        largest = max_token_id(prefix)
        if largest is not None and largest >= vocab_size:
            raise ValueError(f"{what}: {prefix} holds token id {largest}, but the model's vocabulary has "
                             f"{vocab_size} entries (model.vocab_size): the data was tokenized with another, "
                             f"larger tokenizer. Preprocess the data with the model's tokenizer, or set "
                             f"model.vocab_size >= {largest + 1} for a model trained from scratch")


def resolve_tokenizer(data_cfg, prefixes: Sequence[str] = ()) -> Tokenizer:
    """data.tokenizer_path when set, else the sidecar of the first prefix that has one."""
    if data_cfg.tokenizer_path:
        return build_tokenizer(data_cfg.tokenizer_type, data_cfg.tokenizer_path)
    for p in prefixes:
        tok = load_tokenizer_sidecar(p)
        if tok is not None:
            return tok
    where = sidecar_path(prefixes[0]) if prefixes else "PREFIX.tokenizer.yaml"
    raise FileNotFoundError(f"no tokenizer: set data.tokenizer_path (and data.tokenizer_type), or keep "
                            f"the sidecar {where} that `minitron preprocess` writes")


def _split_ranges(num_docs: int, split_matrix) -> list:
    # The same rounding as megatron's builder, to tell which split gets which documents.
    return [None if s is None else (int(round(s[0] * num_docs)), int(round(s[1] * num_docs)))
            for s in split_matrix]


def _check_splits_nonempty(prefixes, split_matrix, sizes, names=("train", "valid", "test")) -> None:
    """GPTDataset loops forever when asked for samples from a split with no tokens: fail clearly."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for p in prefixes:
        indexed = IndexedDataset(p)
        lengths = np.array(indexed.sequence_lengths)  # a copy: the mmap closes with `indexed`
        del indexed
        for i, rng in enumerate(_split_ranges(len(lengths), split_matrix)):
            if rng is None or sizes[i] is None or sizes[i] == 0:  # None: one epoch of whatever is there
                continue
            if int(np.sum(lengths[rng[0]:rng[1]])) == 0:
                raise ValueError(
                    f"dataset {p} has {len(lengths)} documents; its {names[i]} share of the split gives "
                    f"it none. Use more documents, a larger {names[i]} share in data.split, or separate "
                    f"data.valid_data" + (", or train.eval_iters=0 to train without validation" if i == 1 else ""))


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() without checking that a
    process group exists; in a plain single process that is rank 0, so say so for the duration."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def default_cache_dir(data_cfg, prefixes: Sequence[str]) -> str:
    if data_cfg.cache_dir:
        return data_cfg.cache_dir
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")


def gpt_dataset_config(seq_length: int, seed: int, tokenizer, cache_dir: str, blend=None,
                       blend_per_split=None, split: Optional[str] = None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, blend_per_split=blend_per_split,
        split=split, path_to_cache=cache_dir, tokenizer=DatasetTokenizer.wrap(tokenizer),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)


def build_gpt_datasets(data_cfg, seq_length: int, train_samples: int, valid_samples: int,
                       tokenizer=None) -> tuple:
    """(train_ds, valid_ds) from ``data_cfg.train_data`` (and ``valid_data``, else ``data_cfg.split``).

    Each dataset yields dicts of tokens/labels/loss_mask/position_ids tensors of length ``seq_length``
    and holds at least the requested number of samples (more epochs of the data when needed). valid_ds
    is None when no validation data is configured (split share 0, no valid_data) or valid_samples is 0.
    Call it on every rank together when torch.distributed is initialised.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.gpt_dataset import GPTDataset

    train_blend = parse_blend(data_cfg.train_data)
    if train_blend is None:
        raise ValueError("data.train_data is empty; give dataset prefixes (built by `minitron "
                         "preprocess`), e.g. data.train_data=[/data/corpus_train]")
    valid_blend = parse_blend(data_cfg.valid_data)
    all_prefixes = train_blend[0] + (valid_blend[0] if valid_blend else [])
    _check_prefixes(all_prefixes)
    if train_samples < 0 or valid_samples < 0:
        raise ValueError(f"sample counts must be >= 0, got train={train_samples} valid={valid_samples}")
    if tokenizer is None:
        tokenizer = resolve_tokenizer(data_cfg, all_prefixes)
    cache_dir = default_cache_dir(data_cfg, all_prefixes)
    sizes = [train_samples, valid_samples, 0]
    if valid_blend is None:
        split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(data_cfg.split))
        _check_splits_nonempty(train_blend[0], split_matrix, sizes)
        config = gpt_dataset_config(seq_length, data_cfg.seed, tokenizer, cache_dir,
                                    blend=train_blend, split=data_cfg.split)
        if valid_samples == 0:
            # megatron builds every split with a share, whatever it is asked for, and an empty one never ends
            # building: no validation wanted, no valid split; the train share keeps its documents
            config.split_matrix[1] = None
    else:
        full = [(0.0, 1.0), None, None]
        _check_splits_nonempty(train_blend[0], full, sizes)
        _check_splits_nonempty(valid_blend[0], [None, (0.0, 1.0), None], sizes)
        config = gpt_dataset_config(seq_length, data_cfg.seed, tokenizer, cache_dir,
                                    blend_per_split=[train_blend, valid_blend if valid_samples else None, None])
    with _rank_zero_without_process_group():
        train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, sizes, lambda: True, config).build()
    if valid_samples == 0:
        valid_ds = None
    return train_ds, valid_ds


def build_prefix_dataset(prefix: str, seq_length: int, seed: int, tokenizer=None,
                         cache_dir: Optional[str] = None):
    """One epoch of one prefix, all of its documents, as a GPTDataset (used for calibration sets)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    _check_prefixes([prefix])
    if tokenizer is None:
        tokenizer = load_tokenizer_sidecar(prefix)
    if tokenizer is None:
        # Only the token dtype (from the .idx itself) and the EOD id (unused with our mask settings) are
        # needed to cut windows, so a dataset without a sidecar is still usable here.
        tokenizer = DatasetTokenizer(None, -1, {"prefix": os.path.abspath(prefix)})
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "index_cache")
    config = gpt_dataset_config(seq_length, seed, tokenizer, cache_dir,
                                blend_per_split=[([prefix], None), None, None])
    with _rank_zero_without_process_group():
        train_ds, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [None, 0, 0], lambda: True,
                                                       config).build()
    return train_ds
