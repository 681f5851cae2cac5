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
@pytest.mark.parametrize("saved_tp,tp", [(2, 1), (1, 2)])  # the same TP: each rank's own shard (the
# Megatron-LM test's TP2 eval)
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


def test_reshard_of_the_padded_vocabulary_keeps_the_saved_rows_the_new_padding_holds():
    """vocab 96: 128 rows at TP1, 256 at TP2 (make_vocab_size_divisible_by 128). Trained padding rows (here set
    to 7) are kept where the new padding has room for them, zero rows fill the rest; the real rows are exact."""
    hf = build_hf_model("llama")
    arch, family = arch_from_hf_config(hf.config.to_dict())
    arch = dataclasses.replace(arch, make_vocab_size_divisible_by=128)  # Megatron-LM's default
    row = params.find("embedding.word_embeddings.weight", per_layer=False)
    real = hf.state_dict()["model.embed_tokens.weight"]
    at_tp1 = hf_to_megatron(hf.state_dict(), arch, 0, 1, family=family)["embedding.word_embeddings.weight"]
    at_tp1[120:] = 7.0  # trained padding rows
    up = [reshard(row, arch, [at_tp1], r, 2) for r in range(2)]
    assert [u.shape[0] for u in up] == [128, 128] and arch.padded_vocab_size(2) == 256
    assert torch.equal(up[0][:96], real) and (up[0][120:] == 7).all() and not up[1].any()
    down = reshard(row, arch, up, 0, 1)  # back: the 128 rows TP1 holds, padding rows included
    assert torch.equal(down, at_tp1)
