"""Tokenizers behind one small interface: ``vocab_size``, ``eod``, ``encode(str)``, ``decode(ids)``.

Backends: a sentencepiece model file, a Hugging Face ``tokenizer.json`` (or a tokenizer directory), and
training a new sentencepiece model on local text (``train_sentencepiece``).

BOS convention (one per tokenizer, followed by preprocess, prune calibration, training and eval alike, and
the same as lm-evaluation-harness applies to the exported HF model): ``encode`` never adds special tokens;
``encode_document`` puts ``[bos]`` in front when ``add_bos`` is true. A Hugging Face tokenizer adds BOS
when its own post-processor does (what ``tokenizer.encode(text)`` does by default, e.g. Llama-3); a
sentencepiece model does not unless asked (``add_bos=True``). Documents end with the EOD id that
``preprocess`` appends after each one.

Identity: ``fingerprint`` hashes the vocabulary (every id and its piece), so copies of a tokenizer at other
paths, or the same vocabulary in another file format, compare equal (``same_tokenizer``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterable, List, Optional, Sequence

TOKENIZER_TYPES = ("sentencepiece", "huggingface")

# Names an end-of-document token goes by in common vocabularies, tried in order when the tokenizer's own
# config does not say which token ends a sequence.
_EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>")


class Tokenizer:
    """The interface every backend implements (the data pipeline needs nothing else)."""

    kind: str = ""
    path: str = ""
    vocab_size: int
    eod: int  # id appended after every document

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def eod_token(self) -> str:
        return self.id_to_piece(self.eod)

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    # The BOS convention (module docstring); backends set both in __init__.
    add_bos: bool = False
    bos: Optional[int] = None  # the id put in front of each document when add_bos

    def encode_document(self, text: str) -> List[int]:
        """The ids of one document as preprocess stores it (before the EOD): BOS first when add_bos."""
        ids = self.encode(text)
        return [int(self.bos)] + ids if self.add_bos and ids else ids  # an empty text stays empty (dropped)

    @property
    def prefix_id(self) -> int:
        """What an empty context is conditioned on (lm-evaluation-harness's ``prefix_token_id``: the
        tokenizer's BOS token, else its EOS). The exported HF tokenizer declares the EOD as its BOS token
        when the convention adds none (as GPT-2 does), so this is then the EOD."""
        return int(self.bos) if self.add_bos else int(self.eod)

    def pieces(self) -> List[str]:
        return [self.id_to_piece(i) for i in range(self.vocab_size)]

    @property
    def fingerprint(self) -> str:
        """"sha256:..." of the vocabulary: equal for copies of a tokenizer wherever they are, different
        for different vocabularies (computed once)."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            cached = self._fingerprint = vocabulary_fingerprint(self.pieces())
        return cached

    def describe(self) -> dict:
        """The tokenizer record written to sidecars and checkpoint metadata: where it is (``path``, to
        find it again) and what it is (``fingerprint`` and the ids each stage relies on)."""
        return {"type": self.kind, "path": os.path.abspath(self.path), "vocab_size": int(self.vocab_size),
                "eod": int(self.eod), "eod_token": self.eod_token, "add_bos": bool(self.add_bos),
                "bos": None if self.bos is None else int(self.bos), "fingerprint": self.fingerprint}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_path: str, eod_token: Optional[str] = None, add_bos: Optional[bool] = None):
        import sentencepiece as spm

        if os.path.isdir(model_path) and os.path.exists(os.path.join(model_path, "tokenizer.model")):
            model_path = os.path.join(model_path, "tokenizer.model")
        _require_file(model_path, "sentencepiece model", "--tokenizer-model PATH/tokenizer.model, or "
                      "--train-tokenizer --vocab-size N to train one on your text")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = int(self.sp.get_piece_size())
        if eod_token is not None:
            eod = self.sp.piece_to_id(eod_token)
            if eod == self.sp.unk_id() and eod_token != self.sp.id_to_piece(eod):
                raise ValueError(f"eod token {eod_token!r} is not in the vocabulary of {model_path}")
        else:
            eod = self.sp.eos_id()
            if eod < 0:
                raise ValueError(f"sentencepiece model {model_path} defines no EOS token; name the "
                                 f"end-of-document token explicitly (eod_token=...)")
        self.eod = int(eod)
        self.add_bos = bool(add_bos)  # sentencepiece's convention: no BOS unless asked
        if self.add_bos:
            if self.sp.bos_id() < 0:
                raise ValueError(f"sentencepiece model {model_path} defines no BOS token, so add_bos is "
                                 f"impossible; preprocess without --add-bos")
            self.bos = int(self.sp.bos_id())

    def encode(self, text: str) -> List[int]:
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizer.json`` through the ``tokenizers`` package, or a tokenizer directory.

    A directory goes through ``transformers.AutoTokenizer`` when transformers is installed (it also
    handles directories without a tokenizer.json); otherwise its tokenizer.json is read directly.
    """

    kind = "huggingface"

    def __init__(self, path: str, eod_token: Optional[str] = None, add_bos: Optional[bool] = None):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Hugging Face tokenizer {path} not found; give a tokenizer.json file or a directory "
                f"holding one (e.g. a model downloaded with `huggingface-cli download`)")
        self.path = path
        self._hf = None  # transformers tokenizer
        self._tok = None  # tokenizers.Tokenizer
        config_dir = path if os.path.isdir(path) else os.path.dirname(path)
        if os.path.isdir(path):
            try:
                from transformers import AutoTokenizer
            except ImportError:
                AutoTokenizer = None
            if AutoTokenizer is not None:
                self._hf = AutoTokenizer.from_pretrained(path)
            else:
                json_path = os.path.join(path, "tokenizer.json")
                _require_file(json_path, "tokenizer.json", "install transformers to read tokenizer "
                              "directories without a tokenizer.json")
                self._tok = _load_tokenizers_json(json_path)
        else:
            self._tok = _load_tokenizers_json(path)
        if self._hf is not None:
            self.vocab_size = len(self._hf)
            vocab = self._hf.get_vocab()
            configured = self._hf.eos_token
        else:
            self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
            vocab = self._tok.get_vocab(with_added_tokens=True)
            configured = _eos_from_config(config_dir)
        self.eod = self._find_eod(vocab, eod_token, configured)
        self.bos = self._added_prefix()
        self.add_bos = self.bos is not None
        if add_bos is not None and bool(add_bos) != self.add_bos:
            raise ValueError(
                f"add_bos={bool(add_bos)} but the tokenizer {path} {'adds' if self.add_bos else 'does not add'} "
                f"BOS by itself; a Hugging Face tokenizer's convention is its own (lm-evaluation-harness "
                f"follows it too): drop the setting, or change the tokenizer's post-processor")

    def _encode_with_specials(self, text: str) -> List[int]:
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=True))
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def _added_prefix(self) -> Optional[int]:
        """The id the tokenizer's post-processor puts in front of a text (its BOS), or None. Tokens it
        appends (an EOS) are not followed: documents end with the EOD that preprocess appends."""
        probe = "Hello world"
        plain, full = self.encode(probe), self._encode_with_specials(probe)
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        if start is None:  # special tokens change the text's own ids too: judge by the first id alone
            declared = self._hf.bos_token_id if self._hf is not None else None
            return int(full[0]) if full and declared is not None and full[0] == declared else None
        if start == 0:
            return None
        if start > 1:
            raise ValueError(f"the tokenizer {self.path} puts {start} special tokens in front of every text "
                             f"({full[:start]}); only a single BOS is supported")
        return int(full[0])

    @property
    def prefix_id(self) -> int:
        if self._hf is not None:  # lm-evaluation-harness: the tokenizer's bos_token_id, else its eos_token_id
            for declared in (self._hf.bos_token_id, self._hf.eos_token_id):
                if declared is not None:
                    return int(declared)
        return int(self.bos) if self.add_bos else int(self.eod)

    def _find_eod(self, vocab: dict, eod_token: Optional[str], configured: Optional[str]) -> int:
        if eod_token is not None:
            if eod_token not in vocab:
                raise ValueError(f"eod token {eod_token!r} is not in the vocabulary of {self.path}")
            return int(vocab[eod_token])
        for name in ((configured,) if configured else ()) + _EOD_CANDIDATES:
            if name in vocab:
                return int(vocab[name])
        raise ValueError(
            f"cannot tell which token of {self.path} ends a document (no eos_token in "
            f"tokenizer_config.json and none of {_EOD_CANDIDATES} in the vocabulary); name it "
            f"explicitly (eod_token=...)")

    def encode(self, text: str) -> List[int]:
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False))
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self._tok.decode(ids, skip_special_tokens=False)

    def pieces(self) -> List[str]:
        vocab = self._hf.get_vocab() if self._hf is not None else self._tok.get_vocab(with_added_tokens=True)
        by_id = {int(i): piece for piece, i in vocab.items()}
        return [by_id.get(i, "") for i in range(max(self.vocab_size, max(by_id, default=-1) + 1))]

    def id_to_piece(self, token_id: int) -> str:
        if self._hf is not None:
            return self._hf.convert_ids_to_tokens(int(token_id))
        return self._tok.id_to_token(int(token_id))


def _require_file(path: str, what: str, fix: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found; {fix}")


def _load_tokenizers_json(path: str):
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise ImportError("reading tokenizer.json needs the `tokenizers` package: "
                          "pip install tokenizers (or megatron-minitron[hf])") from e
    _require_file(path, "tokenizer.json", "give the path of a Hugging Face tokenizer.json file")
    return HFTokenizer.from_file(path)


def _eos_from_config(config_dir: str) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(config_dir, name)
        if os.path.isfile(p):
            with open(p) as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):  # AddedToken serialised as a dict
                eos = eos.get("content")
            if eos:
                return eos
    return None


def build_tokenizer(kind: str, path: str, eod_token: Optional[str] = None,
                    add_bos: Optional[bool] = None) -> Tokenizer:
    """``kind``: "sentencepiece" (a .model file) or "huggingface" (tokenizer.json or a directory).
    ``add_bos``: the BOS convention (None: the tokenizer's default; see the module docstring)."""
    if kind in ("sentencepiece", "spm", "SentencePieceTokenizer"):
        return SentencePieceTokenizer(path, eod_token, add_bos)
    if kind in ("huggingface", "hf", "HuggingFaceTokenizer"):
        return HuggingFaceTokenizer(path, eod_token, add_bos)
    raise ValueError(f"tokenizer type {kind!r}: choose one of {TOKENIZER_TYPES}")


def guess_tokenizer_type(path: str) -> str:
    """sentencepiece for a .model file or a directory holding only a tokenizer.model, else huggingface."""
    if path.endswith(".model") or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model"))
                                   and not os.path.isfile(os.path.join(path, "tokenizer.json"))):
        return "sentencepiece"
    return "huggingface"


def vocabulary_fingerprint(pieces: Sequence[str]) -> str:
    """"sha256:..." over (id, piece) for every id: the identity of a vocabulary, independent of the file
    format and location it came from."""
    h = hashlib.sha256()
    for i, piece in enumerate(pieces):
        h.update(f"{i}\t".encode())
        h.update(str(piece).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def tokenizer_from_record(record, where: str = "the record") -> Tokenizer:
    """The tokenizer a record (checkpoint metadata / sidecar entry: a dict with ``path``, or a path) names."""
    if isinstance(record, str):
        record = {"path": record}
    if not isinstance(record, dict) or not record.get("path"):
        raise ValueError(f"{where} names no tokenizer path")
    path = record["path"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where} names the tokenizer {path}, which does not exist here")
    kind = record.get("type") or guess_tokenizer_type(path)
    add_bos = record.get("add_bos") if kind == "sentencepiece" else None
    return build_tokenizer(kind, path, record.get("eod_token"), add_bos)


def with_recorded_convention(tok: Tokenizer, record) -> Tokenizer:
    """``tok`` (a tokenizer given by path) with the BOS convention a checkpoint/sidecar record keeps for
    the same vocabulary: a sentencepiece model's convention is its data's, which the file cannot say."""
    if (tok.kind == "sentencepiece" and not tok.add_bos and isinstance(record, dict) and record.get("add_bos")
            and record.get("fingerprint") == tok.fingerprint):
        return build_tokenizer(tok.kind, tok.path, record.get("eod_token"), add_bos=True)
    return tok


def record_fingerprint(record) -> Optional[str]:
    """A record's vocabulary fingerprint: the one it stores, else computed from the files it names
    (records written before fingerprints existed); None when neither is possible."""
    if isinstance(record, dict) and record.get("fingerprint"):
        return str(record["fingerprint"])
    try:
        return tokenizer_from_record(record).fingerprint
    except (ValueError, FileNotFoundError, OSError, ImportError):
        return None


def same_tokenizer(a, b) -> Optional[bool]:
    """Whether two tokenizer records name the same tokenizer, judged by what they are (vocabulary
    fingerprint and size), never by where they are. The EOD id is not part of it: it is the token a dataset
    ends documents with (``preprocess --eod-token``), a property of the data, not of the tokenizer. None when
    it cannot be told (a record without fingerprint whose files are gone)."""
    if not a or not b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in ("vocab_size",):
            if a.get(key) is not None and b.get(key) is not None and int(a[key]) != int(b[key]):
                return False
    fa, fb = record_fingerprint(a), record_fingerprint(b)
    if fa is None or fb is None:
        return None
    return fa == fb


def train_sentencepiece(text_files: Iterable[str], out_prefix: str, vocab_size: int,
                        model_type: str = "bpe", seed: int = 1234,
                        max_sentences: int = 2_000_000, character_coverage: float = 0.9995) -> str:
    """Train a sentencepiece model on line-oriented text files; returns ``out_prefix + ".model"``.

    Deterministic for the same input (one thread, fixed sampling seed). ``byte_fallback`` makes every
    string encodable; the identity normaliser and kept whitespace make ``decode(encode(t)) == t``, which
    matters for code and other whitespace-sensitive text. Ids: 0 <unk>, 1 <s>, 2 </s> (the EOD), no pad.
    Written under temporary names first, so a crash never leaves a half-written model behind.
    """
    import sentencepiece as spm

    files = [str(f) for f in text_files]
    if not files:
        raise ValueError("train_sentencepiece needs at least one text file")
    for f in files:
        _require_file(f, "tokenizer training text", "check the input paths")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}: choose bpe or unigram")
    # 3 special ids + 256 byte pieces must fit, with room left for learned pieces.
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-fallback sentencepiece model; "
                         f"use at least 300")
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".spm-train-", dir=out_dir)
    tmp_prefix = os.path.join(tmp_dir, "model")
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(files), model_prefix=tmp_prefix, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n", "\t"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, input_sentence_size=max_sentences, shuffle_input_sentence=True,
            minloglevel=2)
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, out_prefix + ext)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {e}. Usual causes: vocab_size below the "
                         f"number of distinct characters + 259 byte/special pieces (raise it, or lower "
                         f"character_coverage), or above what the text supports (give more text)") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_prefix + ".model"


# ---------------------------------------------------------------------------------------------------
# Sidecar: PREFIX.tokenizer.yaml names the tokenizer a dataset was built with, so that training, pruning
# and evaluation jobs find it from the data prefix alone.

def sidecar_path(prefix: str) -> str:
    return prefix + ".tokenizer.yaml"


def write_tokenizer_sidecar(prefix: str, tokenizer: Tokenizer, max_token_id: Optional[int] = None) -> str:
    """Write PREFIX.tokenizer.yaml atomically. A tokenizer stored in the same directory as the dataset is
    named by a relative path, so the directory can be moved as a whole. ``max_token_id``: the largest id in
    the dataset, so that jobs check it against the model's vocabulary without reading the data."""
    import yaml

    out = sidecar_path(prefix)
    out_dir = os.path.dirname(os.path.abspath(out))
    model = os.path.abspath(tokenizer.path)
    if os.path.commonpath([out_dir, model]) == out_dir:
        model = os.path.relpath(model, out_dir)
    info = {**tokenizer.describe(), "path": model}
    if max_token_id is not None:
        info["max_token_id"] = int(max_token_id)
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(info, f, sort_keys=False, allow_unicode=True)
    os.replace(tmp, out)
    return out


def load_tokenizer_sidecar(prefix: str) -> Optional[Tokenizer]:
    """The tokenizer named by PREFIX.tokenizer.yaml, or None when there is no sidecar."""
    import yaml

    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        info = yaml.safe_load(f) or {}
    for key in ("type", "path"):
        if key not in info:
            raise ValueError(f"{path} has no `{key}` entry; rerun `minitron preprocess` to rewrite it")
    model = info["path"]
    if not os.path.isabs(model):
        model = os.path.join(os.path.dirname(os.path.abspath(path)), model)
    # add_bos: the convention the data was written with (sidecars before it existed: no BOS)
    add_bos = bool(info.get("add_bos", False)) if info["type"] == "sentencepiece" else None
    try:
        tok = build_tokenizer(info["type"], model, info.get("eod_token"), add_bos)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if "add_bos" not in info and tok.add_bos:
        import warnings

        warnings.warn(f"{path} was written before BOS conventions were recorded: the documents of {prefix} "
                      f"have no BOS, but the tokenizer adds one (as lm-evaluation-harness will); run "
                      f"`minitron preprocess` again so that training and eval data agree", stacklevel=2)
    if "add_bos" in info and bool(info["add_bos"]) != tok.add_bos:
        raise ValueError(f"{path} records add_bos={info['add_bos']} but the tokenizer at {model} "
                         f"{'adds' if tok.add_bos else 'does not add'} BOS: the tokenizer changed after "
                         f"preprocessing; restore it or preprocess the data again")
    if info.get("fingerprint") and info["fingerprint"] != tok.fingerprint:
        raise ValueError(f"{path} records the vocabulary {info['fingerprint']} but the tokenizer at {model} "
                         f"has {tok.fingerprint}: the tokenizer changed after preprocessing; restore it or "
                         f"preprocess the data again")
    for key in ("vocab_size", "eod"):
        if key in info and int(info[key]) != int(getattr(tok, key)):
            raise ValueError(f"{path} records {key}={info[key]} but the tokenizer at {model} has "
                             f"{key}={getattr(tok, key)}: the tokenizer changed after preprocessing; "
                             f"restore it or preprocess the data again")
    return tok


def configured_tokenizer_record(kind: str, path: str, data_prefixes: Sequence[str] = ()) -> dict:
    return dict(_configured_tokenizer_record(kind, path, tuple(data_prefixes)))


@functools.lru_cache(maxsize=8)  # called at every checkpoint save; reading a large vocabulary takes a while
def _configured_tokenizer_record(kind: str, path: str, data_prefixes: tuple) -> dict:
    """The checkpoint record of a tokenizer a job names by path (``data.tokenizer_path``): what it is
    (fingerprint) and the BOS convention of the data it trains on (a sentencepiece model's convention is
    the data's, which the first prefix's sidecar records). Just type and path when it cannot be read."""
    record = {"type": kind, "path": path}
    try:
        sidecar = load_tokenizer_sidecar(data_prefixes[0]) if data_prefixes else None
        add_bos = sidecar.add_bos if sidecar is not None and kind == "sentencepiece" else None
        tok = build_tokenizer(kind, path, add_bos=add_bos)
        if sidecar is not None and sidecar.fingerprint != tok.fingerprint:
            tok = build_tokenizer(kind, path)  # another vocabulary than the data's: its own default
    except (ValueError, FileNotFoundError, OSError, ImportError):
        return record
    return {**tok.describe(), "path": path}
