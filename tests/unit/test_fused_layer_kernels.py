"""Fused Triton RMSNorm and RoPE kernels (kernels/rmsnorm_triton.py, kernels/rope_triton.py), run on CPU under
TRITON_INTERPRET=1, against the torch paths they replace: our ``Norm`` and megatron's ``apply_rotary_pos_emb``."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported (read at @triton.jit time)

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import triton  # noqa: F401, E402
    from megatron_minitron.kernels.rmsnorm_triton import BACKWARD_ROWS_PER_PROGRAM, triton_rms_norm  # noqa: E402
    from megatron_minitron.kernels.rope_triton import triton_apply_rotary_pos_emb  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton cannot be imported ({exc})", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402

from megatron_minitron.config import ModelArch, Parallel, Train  # noqa: E402
from megatron_minitron.model.builder import build_gpt, fused_kernels_usable, layer_spec  # noqa: E402
from megatron_minitron.model.layers import FusedRMSNorm, Norm  # noqa: E402
from megatron_minitron.runtime.distributed import init_distributed, set_seed  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# one bf16 rounding of the output (the interpreter truncates: <= 2^-7 relative), plus the reference's own
BF16_RTOL = 2 ** -6


def _norm_pair(hidden, dtype, zero_centered):
    config = SimpleNamespace(normalization="RMSNorm", layernorm_zero_centered_gamma=zero_centered,
                             params_dtype=dtype, sequence_parallel=False)
    torch_norm, fused_norm = Norm(config, hidden, eps=1e-5), FusedRMSNorm(config, hidden, eps=1e-5)
    with torch.no_grad():  # a non-trivial gamma so that a wrong (w + 1) or a dropped weight shows
        torch_norm.weight.copy_(torch.randn(hidden) * 0.5)
        fused_norm.weight.copy_(torch_norm.weight)
    return torch_norm.to(DEVICE), fused_norm.to(DEVICE)


def _forward_backward(module, x, upstream):
    leaf = x.detach().clone().requires_grad_(True)
    module.weight.grad = None
    y = module(leaf)
    y.backward(upstream)
    return y.detach(), leaf.grad, module.weight.grad


# 15 rows: one backward program; 140 rows: several programs' dw partials summed; hidden 48 / 40 mask a block
@pytest.mark.parametrize("shape", [(5, 3, 48), (70, 2, 40)])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_rms_norm_fp32_matches_norm(shape, zero_centered):
    torch.manual_seed(0)
    torch_norm, fused_norm = _norm_pair(shape[-1], torch.float32, zero_centered)
    x = torch.randn(shape, device=DEVICE) * 3
    upstream = torch.randn(shape, device=DEVICE)
    ref, fused = (_forward_backward(m, x, upstream) for m in (torch_norm, fused_norm))
    for name, r, f in zip(("y", "dx", "dw"), ref, fused):
        assert f.dtype == r.dtype, name
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_rms_norm_bf16_matches_fp32_norm_within_bf16_rounding(zero_centered):
    torch.manual_seed(1)
    shape = (9, 2, 64)
    ref_norm, _ = _norm_pair(shape[-1], torch.float32, zero_centered)
    _, fused_norm = _norm_pair(shape[-1], torch.bfloat16, zero_centered)
    with torch.no_grad():  # the fp32 reference sees exactly the bf16 weights and inputs
        ref_norm.weight.copy_(fused_norm.weight.float())
    x = (torch.randn(shape, device=DEVICE) * 3).bfloat16()
    upstream = torch.randn(shape, device=DEVICE).bfloat16()
    ref = _forward_backward(ref_norm, x.float(), upstream.float())
    fused = _forward_backward(fused_norm, x, upstream)
    for name, r, f in zip(("y", "dx", "dw"), ref, fused):
        assert f.dtype == torch.bfloat16, name
        scale = r.abs().max().item()
        assert (f.float() - r).abs().max().item() <= BF16_RTOL * scale, name


def test_rms_norm_rejects_a_weight_of_the_wrong_size():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="expected \\(8,\\)"):
        triton_rms_norm(x, torch.ones(6, device=DEVICE), 1e-5)


def test_backward_rows_per_program_is_exercised_by_the_larger_shape():
    assert 70 * 2 > 2 * BACKWARD_ROWS_PER_PROGRAM  # the (70, 2, 40) case above spans three programs


def _megatron_rope(t, freqs, mscale=1.0):
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    # cp_group only matters for packed (thd) inputs; a placeholder spares initialising parallel_state
    return apply_rotary_pos_emb(t, freqs, config=config, mscale=mscale, cp_group=SimpleNamespace())


def _megatron_freqs(seq, head_dim, rotary_percent):
    """What megatron's RotaryEmbedding.forward returns for `seq` positions ([s, 1, 1, rot_dim]), on CPU."""
    rope = RotaryEmbedding(kv_channels=head_dim, rotary_percent=rotary_percent, use_cpu_initialization=True)
    freqs = rope.get_freqs_non_repeated(seq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :].to(DEVICE)


def _rope_forward_backward(fn, t, freqs, upstream, **kwargs):
    leaf = t.detach().clone().requires_grad_(True)
    y = fn(leaf, freqs, **kwargs)
    y.backward(upstream)
    return y.detach(), leaf.grad


@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_megatron(rotary_percent, dtype):
    torch.manual_seed(2)
    s, b, h, d = 7, 2, 3, 16
    freqs = _megatron_freqs(s, d, rotary_percent)
    assert freqs.shape[-1] == int(d * rotary_percent)
    t = torch.randn(s, b, h, d, device=DEVICE).to(dtype)
    upstream = torch.randn(s, b, h, d, device=DEVICE).to(dtype)
    ref = _rope_forward_backward(_megatron_rope, t, freqs, upstream)
    fused = _rope_forward_backward(triton_apply_rotary_pos_emb, t, freqs, upstream)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=BF16_RTOL, atol=BF16_RTOL)
    for name, r, f in zip(("y", "dt"), ref, fused):
        assert f.dtype == dtype, name
        torch.testing.assert_close(f, r, **tol, msg=name)
    rot = freqs.shape[-1]
    assert torch.equal(fused[0][..., rot:], t[..., rot:])  # the channels past rot_dim pass through exactly
    assert torch.equal(fused[1][..., rot:], upstream[..., rot:])


def test_rope_general_freqs_and_mscale_match_megatron():
    """Halves with different frequencies (not megatron's cat(f, f)) and a YaRN-style mscale: the kernel's
    backward is the transposed rotation, not a copy of the forward's."""
    torch.manual_seed(3)
    s, b, h, d = 5, 1, 2, 12
    freqs = torch.randn(s, 1, 1, 8, device=DEVICE) * 3
    t, upstream = torch.randn(s, b, h, d, device=DEVICE), torch.randn(s, b, h, d, device=DEVICE)
    ref = _rope_forward_backward(_megatron_rope, t, freqs, upstream, mscale=1.3)
    fused = _rope_forward_backward(triton_apply_rotary_pos_emb, t, freqs, upstream, mscale=1.3)
    for name, r, f in zip(("y", "dt"), ref, fused):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6, msg=name)


def test_rope_rejects_what_it_does_not_implement():
    t = torch.randn(4, 1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="non-interleaved"):
        triton_apply_rotary_pos_emb(t, torch.zeros(4, 1, 1, 8, device=DEVICE), rotary_interleaved=True)
    with pytest.raises(ValueError, match="freqs"):
        triton_apply_rotary_pos_emb(t, torch.zeros(4, 2, 1, 8, device=DEVICE))


def test_fused_kernels_option_selects_the_fused_norm_only_where_usable():
    assert Train().fused_kernels is False  # the product path is unchanged unless asked for
    with pytest.raises(ValueError, match="fused_kernels"):
        Train(fused_kernels="yes").validate()
    assert not fused_kernels_usable(True, False, torch.device("cpu"))
    assert not fused_kernels_usable(False, False, torch.device("cuda"))
    assert not fused_kernels_usable(True, True, torch.device("cuda"))  # TE's spec fuses its own norms
    rms = ModelArch(normalization="RMSNorm")
    assert layer_spec(rms, fused_kernels=True).submodules.input_layernorm is FusedRMSNorm
    assert layer_spec(rms).submodules.input_layernorm is Norm
    assert layer_spec(ModelArch(normalization="LayerNorm"), fused_kernels=True).submodules.input_layernorm is Norm


def test_gpt_with_fused_decoder_norms_matches_the_torch_one():
    """A whole (tiny) student step: the fused layer norms give the torch model's logits and gradients."""
    init_distributed(1, 1)
    arch = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                     layernorm_zero_centered_gamma=True, rotary_percent=0.5, vocab_size=64, seq_length=8)
    set_seed(7)
    reference = build_gpt(arch, Parallel())
    # on CPU build_gpt never picks the fused norm itself (fused_kernels_usable): ask for the spec directly
    fused = build_gpt(arch, Parallel(), layer_spec_transform=lambda spec, config: layer_spec(arch, fused_kernels=True))
    fused.load_state_dict(reference.state_dict())
    assert isinstance(fused.decoder.layers[0].input_layernorm, FusedRMSNorm)
    with torch.no_grad():  # a non-trivial gamma in every norm
        for a, b in zip(reference.parameters(), fused.parameters()):
            a.add_(torch.randn_like(a) * 0.02)
            b.copy_(a)
    tokens = torch.randint(0, arch.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).expand(2, 8)
    outputs = []
    for model in (reference, fused):
        logits = model(tokens, positions, None)
        logits.float().square().mean().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
