"""Token ids vs the model's vocabulary, checked before any work: the largest id recorded at preprocess time
(or read from a small .bin), a clear error instead of an IndexError mid-run."""
import os

import numpy as np
import pytest

from megatron_minitron.cli import main
from megatron_minitron.data import (build_tokenizer, check_token_ids, max_token_id, preprocess,
                                    write_indexed_dataset, write_tokenizer_sidecar)


def _docs(largest, n=6, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, largest, size=50).tolist() for _ in range(n)]
    docs[2][7] = largest
    return docs


def test_largest_id_from_the_bin_and_from_the_sidecar(tmp_path):
    prefix = str(tmp_path / "d")
    assert write_indexed_dataset(prefix, _docs(700), eod=0, vocab_size=1000)[2] == 700
    assert max_token_id(prefix) == 700  # no sidecar: read from the .bin
    with open(prefix + ".tokenizer.yaml", "w") as f:
        f.write("type: sentencepiece\npath: x.model\nmax_token_id: 123\n")
    assert max_token_id(prefix) == 123  # the recorded value wins (no read of the data)
    check_token_ids([prefix], 124)
    with pytest.raises(ValueError, match=r"holds token id 123.*123 entries"):
        check_token_ids([0.5, prefix, 0.5, prefix], 123, "data.train_data")


def test_preprocess_records_the_largest_id(tmp_path):
    from megatron_minitron.data import train_sentencepiece
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of some text about tokens and vocabularies, {i * 7} words and more" for i in range(300)))
    model = train_sentencepiece([str(text)], str(tmp_path / "sp"), vocab_size=320)
    tok = build_tokenizer("sentencepiece", model)
    result = preprocess([str(text)], str(tmp_path / "data"), tok)
    side = open(result.sidecar).read()
    ids = np.memmap(str(tmp_path / "data.bin"), dtype=np.uint16, mode="r")
    assert f"max_token_id: {int(ids.max())}" in side


def test_train_refuses_data_beyond_the_vocabulary_before_any_work(tmp_path, capsys):
    prefix = str(tmp_path / "d")
    write_indexed_dataset(prefix, _docs(700), eod=0, vocab_size=1000)
    tok = tmp_path / "tok"
    save = tmp_path / "run"
    rc = main(["train", "model.vocab_size=512", "model.num_layers=2", "model.hidden_size=32",
               "model.ffn_hidden_size=64", "model.num_attention_heads=2", f"data.train_data=[{prefix}]",
               f"data.valid_data=[{prefix}]", "train.train_iters=2", f"train.save={save}",
               "data.tokenizer_type=sentencepiece", f"data.tokenizer_path={tok}"])
    assert rc == 2
    assert "holds token id 700" in capsys.readouterr().err
    assert not os.path.exists(save)
