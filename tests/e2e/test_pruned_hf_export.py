"""HF -> megatron -> `minitron prune` (hidden, ffn, heads, query groups, a layer) -> HF: the pruned model,
with its non-standard sizes (head_dim != hidden / heads), loads in transformers without missing or
unexpected weights and gives the same logits as the pruned megatron checkpoint. qwen3 adds the per-head q/k
norms, which pruning keeps whole (they span one head's head_dim channels, shared by the heads) and a source
head_dim (16) != hidden / heads (8). qwen2 / qwen3 sources carry transformers 5's per-layer ``layer_types``,
which a depth-pruned model's config must not keep (transformers refuses one longer than
num_hidden_layers). qwen3_yarn: a Qwen3 with YaRN rope, as its model card extends the context. phi3_partial_tied: Phi-4-mini's
layout (fused qkv_proj / gate_up_proj, RoPE on 3/4 of the head dim, tied), pruned heads and groups cut the
fused tensors. phi3_longrope: Phi-3.5-mini's LongRoPE (per-frequency factors, its attention factor). smollm3: a layer
without RoPE; the depth-pruned model keeps the kept layer's flag. arcee: a non-gated squared-ReLU MLP."""
import argparse
import json
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_tiny_models import build_hf_model, hf_logits, sample_tokens  # noqa: E402

from megatron_minitron import checkpoint  # noqa: E402
from megatron_minitron.config import Parallel  # noqa: E402
from megatron_minitron.data import write_indexed_dataset  # noqa: E402
from megatron_minitron.hf import cli as hf_cli  # noqa: E402
from megatron_minitron.hf.families import _ARCH_KEYS  # noqa: E402
from megatron_minitron.model.builder import build_gpt  # noqa: E402
from megatron_minitron.prune import cli as prune_cli  # noqa: E402
from megatron_minitron.runtime.distributed import init_distributed  # noqa: E402

transformers = pytest.importorskip("transformers")


def _run(module, argv):
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3", "qwen3_yarn", "phi3_partial_tied", "phi3_longrope",
                                  "smollm3", "arcee"])
def test_pruned_checkpoint_exports_to_transformers(case, tmp_path, caplog):
    init_distributed(1, 1)
    hf_dir, ckpt, pruned, back = (str(tmp_path / n) for n in ("hf", "ckpt", "pruned", "back"))
    source = build_hf_model(case)
    family = source.config.model_type
    source.save_pretrained(hf_dir)
    config = source.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with open(os.path.join(hf_dir, "config.json")) as f:
        source_config = json.load(f)
    if family in ("qwen2", "qwen3"):  # what makes the based export below a test of dropping layer_types
        assert source_config.get("layer_types") == ["full_attention"] * 2, source_config.get("layer_types")
    assert _run(hf_cli, ["convert", "hf-to-mcore", "--input", hf_dir, "--output", ckpt, "--dtype", "fp32"]) == 0
    g = torch.Generator().manual_seed(0)
    write_indexed_dataset(str(tmp_path / "calib"), [torch.randint(1, 96, (40,), generator=g).tolist()
                                                    for _ in range(8)], eod=0, vocab_size=96)
    # Phi3Config checks longrope's factor lists against hidden / heads: that must stay the head dim (8)
    hidden = 16 if case == "phi3_longrope" else 24
    assert _run(prune_cli, ["prune", "--load", ckpt, "--save", pruned, "--data", str(tmp_path / "calib"),
                            "--num-samples", "8", "--micro-batch-size", "2", "--seq-length", "16", "--target",
                            f"hidden_size={hidden}", "ffn_hidden_size=40", "num_attention_heads=2",
                            "num_query_groups=1", "num_layers=1"]) == 0
    arch = checkpoint.read_arch(pruned)
    assert (arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads, arch.query_groups,
            arch.num_layers, arch.head_dim) == (hidden, 40, 2, 1, 1, head_dim)
    assert arch.qk_layernorm == (family == "qwen3")
    rope_type = source.config.rope_parameters["rope_type"]  # yarn: qwen3_yarn, arcee; longrope: phi3_longrope
    assert arch.position_embedding == {"default": "rope"}.get(rope_type, rope_type)
    # the prune carries the import's family and config.json on, so the export is written over the source's
    # config: its non-architecture fields stay, and its 2-entry layer_types must go (transformers refuses it
    # for 1 layer)
    lineage = checkpoint.describe_checkpoint(pruned).hf_lineage
    assert lineage == {"family": family, "hf_config": source_config}
    assert _run(hf_cli, ["convert", "mcore-to-hf", "--input", pruned, "--output", back]) == 0
    with open(os.path.join(back, "config.json")) as f:
        exported = json.load(f)
    assert exported["num_hidden_layers"] == 1 and exported["model_type"] == family
    assert len(exported.get("layer_types") or [None]) == 1, exported.get("layer_types")
    kept_fields = {k: v for k, v in source_config.items() if k not in _ARCH_KEYS}
    assert {k: exported.get(k) for k in kept_fields} == kept_fields

    model = build_gpt(arch, Parallel(), attention_backend="sdpa").eval()
    checkpoint.load_weights(pruned, [model], arch=arch)
    tokens = sample_tokens(seq=40)  # past the scaled cases' original context (16): LongRoPE's long factors
    with torch.no_grad():
        ours = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()
    kept = checkpoint.describe_checkpoint(pruned).provenance["kept_layers"]
    assert len(kept) == 1
    source_flags = checkpoint.read_arch(ckpt).no_rope_freq  # smollm3: [0, 1] (its layer 1 skips RoPE)
    assert (source_flags is not None) == (family == "smollm3")
    if source_flags:  # the kept layer keeps its own flag (which of the two is the importance ranking's choice)
        assert (arch.no_rope_freq or [0]) == [source_flags[kept[0]]]
    with caplog.at_level(logging.WARNING):
        hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
            back, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf_model.config.num_hidden_layers == 1
    theirs = hf_logits(hf_model.float().eval(), tokens)
    assert (ours[..., :theirs.shape[-1]] - theirs).abs().max().item() < 1e-4
    if rope_type != "default":  # the pruned model runs the source's frequencies and attention factor
        source_rope = source.model.rotary_emb
        assert torch.equal(hf_model.model.rotary_emb.original_inv_freq, source_rope.original_inv_freq)  # init-time
        assert hf_model.model.rotary_emb.attention_scaling == source_rope.attention_scaling > 1
    if family == "qwen3":  # the kept layer's q/k norms, as the source had them
        ours_attn, source_attn = hf_model.model.layers[0].self_attn, source.model.layers[kept[0]].self_attn
        for norm in ("q_norm", "k_norm"):
            assert torch.equal(getattr(ours_attn, norm).weight, getattr(source_attn, norm).weight), norm
