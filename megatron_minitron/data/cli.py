"""`minitron preprocess`: text/jsonl or the embedded stdlib corpus -> indexed dataset + tokenizer sidecar."""
from __future__ import annotations

import argparse
import os

from .tokenizer import TOKENIZER_TYPES

EPILOG = """examples:
  minitron preprocess --input docs.jsonl --output-prefix data/docs \\
      --tokenizer-type huggingface --tokenizer-model /models/llama/tokenizer.json
  minitron preprocess --input a.txt b.txt --lines-as-documents --output-prefix data/ab \\
      --train-tokenizer --vocab-size 8000
  minitron preprocess --corpus stdlib --output-prefix data/stdlib --train-tokenizer --vocab-size 4096
      (writes data/stdlib_train.{bin,idx} and data/stdlib_valid.{bin,idx})
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess", help="tokenize text/jsonl into a megatron indexed dataset (.bin/.idx)",
        description="Tokenize documents into PREFIX.bin/PREFIX.idx (one document per sequence, EOD "
                    "appended) and name the tokenizer in PREFIX.tokenizer.yaml.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input")
    src.add_argument("--input", nargs="+", default=[], metavar="FILE",
                     help="*.jsonl/*.json (one JSON object per line) or UTF-8 text files")
    src.add_argument("--json-key", default="text", help="key of the text in jsonl records (default text)")
    src.add_argument("--lines-as-documents", action="store_true",
                     help="text files: every non-empty line is a document (default: the whole file)")
    src.add_argument("--corpus", choices=["stdlib"],
                     help="use the embedded corpus (Python standard library sources) instead of --input")
    src.add_argument("--corpus-bytes", type=int, default=None,
                     help="byte budget of the embedded corpus (default 8 MiB)")
    src.add_argument("--valid-percent", type=float, default=2.0,
                     help="embedded corpus: percent of files held out for validation (default 2)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, "
                   "PREFIX.tokenizer.yaml (with --corpus: PREFIX_train.* and PREFIX_valid.*)")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="sentencepiece",
                     help="kind of --tokenizer-model: a sentencepiece .model, or an HF tokenizer.json / directory")
    tok.add_argument("--tokenizer-model", help="sentencepiece .model, HF tokenizer.json or HF directory")
    tok.add_argument("--eod-token", help="token that ends a document (default: the tokenizer's EOS)")
    tok.add_argument("--train-tokenizer", action="store_true",
                     help="train a new sentencepiece model on the inputs (saved as PREFIX.spm.model)")
    tok.add_argument("--vocab-size", type=int, help="vocabulary size for --train-tokenizer")
    tok.add_argument("--tokenizer-model-type", choices=["bpe", "unigram"], default="bpe",
                     help="with --train-tokenizer: the sentencepiece algorithm")
    tok.add_argument("--add-bos", action="store_true", default=None,
                     help="put the sentencepiece model's BOS in front of every document (a Hugging Face "
                          "tokenizer follows its own convention: BOS when it adds one by default)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--seed", type=int, default=1234, help="seed for tokenizer training")
    p.set_defaults(handler=run)


def _tokenizer_from_args(args):
    from .tokenizer import build_tokenizer

    if args.train_tokenizer:
        if args.tokenizer_model:
            raise ValueError("give either --tokenizer-model or --train-tokenizer, not both")
        if not args.vocab_size:
            raise ValueError("--train-tokenizer needs --vocab-size N (e.g. 8000)")
        return None
    if not args.tokenizer_model:
        raise ValueError("no tokenizer: give --tokenizer-type/--tokenizer-model PATH, or "
                         "--train-tokenizer --vocab-size N to train a sentencepiece model on the inputs")
    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.eod_token, args.add_bos)


def _report(result) -> None:
    print(f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens "
          f"(tokenizer {result.tokenizer.path}, vocab {result.tokenizer.vocab_size}, "
          f"eod {result.tokenizer.eod}, {'BOS' if result.tokenizer.add_bos else 'no BOS'} before each "
          f"document; see {result.sidecar})", flush=True)


def run(args) -> int:
    from .preprocess import preprocess

    if args.workers < 1:
        raise ValueError(f"--workers={args.workers} must be >= 1")
    tokenizer = _tokenizer_from_args(args)
    train_vocab = args.vocab_size if args.train_tokenizer else None
    common = dict(json_key=args.json_key, lines_as_documents=args.lines_as_documents, workers=args.workers,
                  tokenizer_model_type=args.tokenizer_model_type, seed=args.seed, add_bos=bool(args.add_bos))
    if args.corpus is None:
        if not args.input:
            raise ValueError("no input: give --input FILE [FILE ...] or --corpus stdlib")
        result = preprocess(args.input, args.output_prefix, tokenizer, train_vocab_size=train_vocab,
                            **common)
        _report(result)
        return 0

    if args.input:
        raise ValueError("give either --input or --corpus, not both")
    from .corpus import DEFAULT_CORPUS_BYTES, build_stdlib_corpus

    corpus = build_stdlib_corpus(args.output_prefix + "_corpus", args.corpus_bytes or DEFAULT_CORPUS_BYTES,
                                 args.valid_percent)
    print(f"embedded corpus: {corpus.train_documents} train / {corpus.valid_documents} valid files, "
          f"{corpus.total_bytes} bytes -> {os.path.dirname(corpus.train)}", flush=True)
    common.update(json_key="text", lines_as_documents=False)
    train = preprocess([corpus.train], args.output_prefix + "_train", tokenizer,
                       train_vocab_size=train_vocab, **common)
    _report(train)
    prefixes = [train.prefix]
    if corpus.valid_documents:
        valid = preprocess([corpus.valid], args.output_prefix + "_valid", train.tokenizer, **common)
        _report(valid)
        prefixes.append(valid.prefix)
    else:
        print("no file fell into the held-out share: no validation set (raise --valid-percent or "
              "--corpus-bytes)", flush=True)
    hint = f"data.train_data=[{prefixes[0]}]"
    if len(prefixes) > 1:
        hint += f" data.valid_data=[{prefixes[1]}]"
    print(f"use it with: {hint}", flush=True)
    return 0
