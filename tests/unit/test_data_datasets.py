"""GPT datasets from blends: samples are seq_length+1 windows of the concatenated token stream."""
import collections

import numpy as np
import pytest

from megatron_minitron.config import Data
from megatron_minitron.data import build_gpt_datasets, parse_blend, preprocess, write_indexed_dataset

SEQ = 16
VOCAB = 300
EOD = 1


class CountingTokenizer:
    """Just what the datasets need; the token stream is written directly (no text involved)."""

    kind, path, vocab_size, eod = "synthetic", "synthetic", VOCAB, EOD


def _documents(n_docs, seed):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(2, VOCAB, size=rng.randint(5, 60))) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    out = {}
    for name, n_docs, seed in (("a", 60, 0), ("b", 40, 1)):
        docs = _documents(n_docs, seed)
        write_indexed_dataset(str(root / name), docs, EOD, VOCAB)
        out[name] = (str(root / name), [d + [EOD] for d in docs])
    return out


def test_samples_are_windows_of_the_document_stream(prefixes, tmp_path):
    prefix, docs = prefixes["a"]
    cfg = Data(train_data=[prefix], split="80,20,0", cache_dir=str(tmp_path / "cache"), seed=7)
    train, valid = build_gpt_datasets(cfg, SEQ, train_samples=50, valid_samples=5,
                                      tokenizer=CountingTokenizer())
    # megatron's split rounds at document granularity: train = first 48 docs, valid = last 12
    for ds, doc_ids in ((train, range(0, 48)), (valid, range(48, 60))):
        assert set(np.unique(ds.document_index)) == set(doc_ids)
        # The stream: documents in the dataset's (shuffled, possibly repeated) document order.
        stream = np.concatenate([docs[d] for d in ds.document_index])
        starts = set()
        for j in range(len(ds)):
            k = int(ds.shuffle_index[j])  # unshuffled sample number
            sample = ds[j]
            window = stream[k * SEQ:k * SEQ + SEQ + 1]
            np.testing.assert_array_equal(sample["tokens"].numpy(), window[:-1])
            np.testing.assert_array_equal(sample["labels"].numpy(), window[1:])
            np.testing.assert_array_equal(sample["position_ids"].numpy(), np.arange(SEQ))
            assert sample["loss_mask"].sum() == SEQ
            starts.add(k)
        assert starts == set(range(len(ds)))  # every window once: a permutation
    assert len(train) >= 50 and len(valid) >= 5
    # The document order is seeded: the same seed gives the same order, another seed another one.
    again, _ = build_gpt_datasets(cfg, SEQ, 50, 5, tokenizer=CountingTokenizer())
    np.testing.assert_array_equal(again.document_index, train.document_index)
    cfg.seed = 8
    other, _ = build_gpt_datasets(cfg, SEQ, 50, 5, tokenizer=CountingTokenizer())
    assert not np.array_equal(other.document_index, train.document_index)


def test_more_samples_than_one_epoch_repeats_documents(prefixes, tmp_path):
    prefix, docs = prefixes["b"]
    tokens = sum(map(len, docs))
    cfg = Data(train_data=[prefix], split="100,0,0", cache_dir=str(tmp_path))
    train, valid = build_gpt_datasets(cfg, SEQ, 3 * tokens // SEQ, 0, tokenizer=CountingTokenizer())
    assert valid is None
    assert len(train) >= 3 * tokens // SEQ
    counts = collections.Counter(train.document_index.tolist())
    assert set(counts.values()) == {counts[0]} and counts[0] >= 3  # whole epochs


def test_weighted_blend_and_separate_valid(prefixes, tmp_path):
    (pa, _), (pb, docs_b) = prefixes["a"], prefixes["b"]
    cfg = Data(train_data=[0.25, pa, 0.75, pb], valid_data=[pb], cache_dir=str(tmp_path))
    train, valid = build_gpt_datasets(cfg, SEQ, 200, 10, tokenizer=CountingTokenizer())
    ids = np.array([train[i]["dataset_id"] for i in range(len(train))])
    assert len(train) == 200
    assert abs((ids == 1).sum() - 150) <= 1  # megatron's blending picks the most under-served source
    # valid_data: the whole of b, every sample a window of b's stream
    stream = np.concatenate([docs_b[d] for d in valid.document_index])
    k = int(valid.shuffle_index[0])
    np.testing.assert_array_equal(valid[0]["tokens"].numpy(), stream[k * SEQ:(k + 1) * SEQ])


def test_tokenizer_from_sidecar(tmp_path):
    from megatron_minitron.data import build_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} with some words and numbers {i * 37}\n" for i in range(400)))
    prefix = str(tmp_path / "d")
    preprocess([str(text)], prefix, train_vocab_size=300, lines_as_documents=True)
    cfg = Data(train_data=[prefix], split="90,10,0")
    train, _ = build_gpt_datasets(cfg, SEQ, 10, 2)  # tokenizer found through d.tokenizer.yaml
    assert train.config.tokenizer.eod == build_tokenizer("sentencepiece", prefix + ".spm.model").eod


def test_parse_blend():
    assert parse_blend(["x", "y"]) == (["x", "y"], None)
    assert parse_blend([0.3, "x", "0.7", "y"]) == (["x", "y"], [0.3, 0.7])
    assert parse_blend("0.3 x 0.7 y") == (["x", "y"], [0.3, 0.7])
    assert parse_blend([]) is None and parse_blend(None) is None
    with pytest.raises(ValueError, match="odd"):
        parse_blend([0.3, "x", 0.7])
    with pytest.raises(ValueError, match="mixes"):
        parse_blend(["x", 0.5])


def test_dataset_errors(prefixes, tmp_path):
    prefix, _ = prefixes["a"]
    with pytest.raises(FileNotFoundError, match="minitron preprocess"):
        build_gpt_datasets(Data(train_data=[str(tmp_path / "nope")]), SEQ, 10, 1, CountingTokenizer())
    with pytest.raises(ValueError, match="train_data is empty"):
        build_gpt_datasets(Data(), SEQ, 10, 1, CountingTokenizer())
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        build_gpt_datasets(Data(train_data=[prefix]), SEQ, 10, 1)  # no sidecar, no tokenizer_path
    with pytest.raises(ValueError, match="none"):  # 60 docs, 0.5% valid share rounds to no document
        build_gpt_datasets(Data(train_data=[prefix], split="995,5,0", cache_dir=str(tmp_path)), SEQ, 10, 1,
                           CountingTokenizer())


def _samples(ds):
    return [ds[i]["tokens"].tolist() for i in range(len(ds))]


def test_no_validation_wanted_builds_no_valid_split_and_keeps_the_train_documents(prefixes, tmp_path):
    """valid_samples=0 (train.eval_iters=0): no valid split is built, so a valid share too small for any
    document is no error (megatron would never finish building an empty split), and the train split holds
    exactly the documents and samples it holds when validation is built."""
    prefix, _ = prefixes["a"]
    cfg = Data(train_data=[prefix], split="80,20,0", cache_dir=str(tmp_path / "c1"), seed=7)
    with_valid, valid = build_gpt_datasets(cfg, SEQ, 50, 5, tokenizer=CountingTokenizer())
    without, none = build_gpt_datasets(cfg, SEQ, 50, 0, tokenizer=CountingTokenizer())
    assert valid is not None and none is None
    assert set(np.unique(without.document_index)) == set(range(48))
    assert _samples(without) == _samples(with_valid)
    # a blend of two sources, each split by the same shares
    blend = Data(train_data=[0.25, prefix, 0.75, prefixes["b"][0]], split="80,20,0", cache_dir=str(tmp_path / "c2"))
    blended = [build_gpt_datasets(blend, SEQ, 60, n, tokenizer=CountingTokenizer())[0] for n in (4, 0)]
    assert _samples(blended[1]) == _samples(blended[0])
    # separate valid_data not wanted: not built
    separate = Data(train_data=[prefix], valid_data=[prefixes["b"][0]], cache_dir=str(tmp_path / "c3"))
    assert build_gpt_datasets(separate, SEQ, 20, 0, tokenizer=CountingTokenizer())[1] is None
    # 60 docs, a 0.5% valid share: no document. Asked for validation, the error names the way out; not asked,
    # the train share is the first round(0.995 * 60) = 60 documents, as megatron's own "100,0,0" split gives
    tiny = Data(train_data=[prefix], split="995,5,0", cache_dir=str(tmp_path / "c4"), seed=7)
    with pytest.raises(ValueError, match="train.eval_iters=0"):
        build_gpt_datasets(tiny, SEQ, 20, 2, tokenizer=CountingTokenizer())
    train, none = build_gpt_datasets(tiny, SEQ, 20, 0, tokenizer=CountingTokenizer())
    whole = Data(train_data=[prefix], split="100,0,0", cache_dir=str(tmp_path / "c5"), seed=7)
    assert none is None and _samples(train) == _samples(build_gpt_datasets(whole, SEQ, 20, 0,
                                                                             tokenizer=CountingTokenizer())[0])
