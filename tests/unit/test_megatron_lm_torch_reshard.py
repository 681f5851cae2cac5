"""megatron_lm_torch.reshard (a legacy --ckpt-format torch checkpoint's TP shards -> another TP size's shard)
against another route to the same shards: the HF mapping, which cuts each TP size's shards from HF tensors
(hf/mapping.py, itself checked against transformers' logits and megatron's own split)."""
import dataclasses
import re

import pytest
import torch

pytest.importorskip("transformers")

from megatron_minitron.checkpoint.megatron_lm_torch import reshard  # noqa: E402
from megatron_minitron.hf import arch_from_hf_config, hf_to_megatron  # noqa: E402
from megatron_minitron.model import params  # noqa: E402
from tests.hf_tiny_models import build_hf_model  # noqa: E402

LAYER = re.compile(r"^decoder\.layers\.\d+\.(.+)$")


def _row(name):
    match = LAYER.match(name)
    return params.find(match.group(1) if match else name, per_layer=bool(match))


# llama: SwiGLU, GQA, untied; qwen2: q/k/v biases, tied; nemotron: non-gated fc1, LayerNorm biases, MHA;
# mistral_nemo: head_dim != hidden / heads
@pytest.mark.parametrize("case", ["llama", "qwen2", "nemotron", "mistral_nemo"])
@pytest.mark.parametrize("saved_tp,tp", [(2, 1), (1, 2), (2, 2)])
def test_reshard_gives_the_shards_the_hf_mapping_cuts(case, saved_tp, tp):
    hf = build_hf_model(case)
    arch, family = arch_from_hf_config(hf.config.to_dict())
    state = hf.state_dict()
    saved = [hf_to_megatron(state, arch, r, saved_tp, family=family) for r in range(saved_tp)]
    wanted = [hf_to_megatron(state, arch, r, tp, family=family) for r in range(tp)]
    kinds = set()
    for name in wanted[0]:
        row = _row(name)
        kinds.add(row.tp_axis_name)
        for rank in range(tp):
            got = reshard(row, arch, [s[name] for s in saved], rank, tp)
            assert torch.equal(got, wanted[rank][name]), (name, rank)
    assert {"qkv", "vocab", "attn", None} <= kinds, kinds  # every layout was exercised


def test_reshard_of_the_padded_vocabulary_keeps_real_rows_only():
    """Saved at TP2 (vocab 96 padded to 256 rows), loaded at TP1 (128 rows): the 96 real rows, then zeros, even
    where the saved padding rows hold values (a trained model's)."""
    hf = build_hf_model("llama")
    arch, family = arch_from_hf_config(hf.config.to_dict())
    arch = dataclasses.replace(arch, make_vocab_size_divisible_by=128)  # Megatron-LM's default
    saved = [hf_to_megatron(hf.state_dict(), arch, r, 2, family=family)["embedding.word_embeddings.weight"]
             for r in range(2)]
    saved[1][-5:] = 7.0  # the last padding rows
    row = params.find("embedding.word_embeddings.weight", per_layer=False)
    got = reshard(row, arch, saved, 0, 1)
    assert saved[0].shape[0] + saved[1].shape[0] == arch.padded_vocab_size(2) == 256
    assert got.shape == (arch.padded_vocab_size(1), arch.hidden_size) == (128, 32)
    assert torch.equal(got[:96], hf.state_dict()["model.embed_tokens.weight"]) and not got[96:].any()
