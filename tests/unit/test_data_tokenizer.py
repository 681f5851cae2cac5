"""Tokenizer backends: sentencepiece (trained here on stdlib text) and Hugging Face tokenizer.json."""
import json
import os

import pytest

from megatron_minitron.data import (build_stdlib_corpus, build_tokenizer, load_tokenizer_sidecar,
                                    train_sentencepiece, write_tokenizer_sidecar)

SAMPLES = ["def f(x):\n\treturn x ** 2  # square\n", "  leading and trailing spaces  ",
           "unicode: héllo wörld, 世界, emoji 🙂", "numbers 1234567890 and\n\nblank lines\n", ""]


@pytest.fixture(scope="module")
def stdlib_text(tmp_path_factory):
    """~60 KB of stdlib source as one plain text file (sentencepiece trains on lines)."""
    out = tmp_path_factory.mktemp("corpus")
    corpus = build_stdlib_corpus(str(out), max_bytes=60_000, valid_percent=0)
    text_path = out / "train.txt"
    with open(corpus.train) as f, open(text_path, "w") as g:
        for line in f:
            g.write(json.loads(line)["text"])
    return str(text_path)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trained_round_trip(stdlib_text, tmp_path, model_type):
    model = train_sentencepiece([stdlib_text], str(tmp_path / "spm"), 400, model_type=model_type)
    assert os.path.isfile(model) and not [p for p in os.listdir(tmp_path) if p.startswith(".spm")]
    tok = build_tokenizer("sentencepiece", model)
    assert tok.vocab_size == 400
    assert tok.eod_token == "</s>"
    for text in SAMPLES + [open(stdlib_text).read()[:5000]]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids
        assert tok.decode(ids) == text
    # It learned something: the training text compresses below one token per byte.
    sample = open(stdlib_text).read()[:5000]
    assert len(tok.encode(sample)) < 0.8 * len(sample.encode())


def test_sentencepiece_training_is_deterministic(stdlib_text, tmp_path):
    a = build_tokenizer("sentencepiece", train_sentencepiece([stdlib_text], str(tmp_path / "a"), 400))
    b = build_tokenizer("sentencepiece", train_sentencepiece([stdlib_text], str(tmp_path / "b"), 400))
    assert [a.id_to_piece(i) for i in range(a.vocab_size)] == [b.id_to_piece(i) for i in range(b.vocab_size)]


def _train_hf_tokenizer_json(text_file, out_path, vocab_size=300):
    pytest.importorskip("tokenizers")  # installed with transformers (the [test] extra)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([text_file], trainer)
    tok.save(str(out_path))
    return tok


def test_huggingface_tokenizer_json_round_trip(stdlib_text, tmp_path):
    path = tmp_path / "tokenizer.json"
    reference = _train_hf_tokenizer_json(stdlib_text, path)
    tok = build_tokenizer("huggingface", str(path))
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert tok.eod == reference.token_to_id("<|endoftext|>")  # found by name: no config beside it
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


@pytest.mark.parametrize("with_transformers", [True, False])
def test_huggingface_directory_uses_configured_eos(stdlib_text, tmp_path, monkeypatch, with_transformers):
    import sys

    if not with_transformers:  # the directory is then read through `tokenizers` alone
        monkeypatch.setitem(sys.modules, "transformers", None)
    reference = _train_hf_tokenizer_json(stdlib_text, tmp_path / "tokenizer.json")
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    tok = build_tokenizer("huggingface", str(tmp_path))
    assert (tok._hf is not None) == with_transformers
    assert tok.eod_token == "<pad>"  # the configured EOS wins over the name heuristics
    assert tok.eod == reference.token_to_id("<pad>")
    for text in SAMPLES:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    explicit = build_tokenizer("huggingface", str(tmp_path / "tokenizer.json"), eod_token="<|endoftext|>")
    assert explicit.eod_token == "<|endoftext|>"


def test_sidecar_round_trip_and_mismatch(stdlib_text, tmp_path):
    model = train_sentencepiece([stdlib_text], str(tmp_path / "data.spm"), 400)
    tok = build_tokenizer("sentencepiece", model)
    write_tokenizer_sidecar(str(tmp_path / "data"), tok)
    # The model sits beside the dataset, so the sidecar names it relatively: moving the directory works.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    os.rename(tmp_path, moved)
    loaded = load_tokenizer_sidecar(str(moved / "data"))
    assert (loaded.vocab_size, loaded.eod) == (tok.vocab_size, tok.eod)
    assert loaded.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])
    assert load_tokenizer_sidecar(str(moved / "nothing")) is None
    side = moved / "data.tokenizer.yaml"
    side.write_text(side.read_text().replace("vocab_size: 400", "vocab_size: 999"))
    with pytest.raises(ValueError, match="changed after preprocessing"):
        load_tokenizer_sidecar(str(moved / "data"))


def test_tokenizer_errors(tmp_path, stdlib_text):
    with pytest.raises(FileNotFoundError, match="--train-tokenizer"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("huggingface", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="choose one of"):
        build_tokenizer("tiktoken", "x")
    with pytest.raises(FileNotFoundError):
        train_sentencepiece([str(tmp_path / "none.txt")], str(tmp_path / "m"), 400)
    with pytest.raises(ValueError, match="at least 300"):
        train_sentencepiece([stdlib_text], str(tmp_path / "m"), 100)


def test_fingerprint_follows_the_vocabulary_not_the_path(stdlib_text, tmp_path):
    import shutil

    from megatron_minitron.data.tokenizer import same_tokenizer, vocabulary_fingerprint

    model = train_sentencepiece([stdlib_text], str(tmp_path / "a" / "spm"), 400)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    copy = shutil.copy(model, copy_dir / "tokenizer.model")
    other = train_sentencepiece([stdlib_text], str(tmp_path / "b" / "spm"), 420)
    a, b, c = (build_tokenizer("sentencepiece", p) for p in (model, str(copy), other))
    # the reference: the fingerprint of the piece list read through sentencepiece's own API
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    assert a.fingerprint == vocabulary_fingerprint([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.describe()["path"] != b.describe()["path"]
    # records: with fingerprints, without (older checkpoints: read from the files), and files gone
    assert same_tokenizer(a.describe(), b.describe()) is True
    assert same_tokenizer({"type": "sentencepiece", "path": model}, {"path": str(copy)}) is True
    assert same_tokenizer(a.describe(), {"type": "sentencepiece", "path": other}) is False
    assert same_tokenizer(a.describe(), {"path": str(tmp_path / "gone.model")}) is None
    assert same_tokenizer({**a.describe(), "fingerprint": None, "path": "gone"},
                          {**a.describe(), "vocab_size": a.vocab_size + 1}) is False
    assert same_tokenizer(a.describe(), {**a.describe(), "eod": a.eod + 1}) is True  # another separator, same one
    # one changed piece is another vocabulary
    pieces = a.pieces()
    assert vocabulary_fingerprint(pieces[:-1] + ["x" + pieces[-1]]) != a.fingerprint
    # a Hugging Face tokenizer.json: copies agree, and it is not the sentencepiece vocabulary
    _train_hf_tokenizer_json(stdlib_text, tmp_path / "tokenizer.json")
    shutil.copy(tmp_path / "tokenizer.json", copy_dir / "tokenizer.json")
    h1 = build_tokenizer("huggingface", str(tmp_path / "tokenizer.json"))
    h2 = build_tokenizer("huggingface", str(copy_dir / "tokenizer.json"))
    assert h1.fingerprint == h2.fingerprint != a.fingerprint


def test_configured_tokenizer_record_takes_the_data_convention(stdlib_text, tmp_path):
    """A job naming its tokenizer by path records what it is and the BOS convention its data was
    written with (eval of the saved checkpoint then encodes the same way)."""
    from megatron_minitron.data.tokenizer import configured_tokenizer_record, tokenizer_from_record

    model = train_sentencepiece([stdlib_text], str(tmp_path / "spm"), 400)
    with_bos = build_tokenizer("sentencepiece", model, add_bos=True)
    write_tokenizer_sidecar(str(tmp_path / "data"), with_bos)
    record = configured_tokenizer_record("sentencepiece", model, [str(tmp_path / "data")])
    assert (record["add_bos"], record["bos"], record["fingerprint"]) == (True, 1, with_bos.fingerprint)
    assert tokenizer_from_record(record).encode_document("x y") == with_bos.encode_document("x y")
    assert configured_tokenizer_record("sentencepiece", model)["add_bos"] is False  # no data: the default
    assert configured_tokenizer_record("sentencepiece", str(tmp_path / "gone.model")) == \
        {"type": "sentencepiece", "path": str(tmp_path / "gone.model")}
