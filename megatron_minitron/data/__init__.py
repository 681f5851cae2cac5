"""Data pipeline: tokenizers, the embedded stdlib corpus, `minitron preprocess`, GPT datasets from
megatron-style blends, and resumable DP-sharded micro-batches (see docs/data.md)."""
from .corpus import CorpusFiles, build_stdlib_corpus, iter_stdlib_sources
from .datasets import (DatasetTokenizer, build_gpt_datasets, build_prefix_dataset, check_token_ids,
                       max_token_id, parse_blend, resolve_tokenizer)
from .loader import BATCH_KEYS, calibration_batches, collate, micro_batches, rank_sample_indices
from .preprocess import PreprocessResult, iter_documents, preprocess, write_indexed_dataset
from .tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer, build_tokenizer,
                        load_tokenizer_sidecar, sidecar_path, train_sentencepiece,
                        write_tokenizer_sidecar)

__all__ = [
    "BATCH_KEYS", "CorpusFiles", "DatasetTokenizer", "HuggingFaceTokenizer", "PreprocessResult",
    "SentencePieceTokenizer", "Tokenizer", "build_gpt_datasets", "build_prefix_dataset",
    "build_stdlib_corpus", "build_tokenizer", "calibration_batches", "check_token_ids", "max_token_id", "collate", "iter_documents",
    "iter_stdlib_sources", "load_tokenizer_sidecar", "micro_batches", "parse_blend", "preprocess",
    "rank_sample_indices", "resolve_tokenizer", "sidecar_path", "train_sentencepiece",
    "write_indexed_dataset", "write_tokenizer_sidecar",
]
