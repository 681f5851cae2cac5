"""The spec-built FP8 teacher (distill.fp8_teacher.build_fp8_teacher): the same logits, bit for bit, as the
teacher built the previous way (a bf16 model whose module instances are patched, tests/fp8_patched_teacher.py)
on the same weights; no module instance carries a patched method or attribute; the checkpoint loads into it
under the same (sharded) state-dict keys as into the bf16 teacher."""
import pytest
import torch

from fp8_patched_teacher import patch_teacher
from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.distill.fp8_teacher import (FP8ColumnParallelLinear, FP8Norm, FP8Options,
                                                   FP8RowParallelLinear, FP8SDPAttention, FP8SwiGLUMLP,
                                                   build_fp8_teacher, fused_sites, quantize_teacher,
                                                   quantize_weights)
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ARCH = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                 vocab_size=256, seq_length=16)
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
POSITIONS = torch.arange(16).expand(2, 16)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    init_distributed(1, 1)


def _reference(arch=ARCH, attention_backend="auto"):
    set_seed(3)
    return build_gpt(arch, Parallel(), attention_backend=attention_backend).eval()


def _spec_built(reference, attention_backend="auto", options=FP8Options(), fuse=True, arch=ARCH):
    model = build_fp8_teacher(arch, Parallel(), torch.float32, attention_backend=attention_backend,
                              options=options, fuse=fuse).eval()
    model.load_state_dict(reference.state_dict())
    assert quantize_weights(model) == 4 * arch.num_layers
    return model


def _logits(model):
    with torch.no_grad():
        return model(TOKENS, POSITIONS, None)


@pytest.mark.parametrize("attention_backend,fuse,granularity", [
    ("auto", True, "token"), ("auto", False, "token"), ("unfused", True, "token"), ("auto", True, "tensor")],
    ids=["fused", "unfused", "megatron-attention", "per-tensor"])
def test_spec_built_teacher_equals_patched_teacher(attention_backend, fuse, granularity):
    reference = _reference(attention_backend=attention_backend)
    patched = build_gpt(ARCH, Parallel(), attention_backend=attention_backend).eval()
    patched.load_state_dict(reference.state_dict())
    patch_teacher(patched, activation_granularity=granularity, fuse=fuse)
    spec = _spec_built(reference, attention_backend, FP8Options(activation_granularity=granularity), fuse)
    assert fused_sites(spec) == patched.fp8_fused_sites
    expected = _logits(patched)
    assert torch.equal(_logits(spec), expected)
    # and it is an FP8 model: its logits differ from the full-precision ones
    assert not torch.equal(expected, _logits(reference))


def test_spec_built_teacher_classes_and_no_patched_instances():
    reference = _reference()
    model = _spec_built(reference)
    layer = model.decoder.layers[0]
    assert type(layer.input_layernorm) is FP8Norm and type(layer.pre_mlp_layernorm) is FP8Norm
    assert type(layer.self_attention.core_attention) is FP8SDPAttention and type(layer.mlp) is FP8SwiGLUMLP
    assert type(layer.self_attention.linear_qkv) is FP8ColumnParallelLinear
    assert type(layer.mlp.linear_fc2) is FP8RowParallelLinear
    assert type(model.decoder.final_layernorm).__name__ == "Norm"  # the final norm feeds the bf16 output layer
    assert fused_sites(model) == 4 * ARCH.num_layers
    for name, module in model.named_modules():
        patched = {"forward", "_forward_impl", "fp8_input", "_merge_heads", "output_transform"} & set(vars(module))
        assert not patched, (name, patched)


def test_swiglu_site_not_fused_for_another_activation():
    arch = ModelArch(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                     vocab_size=256, seq_length=16, activation="squared_relu")
    reference = _reference(arch)
    patched = build_gpt(arch, Parallel()).eval()
    patched.load_state_dict(reference.state_dict())
    patch_teacher(patched)
    model = _spec_built(reference, arch=arch)
    assert type(model.decoder.layers[0].mlp).__name__ == "MLP"
    assert fused_sites(model) == patched.fp8_fused_sites == 3
    assert torch.equal(_logits(model), _logits(patched))


def test_qk_layernorm_teacher_equals_patched_teacher():
    """Qwen3's q/k layernorms (head_dim 32 != 64 / 4, LayerNorm so their biases load too): they sit between
    linear_qkv's output and RoPE, so they stay the teacher's Norm on linear_qkv's (not quantized) output while
    the four producers still fuse; the spec-built and patched teachers agree bit for bit and the checkpoint
    keys (q/k norm tensors included) are the bf16 teacher's. (quantize_teacher's rebuild with q/k norms:
    test_fp8_teacher.py's qk_layernorm case.)"""
    import dataclasses

    arch = dataclasses.replace(ARCH, num_layers=1, qk_layernorm=True, kv_channels=32, normalization="LayerNorm")
    reference = _reference(arch)
    with torch.no_grad():  # q/k norm weights and biases other than 1 and 0
        for name, p in reference.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model = _spec_built(reference, arch=arch)
    attention = model.decoder.layers[0].self_attention
    assert type(attention.q_layernorm).__name__ == type(attention.k_layernorm).__name__ == "Norm"
    assert attention.q_layernorm.weight.shape == attention.k_layernorm.bias.shape == (32,)
    assert fused_sites(model) == 4 * arch.num_layers
    assert list(model.state_dict()) == list(reference.state_dict())
    assert sum("q_layernorm" in k or "k_layernorm" in k for k in model.state_dict()) == 4 * arch.num_layers
    patched = build_gpt(arch, Parallel()).eval()
    patched.load_state_dict(reference.state_dict())
    patch_teacher(patched)
    expected = _logits(patched)
    assert torch.equal(_logits(model), expected)
    full = _logits(reference)
    assert 0 < ((expected - full).norm() / full.norm()).item() < 0.1  # FP8, and close to the fp32 teacher


def test_checkpoint_keys_unchanged():
    reference = _reference()
    model = build_fp8_teacher(ARCH, Parallel(), torch.float32)
    assert list(model.state_dict()) == list(reference.state_dict())
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items() if torch.is_tensor(v)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items() if torch.is_tensor(v)} == shapes
    sharded, sharded_ref = model.sharded_state_dict(), reference.sharded_state_dict()
    assert sorted(sharded) == sorted(sharded_ref)
    for key, ref in sharded_ref.items():
        if hasattr(ref, "global_shape"):
            assert (sharded[key].key, sharded[key].global_shape) == (ref.key, ref.global_shape), key


def test_quantize_weights_is_required_once_and_teacher_refuses_gradients():
    reference = _reference()
    model = build_fp8_teacher(ARCH, Parallel(), torch.float32).eval()
    model.load_state_dict(reference.state_dict())
    with pytest.raises(RuntimeError, match="quantize_weights"):
        _logits(model)
    quantize_weights(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weights(model)
    with pytest.raises(ValueError, match="already an FP8 teacher"):
        quantize_teacher(model)
    with pytest.raises(ValueError, match="no FP8 linears"):
        quantize_weights(reference)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        model(TOKENS, POSITIONS, None)


def test_quantize_teacher_rebuilds_into_the_spec_built_teacher():
    reference = _reference()
    converted = build_gpt(ARCH, Parallel()).eval()
    converted.load_state_dict(reference.state_dict())
    assert quantize_teacher(converted) == 4 * ARCH.num_layers
    assert converted.fp8_fused_sites == 4 * ARCH.num_layers
    assert torch.equal(_logits(converted), _logits(_spec_built(reference)))


def test_options_validated():
    with pytest.raises(ValueError, match="activation_granularity"):
        FP8Options(activation_granularity="channel")
    with pytest.raises(ValueError, match="weight_granularity"):
        FP8Options(weight_granularity="token")


def test_checkpoint_loads_into_the_spec_built_teacher(tmp_path):
    """distill's path: save the bf16 teacher, build the FP8 one, load the checkpoint (dist-ckpt, sharded
    state dict), quantize: the logits of the patched teacher on the same weights."""
    from megatron_minitron import checkpoint

    reference = _reference()
    directory = checkpoint.save_checkpoint_to(str(tmp_path / "teacher"), [reference], arch=ARCH)
    model = build_fp8_teacher(ARCH, Parallel(), torch.float32).eval()
    checkpoint.load_weights(directory, [model], arch=ARCH)
    quantize_weights(model)
    patched = build_gpt(ARCH, Parallel()).eval()
    patched.load_state_dict(reference.state_dict())
    patch_teacher(patched)
    assert torch.equal(_logits(model), _logits(patched))


def _documented_example() -> str:
    import os
    import re

    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "distillation.md")
    section = open(doc).read().split("## FP8 teacher", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_documented_example_runs(tmp_path):
    """docs/distillation.md's FP8-teacher example, as written, on a saved tiny checkpoint: the bf16 patched
    teacher's logits on the same weights."""
    from megatron_minitron import checkpoint

    reference = _reference()
    teacher_dir = checkpoint.save_checkpoint_to(str(tmp_path / "teacher"), [reference], arch=ARCH)
    names = {"teacher_dir": teacher_dir, "tokens": TOKENS, "position_ids": POSITIONS}
    exec(compile(_documented_example(), "docs/distillation.md", "exec"), names)
    patched = build_gpt(ARCH, Parallel(), torch.bfloat16).eval()
    checkpoint.load_weights(teacher_dir, [patched], arch=ARCH)
    patch_teacher(patched)
    assert names["logits"].dtype == torch.bfloat16
    assert torch.equal(names["logits"], _logits(patched))
