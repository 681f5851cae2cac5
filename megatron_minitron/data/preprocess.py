"""Text / jsonl -> megatron indexed dataset (PREFIX.bin + PREFIX.idx) + PREFIX.tokenizer.yaml.

One document becomes one sequence of the indexed dataset: its token ids (after the BOS id when the
tokenizer's convention adds one, ``Tokenizer.add_bos``) followed by the EOD id. That is the layout
GPTDataset expects (it concatenates sequences and cuts seq_length+1 windows across them).
Everything is written under temporary names and renamed at the end, so an interrupted run never leaves a
.bin/.idx pair that looks complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

from .tokenizer import Tokenizer, build_tokenizer, train_sentencepiece, write_tokenizer_sidecar

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class PreprocessResult:
    prefix: str
    documents: int
    tokens: int  # including the EOD ids
    tokenizer: Tokenizer
    sidecar: str


def iter_jsonl(path: str):
    """(line number, object) for each non-blank line of a jsonl file; a line that is not one JSON object is a
    ValueError naming ``path:line``."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); each "
                                 f"line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def iter_documents(inputs: Sequence[str], json_key: str = "text",
                   lines_as_documents: bool = False) -> Iterator[str]:
    """Documents of the input files, in order. ``*.jsonl``/``*.json``: one JSON object per line, text
    under ``json_key``. Anything else is UTF-8 text: the whole file is one document, or each non-empty
    line is one with ``lines_as_documents``."""
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path} not found; give existing text or jsonl files")
        if path.endswith(JSON_SUFFIXES):
            for lineno, record in iter_jsonl(path):
                if json_key not in record:
                    raise ValueError(f"{path}:{lineno} has no key {json_key!r}; pick the key that "
                                     f"holds the text with --json-key")
                yield str(record[json_key])
            continue
        try:
            with open(path, encoding="utf-8") as f:
                if lines_as_documents:
                    for line in f:
                        line = line.rstrip("\n")
                        if line.strip():
                            yield line
                else:
                    yield f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e}); convert it first (e.g. iconv)") from e


# Worker processes build their own tokenizer once (tokenizers are not always picklable).
_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(kind: str, path: str, eod_token: Optional[str], add_bos: Optional[bool]) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(kind, path, eod_token, add_bos)


def _encode_in_worker(text: str) -> List[int]:
    return _worker_tokenizer.encode_document(text)


def _encoded(documents: Iterable[str], tokenizer: Tokenizer, workers: int) -> Iterator[List[int]]:
    if workers <= 1:
        for text in documents:
            yield tokenizer.encode_document(text)  # BOS first when the tokenizer's convention adds it
        return
    import multiprocessing as mp

    with mp.get_context().Pool(workers, initializer=_init_worker,
                               initargs=(tokenizer.kind, tokenizer.path, tokenizer.eod_token,
                                         tokenizer.add_bos)) as pool:
        yield from pool.imap(_encode_in_worker, documents, chunksize=16)  # imap keeps the order


def write_indexed_dataset(output_prefix: str, token_lists: Iterable[Sequence[int]], eod: int,
                          vocab_size: int) -> tuple:
    """Write each token list + EOD as one document; returns (documents, tokens, largest token id). Empty
    ones are dropped."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    documents = tokens = max_id = 0
    try:
        for ids in token_lists:
            if len(ids) == 0:
                continue
            doc = np.asarray(list(ids) + [eod], dtype=np.int64)
            if doc.max() >= vocab_size or doc.min() < 0:
                raise ValueError(f"token id {int(doc.max())} outside the tokenizer's vocabulary of "
                                 f"{vocab_size}; the tokenizer and its vocab size disagree")
            builder.add_document(doc, [doc.size])
            documents += 1
            tokens += int(doc.size)
            max_id = max(max_id, int(doc.max()))
        builder.finalize(tmp + ".idx")
        if documents == 0:
            raise ValueError("the inputs hold no non-empty documents; check the files and --json-key")
        os.replace(tmp + ".bin", output_prefix + ".bin")
        os.replace(tmp + ".idx", output_prefix + ".idx")
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    return documents, tokens, max_id


def train_tokenizer_on(inputs: Sequence[str], output_prefix: str, vocab_size: int, json_key: str = "text",
                       lines_as_documents: bool = False, model_type: str = "bpe",
                       seed: int = 1234, add_bos: bool = False) -> Tokenizer:
    """Train a sentencepiece model on the documents of ``inputs``; saved as PREFIX.spm.model."""
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # sentencepiece reads line-oriented text: write the documents' text out once (also unpacks jsonl).
    fd, text_path = tempfile.mkstemp(prefix=".tokenizer-text-", suffix=".txt", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text in iter_documents(inputs, json_key, lines_as_documents):
                f.write(text)
                if not text.endswith("\n"):
                    f.write("\n")
        model = train_sentencepiece([text_path], output_prefix + ".spm", vocab_size, model_type, seed)
    finally:
        os.remove(text_path)
    return build_tokenizer("sentencepiece", model, add_bos=add_bos)


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer: Optional[Tokenizer] = None, *,
               json_key: str = "text", lines_as_documents: bool = False, workers: int = 1,
               train_vocab_size: Optional[int] = None, tokenizer_model_type: str = "bpe",
               seed: int = 1234, add_bos: bool = False) -> PreprocessResult:
    """Tokenize ``inputs`` into PREFIX.bin/.idx and write PREFIX.tokenizer.yaml.

    Give either ``tokenizer`` or ``train_vocab_size`` (a new sentencepiece model is trained on the inputs
    first and saved as PREFIX.spm.model; ``add_bos``: its BOS convention). Every document is
    ``tokenizer.encode_document(text) + [eod]``; the sidecar records the convention (``add_bos``).
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("no input files given")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path} not found; give existing text or jsonl files")
    if (tokenizer is None) == (train_vocab_size is None):
        raise ValueError("give a tokenizer (--tokenizer-type/--tokenizer-model) or train one "
                         "(--train-tokenizer --vocab-size N), not both or neither")
    if train_vocab_size is not None:
        tokenizer = train_tokenizer_on(inputs, output_prefix, train_vocab_size, json_key,
                                       lines_as_documents, tokenizer_model_type, seed, add_bos)
    documents = iter_documents(inputs, json_key, lines_as_documents)
    n_docs, n_tokens, max_id = write_indexed_dataset(output_prefix, _encoded(documents, tokenizer, workers),
                                                     tokenizer.eod, tokenizer.vocab_size)
    sidecar = write_tokenizer_sidecar(output_prefix, tokenizer, max_token_id=max_id)
    return PreprocessResult(output_prefix, n_docs, n_tokens, tokenizer, sidecar)
