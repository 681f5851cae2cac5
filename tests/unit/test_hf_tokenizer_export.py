"""Exporting a sentencepiece tokenizer for transformers: the converted tokenizer.json encodes and decodes
as sentencepiece does on real text (the repository's docs and the stdlib corpus), AutoTokenizer loads it
with its special tokens, and `convert mcore-to-hf` writes it with bos/eos/pad ids and readable files."""
import glob
import json
import os
import stat

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from megatron_minitron.data import build_stdlib_corpus, build_tokenizer, train_sentencepiece  # noqa: E402
from megatron_minitron.hf.tokenizer_export import (export_sentencepiece, read_sentencepiece_model,  # noqa: E402
                                                   sentencepiece_to_tokenizers)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EDGE_CASES = ["", " ", "\n", "  two  spaces  ", "\ttab\n\nblank", "unicode: héllo wörld, 世界, 🙂 ﬁ ＡＢＣ",
              "numbers 1234567890", "x" * 300]


def real_texts(limit=400):
    """Lines and whole files of the repository's docs: prose, code, tables, unicode."""
    docs = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
    docs.append(open(os.path.join(REPO, "README.md"), encoding="utf-8").read())
    lines = [line for d in docs for line in d.split("\n")][:limit]
    return docs + lines + EDGE_CASES


@pytest.fixture(scope="module")
def corpus_text(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus = build_stdlib_corpus(str(out), max_bytes=120_000, valid_percent=0)
    path = out / "train.txt"
    with open(corpus.train) as f, open(path, "w") as g:
        for line in f:
            g.write(json.loads(line)["text"])
    return str(path)


@pytest.fixture(scope="module")
def models(corpus_text, tmp_path_factory):
    """Our own trained models (identity normaliser, no dummy prefix, user-defined \\n and \\t) and one with
    sentencepiece's defaults (nmt_nfkc, dummy prefix, extra whitespace removal), as Llama-2-style models."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("spm")
    made = {"ours_bpe": train_sentencepiece([corpus_text], str(out / "bpe"), 1000),
            "ours_unigram": train_sentencepiece([corpus_text], str(out / "uni"), 1000, model_type="unigram")}
    spm.SentencePieceTrainer.train(input=corpus_text, model_prefix=str(out / "dflt"), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, num_threads=1, minloglevel=2)
    made["defaults_bpe"] = str(out / "dflt.model")
    return made


def test_model_file_is_read_as_sentencepiece_reads_it(models):
    import sentencepiece as spm

    for path in models.values():
        sp = spm.SentencePieceProcessor(model_file=path)
        model = read_sentencepiece_model(path)
        assert [p for p, _, _ in model.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        assert [s for _, s, _ in model.pieces] == pytest.approx([sp.get_score(i) for i in range(len(model.pieces))])
        for i, (_, _, kind) in enumerate(model.pieces):
            assert (kind == 3) == sp.is_control(i) and (kind == 2) == sp.is_unknown(i)
            assert (kind == 6) == sp.is_byte(i) and (kind == 5) == sp.is_unused(i)
    ours, dflt = read_sentencepiece_model(models["ours_bpe"]), read_sentencepiece_model(models["defaults_bpe"])
    assert (ours.add_dummy_prefix, ours.remove_extra_whitespaces, ours.byte_fallback) == (False, False, True)
    assert (dflt.add_dummy_prefix, dflt.remove_extra_whitespaces, bool(dflt.precompiled_charsmap)) == (True, True, True)
    assert [p for p, _, t in ours.pieces if t == 4] == ["\n", "\t"]


@pytest.mark.parametrize("name", ["ours_bpe", "ours_unigram", "defaults_bpe"])
def test_converted_tokenizer_encodes_like_sentencepiece(models, corpus_text, name):
    sp = build_tokenizer("sentencepiece", models[name])
    converted = sentencepiece_to_tokenizers(models[name])
    texts = real_texts() + [open(corpus_text).read()[:20000]]
    different = []
    for text in texts:
        ids = sp.encode(text)
        if converted.encode(text, add_special_tokens=False).ids != ids:
            different.append(text)
        assert converted.decode(ids, skip_special_tokens=False) == sp.decode(ids)
    # Texts naming "<s>" / "</s>" literally are the tokenizers-level difference transformers'
    # split_special_tokens removes (next test). Unigram's Viterbi may break an exact tie of total score its
    # own way (runs of spaces split 16+12 or 12+16): allowed when the two segmentations score the same.
    scores = [score for _, score, _ in read_sentencepiece_model(models[name]).pieces]
    for text in different:
        if any(s in text for s in ("<s>", "</s>", "<unk>")):
            continue
        assert name == "ours_unigram", text[:80]
        ours, theirs = sp.encode(text), converted.encode(text, add_special_tokens=False).ids
        assert sp.decode(theirs) == sp.decode(ours)
        # "the same" as float32 running sums see it (both libraries add float32 scores): at a total of ~5e4 one
        # float32 ulp is 0.004, so a tie can read as a few ulps apart (seen with Python 3.12 + torch 2.11)
        assert sum(scores[i] for i in theirs) == pytest.approx(sum(scores[i] for i in ours), rel=1e-6), text[:80]


@pytest.mark.parametrize("add_bos", [False, True])
def test_exported_tokenizer_loads_in_transformers_and_encodes_like_ours(models, tmp_path, add_bos):
    sp = build_tokenizer("sentencepiece", models["ours_bpe"], add_bos=add_bos)
    files = export_sentencepiece(sp, str(tmp_path), model_max_length=1 << 20)
    assert set(files) <= set(os.listdir(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (sp.eod, sp.eod, 0)
    # BOS: sentencepiece's <s> when the convention adds it, else the EOD (GPT-2 style), never added
    assert hf.bos_token_id == (sp.bos if add_bos else sp.eod) == sp.prefix_id
    for text in real_texts() + ["literal </s> and <s> and <unk> in text"]:
        if text:  # (an empty document is dropped by preprocess, where HF would still give [bos])
            assert hf.encode(text) == sp.encode_document(text), text[:80]  # default specials = our convention
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text)
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    # read back through our HF backend: the same vocabulary and the same convention
    back = build_tokenizer("huggingface", str(tmp_path))
    assert back.fingerprint == sp.fingerprint
    assert (back.add_bos, back.bos, back.eod, back.prefix_id) == (sp.add_bos, sp.bos, sp.eod, sp.prefix_id)


def test_mcore_to_hf_exports_a_sentencepiece_tokenizer(models, tmp_path):
    """A checkpoint whose tokenizer record is a sentencepiece model (preprocess --train-tokenizer, the
    demo) exports a tokenizer AutoTokenizer loads, token ids in both configs, world-readable files."""
    import argparse

    import torch

    from megatron_minitron import checkpoint
    from megatron_minitron.config import ModelArch, Parallel
    from megatron_minitron.hf import cli as hf_cli
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1)
    sp = build_tokenizer("sentencepiece", models["ours_bpe"])
    arch = ModelArch(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     vocab_size=sp.vocab_size, seq_length=64)
    torch.manual_seed(0)
    model = build_gpt(arch, Parallel())
    ckpt = checkpoint.save_checkpoint_to(str(tmp_path / "ckpt"), [model], arch=arch, parallel=Parallel(),
                                         tokenizer=sp.describe())
    parser = argparse.ArgumentParser()
    hf_cli.register(parser.add_subparsers())
    out = tmp_path / "hf"
    old_mask = os.umask(0o022)
    try:
        args = parser.parse_args(["convert", "mcore-to-hf", "--input", ckpt, "--output", str(out)])
        assert args.handler(args) == 0
    finally:
        os.umask(old_mask)
    for name in os.listdir(out):
        mode = stat.S_IMODE(os.stat(out / name).st_mode)
        assert mode == 0o644, (name, oct(mode))
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "def square(x):\n\treturn x * x\n"
    assert hf.encode(text) == sp.encode_document(text)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for cfg in (config, generation):
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (sp.eod, sp.eod, sp.eod)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.config.eos_token_id == sp.eod and loaded.generation_config.eos_token_id == sp.eod


def test_lone_tokenizer_json_gets_a_config_naming_its_special_tokens(corpus_text, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from megatron_minitron.hf.tokenizer_export import export_tokenizer, special_token_ids

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([corpus_text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<|endoftext|>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = build_tokenizer("huggingface", str(tmp_path / "tokenizer.json"))
    assert (ours.add_bos, ours.bos, ours.eod) == (True, 0, 1)
    out = tmp_path / "out"
    assert export_tokenizer(ours, str(out)) == ["tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf.bos_token_id, hf.eos_token_id) == (0, 1)
    assert special_token_ids(ours) == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    for text in real_texts(100):
        if text:
            assert hf.encode(text) == ours.encode_document(text) == tok.encode(text).ids
