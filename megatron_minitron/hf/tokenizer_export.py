"""The tokenizer of an exported HF model directory: always one that ``transformers.AutoTokenizer`` loads.

A Hugging Face tokenizer is copied as it is. A sentencepiece model (``preprocess --train-tokenizer``, the
demo, a user's ``tokenizer.model``) is converted into a ``tokenizer.json`` that encodes exactly as
sentencepiece does: built with the ``tokenizers`` package from the model's own settings (normaliser spec,
BPE merges ranked by piece score or the unigram scores, byte fallback, user-defined pieces kept whole),
read straight from the model file (its protobuf wire format, so neither protobuf nor a transformers
converter of a particular version is needed). ``tokenizer_config.json`` names the special tokens and the
BOS convention the data was written with (``Tokenizer.add_bos``): lm-evaluation-harness then encodes
requests the way ``minitron eval`` does.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# sentencepiece_model.proto: ModelProto.pieces = 1, .trainer_spec = 2, .normalizer_spec = 3;
# SentencePiece.piece = 1, .score = 2, .type = 3; TrainerSpec.model_type = 3, .treat_whitespace_as_suffix =
# 24, .byte_fallback = 35, .unk_piece = 45; NormalizerSpec.precompiled_charsmap = 2, .add_dummy_prefix = 3,
# .remove_extra_whitespaces = 4, .escape_whitespaces = 5.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


@dataclass
class SentencePieceModel:
    """What a sentencepiece model file says (proto2 defaults where a field is absent)."""

    pieces: List[Tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type) by id
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_piece: str = "<unk>"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(data: bytes, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of one protobuf message; value: int, or bytes for wire type 2."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_sentencepiece_model(path: str) -> SentencePieceModel:
    with open(path, "rb") as f:
        data = f.read()
    model = SentencePieceModel()
    try:
        for number, wire, value in _fields(data):
            if number == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for n, w, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = int(v)
                model.pieces.append((piece, score, kind))
            elif number == 2 and wire == 2:
                for n, w, v in _fields(value):
                    if n == 3:
                        model.model_type = int(v)
                    elif n == 24:
                        model.treat_whitespace_as_suffix = bool(v)
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n == 45 and w == 2:
                        model.unk_piece = v.decode("utf-8")
            elif number == 3 and wire == 2:
                for n, w, v in _fields(value):
                    if n == 2 and w == 2:
                        model.precompiled_charsmap = bytes(v)
                    elif n == 3:
                        model.add_dummy_prefix = bool(v)
                    elif n == 4:
                        model.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        model.escape_whitespaces = bool(v)
    except (IndexError, UnicodeDecodeError, struct.error, ValueError) as e:
        raise ValueError(f"{path} is not a readable sentencepiece model ({e})") from e
    if not model.pieces:
        raise ValueError(f"{path} holds no sentencepiece vocabulary")
    return model


def _bpe_merges(model: SentencePieceModel) -> List[Tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, ranked as sentencepiece merges: the
    pair whose result has the higher score first (ties: the lower id)."""
    normal: Dict[str, Tuple[float, int]] = {p: (s, i) for i, (p, s, t) in enumerate(model.pieces) if t == NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def sentencepiece_to_tokenizers(path: str):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the sentencepiece model at ``path``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE as BPEModel
    from tokenizers.models import Unigram

    model = read_sentencepiece_model(path)
    if model.treat_whitespace_as_suffix:
        raise ValueError(f"{path}: treat_whitespace_as_suffix sentencepiece models cannot be exported")
    if not model.escape_whitespaces:
        raise ValueError(f"{path}: sentencepiece models without escape_whitespaces cannot be exported")
    unk_ids = [i for i, (_, _, t) in enumerate(model.pieces) if t == UNKNOWN]
    if model.model_type == BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(model.pieces)}
        tok = Tokenizer(BPEModel(vocab=vocab, merges=_bpe_merges(model), unk_token=model.unk_piece,
                                 fuse_unk=True, byte_fallback=model.byte_fallback))
    elif model.model_type == UNIGRAM:
        tok = Tokenizer(Unigram([(p, float(s)) for p, s, _ in model.pieces],
                                unk_id=unk_ids[0] if unk_ids else None, byte_fallback=model.byte_fallback))
    else:
        raise ValueError(f"{path}: only BPE and unigram sentencepiece models can be exported "
                         f"(model_type {model.model_type})")
    user_defined = any(t == USER_DEFINED for _, _, t in model.pieces)
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:  # sentencepiece strips and collapses spaces only (not newlines)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if user_defined:
        # user-defined pieces split the text into stretches normalised one by one: Metaspace puts the dummy
        # prefix in front of the first stretch only, as sentencepiece puts it in front of the whole text
        # (exact unless remove_extra_whitespaces strips spaces at the very start, a combination our
        # trained models never have)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if model.add_dummy_prefix else "never", split=False)
    else:  # exactly sentencepiece's order: strip, dummy prefix, escape the spaces
        if model.add_dummy_prefix:
            steps.append(normalizers.Prepend("▁"))
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("▁", " ")]
    if model.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    # control and unknown pieces are special; user-defined ones are matched whole in the raw text, never
    # merged (sentencepiece's rule); both keep their ids, being in the model's vocabulary already
    added = [AddedToken(p, special=t in (CONTROL, UNKNOWN), normalized=False)
             for p, _, t in model.pieces if t in (CONTROL, UNKNOWN, USER_DEFINED)]
    tok.add_tokens(added)
    return tok


def _with_bos(tok, bos_piece: str, bos_id: int):
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_piece} $A", pair=f"{bos_piece} $A {bos_piece} $B:1", special_tokens=[(bos_piece, bos_id)])
    return tok


def _write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def special_token_ids(tokenizer) -> Dict[str, Optional[int]]:
    """bos/eos/pad token ids of the exported model (config.json, generation_config.json).

    The BOS id is the token sequences start with (what lm-evaluation-harness conditions an empty context
    on): the tokenizer's BOS, or the EOD when the convention adds none. No pad token: the EOS pads.
    """
    hf = getattr(tokenizer, "_hf", None)
    if hf is not None:
        eos = hf.eos_token_id if hf.eos_token_id is not None else tokenizer.eod
        pad = hf.pad_token_id if hf.pad_token_id is not None else eos
        return {"bos_token_id": int(tokenizer.prefix_id), "eos_token_id": int(eos), "pad_token_id": int(pad)}
    return {"bos_token_id": int(tokenizer.prefix_id), "eos_token_id": int(tokenizer.eod),
            "pad_token_id": int(tokenizer.eod)}


def export_sentencepiece(tokenizer, out_dir: str, model_max_length: Optional[int] = None) -> List[str]:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (+ the original tokenizer.model)
    for a SentencePieceTokenizer; returns the names written."""
    import shutil

    tok = sentencepiece_to_tokenizers(tokenizer.path)
    eod = tokenizer.eod_token
    unk_id = tokenizer.sp.unk_id()
    unk = tokenizer.id_to_piece(unk_id) if unk_id >= 0 else None
    # BOS: when the convention adds none, the EOD is the BOS token too (as GPT-2's <|endoftext|>), so
    # lm-evaluation-harness conditions empty contexts on it, as minitron eval does
    bos = tokenizer.id_to_piece(tokenizer.bos) if tokenizer.add_bos else eod
    if tokenizer.add_bos:
        _with_bos(tok, bos, int(tokenizer.bos))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".tokenizer.json.tmp-{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, os.path.join(out_dir, "tokenizer.json"))
    specials = {"bos_token": bos, "eos_token": eod, "pad_token": eod, **({"unk_token": unk} if unk else {})}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "add_bos_token": bool(tokenizer.add_bos), "add_eos_token": False,
              "clean_up_tokenization_spaces": False,
              # sentencepiece reads "<s>" in a text as characters, not as the control token
              "split_special_tokens": True}
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    _write_json(config, os.path.join(out_dir, "tokenizer_config.json"))
    _write_json(specials, os.path.join(out_dir, "special_tokens_map.json"))
    shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.model"))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]


def checkpoint_tokenizer(info, given: Optional[str] = None):
    """The tokenizer of a checkpoint (``info``: its checkpoint.CheckpointInfo): ``given`` (a path), else the
    one it records, else tokenizer files inside the checkpoint directory; None when there is none."""
    from ..data.tokenizer import (build_tokenizer, guess_tokenizer_type, tokenizer_from_record,
                                  with_recorded_convention)

    record, checkpoint_dir = info.tokenizer, info.directory
    if given:
        return with_recorded_convention(build_tokenizer(guess_tokenizer_type(given), given), record)
    if isinstance(record, dict) and record.get("path") and os.path.exists(record["path"]):
        return tokenizer_from_record(record, f"the checkpoint {checkpoint_dir}")
    for name, kind in (("tokenizer.json", "huggingface"), ("tokenizer.model", "sentencepiece")):
        if os.path.isfile(os.path.join(checkpoint_dir, name)):
            eod = record.get("eod_token") if isinstance(record, dict) else None
            add_bos = record.get("add_bos") if isinstance(record, dict) and kind == "sentencepiece" else None
            return build_tokenizer(kind, checkpoint_dir if kind == "huggingface" else
                                   os.path.join(checkpoint_dir, name), eod, add_bos)
    if isinstance(record, dict) and record.get("path"):
        raise FileNotFoundError(f"the checkpoint {checkpoint_dir} names the tokenizer {record['path']}, which "
                                f"does not exist here; give --tokenizer PATH")
    return None


def export_tokenizer(tokenizer, out_dir: str, model_max_length: Optional[int] = None) -> List[str]:
    """Write ``tokenizer`` into the HF directory ``out_dir`` so that AutoTokenizer loads it; returns the
    file names. A Hugging Face tokenizer's files are copied as they are (a lone tokenizer.json gets a
    tokenizer_config.json naming its special tokens); a sentencepiece model is converted."""
    from .io import copy_tokenizer_files

    if tokenizer.kind == "sentencepiece":
        return export_sentencepiece(tokenizer, out_dir, model_max_length)
    if os.path.isdir(tokenizer.path):
        return copy_tokenizer_files(tokenizer.path, out_dir)
    import shutil

    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.json"))
    written = ["tokenizer.json"]
    config_path = os.path.join(os.path.dirname(tokenizer.path), "tokenizer_config.json")
    if os.path.isfile(config_path):
        shutil.copyfile(config_path, os.path.join(out_dir, "tokenizer_config.json"))
    else:
        eod = tokenizer.eod_token
        bos = tokenizer.id_to_piece(tokenizer.bos) if tokenizer.add_bos else eod
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eod,
                  "pad_token": eod, "clean_up_tokenization_spaces": False}
        if model_max_length:
            config["model_max_length"] = int(model_max_length)
        _write_json(config, os.path.join(out_dir, "tokenizer_config.json"))
    return written + ["tokenizer_config.json"]


def ids_follow_tokenizer(tokenizer) -> bool:
    """Whether the exported config's bos/eos/pad ids must be the tokenizer's even where the source config has
    its own: a sentencepiece model is converted here, and the special tokens written for it (BOS: the EOD when
    the data's convention adds none) are what the model was trained with; an HF tokenizer's files are copied
    as they came with the model's own config."""
    return tokenizer is not None and tokenizer.kind == "sentencepiece"
