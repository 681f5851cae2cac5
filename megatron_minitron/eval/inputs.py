"""What an evaluation reads besides the model: the tokenizer (for tasks) and the LM-loss dataset."""
from __future__ import annotations

import os
from typing import Optional

from ..data.tokenizer import guess_tokenizer_type

SPLIT_NAMES = ("train", "valid", "test")  # the parts of a dataset split, in Megatron-LM's order


def resolve_eval_tokenizer(tokenizer=None, tokenizer_type: str = "auto", data: Optional[str] = None,
                           metadata=None):
    """A Tokenizer from, in order: ``tokenizer`` (a Tokenizer, or a path: a sentencepiece .model, a
    tokenizer.json or a tokenizer directory), the sidecar of the dataset prefix ``data``, the tokenizer
    recorded in the checkpoint ``metadata`` (a CheckpointInfo, or its raw record; each with its BOS
    convention: the sidecar's / record's)."""
    from ..data import build_tokenizer, load_tokenizer_sidecar

    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from ..checkpoint.description import recorded_tokenizer

    recorded = recorded_tokenizer(metadata)
    if tokenizer:
        kind = guess_tokenizer_type(tokenizer) if tokenizer_type == "auto" else tokenizer_type
        from ..data.tokenizer import with_recorded_convention

        return with_recorded_convention(build_tokenizer(kind, tokenizer), recorded)
    if data:
        tok = load_tokenizer_sidecar(data)
        if tok is not None:
            return tok
    if isinstance(recorded, str):
        recorded = {"path": recorded}
    if isinstance(recorded, dict) and recorded.get("path"):
        from ..data.tokenizer import tokenizer_from_record

        path = recorded["path"]
        if not os.path.exists(path):
            raise FileNotFoundError(f"the checkpoint names the tokenizer {path}, which does not exist here;"
                                    f" give --tokenizer PATH")
        tok = tokenizer_from_record(recorded, "the checkpoint")  # with the recorded BOS convention
        if recorded.get("fingerprint") and recorded["fingerprint"] != tok.fingerprint:
            raise ValueError(f"the checkpoint's tokenizer {path} changed since the checkpoint was written "
                             f"(vocabulary {tok.fingerprint}, recorded {recorded['fingerprint']}); restore it "
                             f"or give --tokenizer PATH")
        return tok
    raise ValueError("multiple-choice tasks need a tokenizer: give --tokenizer PATH (a sentencepiece .model, "
                     "a tokenizer.json or a tokenizer directory), or --data PREFIX whose "
                     "PREFIX.tokenizer.yaml names one")


def _check_split_nonempty(prefix: str, share, split: str, split_name: str) -> None:
    """megatron's GPTDataset never finishes building a split without tokens: refuse it up front."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    lengths = np.array(indexed.sequence_lengths)
    del indexed
    # the document range megatron's builder gives the share (the same rounding)
    first, last = int(round(share[0] * len(lengths))), int(round(share[1] * len(lengths)))
    if int(lengths[first:last].sum()) == 0:
        raise ValueError(f"--split {split} gives the {split_name} split none of the {len(lengths)} documents "
                         f"of {prefix}; use a larger {split_name} share, or evaluate a dedicated prefix "
                         f"without --split")


def eval_dataset(prefix: str, seq_length: int, seed: int = 1234, split: Optional[str] = None,
                 split_name: str = "valid", tokenizer=None, cache_dir: Optional[str] = None):
    """One epoch of ``prefix`` cut into seq_length windows; with ``split`` (e.g. "949,50,1", as in
    training) only the documents of its ``split_name`` share, i.e. the validation documents training
    held out."""
    from ..data.datasets import build_prefix_dataset

    if split is None:
        return build_prefix_dataset(prefix, seq_length, seed, tokenizer, cache_dir)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from ..data import load_tokenizer_sidecar
    from ..data.datasets import (DatasetTokenizer, _check_prefixes, _rank_zero_without_process_group,
                                 gpt_dataset_config)

    if split_name not in SPLIT_NAMES:
        raise ValueError(f"--split-name {split_name!r}: choose one of {SPLIT_NAMES}")
    _check_prefixes([prefix])
    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError) as e:
        raise ValueError(f"--split {split!r} is not a split like 949,50,1 ({e})") from None
    which = SPLIT_NAMES.index(split_name)
    if matrix[which] is None:
        raise ValueError(f"--split {split} gives the {split_name} split no share; pick another split")
    _check_split_nonempty(prefix, matrix[which], split, split_name)
    if tokenizer is None:
        tokenizer = load_tokenizer_sidecar(prefix) or DatasetTokenizer(None, -1, {"prefix": prefix})
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "index_cache")
    config = gpt_dataset_config(seq_length, seed, tokenizer, cache_dir, blend=([prefix], None), split=split)
    # Build that split alone, one epoch: megatron never finishes building a split without documents,
    # even for zero samples, and the other shares may be empty (e.g. the test share of 949,50,1).
    config.split_matrix = [share if i == which else None for i, share in enumerate(matrix)]
    with _rank_zero_without_process_group():
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()
    return datasets[which]
