"""Fused Triton RMSNorm, RoPE and SwiGLU kernels (kernels/rmsnorm_triton.py, rope_triton.py, swiglu_triton.py) and
the modules that run them (layers.FusedRMSNorm, attention.FusedRoPESelfAttention, mlp.FusedSwiGLUMLP), on CPU under
TRITON_INTERPRET=1, against the torch paths they replace: our ``Norm``, megatron's ``apply_rotary_pos_emb``,
``SelfAttention``, ``MLP`` and its fused ``bias_swiglu_impl``."""
import dataclasses
import functools
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported (read at @triton.jit time)

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import triton  # noqa: F401, E402
    from megatron_minitron.kernels.rmsnorm_triton import BACKWARD_ROWS_PER_PROGRAM, triton_rms_norm  # noqa: E402
    from megatron_minitron.kernels.rope_triton import triton_apply_rotary_pos_emb  # noqa: E402
    from megatron_minitron.kernels.swiglu_triton import MAX_BLOCK, triton_swiglu  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton cannot be imported ({exc})", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402

from megatron.core.transformer.attention import SelfAttention  # noqa: E402
from megatron.core.transformer.mlp import MLP  # noqa: E402

from megatron_minitron.config import ModelArch, Parallel, Train  # noqa: E402
from megatron_minitron.model import builder  # noqa: E402
from megatron_minitron.model.attention import FusedRoPESelfAttention, rope_freqs_for_kernel  # noqa: E402
from megatron_minitron.model.builder import build_gpt, fused_kernels_usable, layer_spec  # noqa: E402
from megatron_minitron.model.layers import FusedRMSNorm, Norm  # noqa: E402
from megatron_minitron.model.mlp import FusedSwiGLUMLP, swiglu_kernel_covers  # noqa: E402
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


@pytest.mark.parametrize("head_dim", [16, 128])
def test_rms_norm_over_heads_of_a_strided_qkv_view_matches_norm(head_dim):
    """Qwen3's q/k layernorms: megatron hands the norm a [s, b, heads, head_dim] view into linear_qkv's output
    ([s, b, groups, (q + 2) * d] split on the last dim, so not contiguous); one weight of head_dim for every
    head. The gradient reaches the qkv tensor through the view, and dw sums over all s * b * heads rows
    (here more than one backward program's)."""
    torch.manual_seed(9)
    s, b, groups, q_per_group = 11, 2, 2, 2
    torch_norm, fused_norm = _norm_pair(head_dim, torch.float32, False)
    qkv = torch.randn(s, b, groups, (q_per_group + 2) * head_dim, device=DEVICE) * 3
    upstream = torch.randn(s, b, groups * q_per_group, head_dim, device=DEVICE)
    assert s * b * groups * q_per_group > BACKWARD_ROWS_PER_PROGRAM
    results = []
    for norm in (torch_norm, fused_norm):
        leaf = qkv.detach().clone().requires_grad_(True)
        norm.weight.grad = None
        query = leaf[..., :q_per_group * head_dim].reshape(s, b, groups * q_per_group, head_dim)
        key = leaf[..., q_per_group * head_dim:(q_per_group + 1) * head_dim]  # [s, b, groups, d]
        assert not key.is_contiguous()
        y_q, y_k = norm(query), norm(key)
        (y_q * upstream).sum().backward(retain_graph=True)
        (y_k * upstream[:, :, :groups]).sum().backward()
        results.append((y_q.detach(), y_k.detach(), leaf.grad, norm.weight.grad))
    for name, r, f in zip(("y_q", "y_k", "dqkv", "dw"), *results):
        assert f.shape == r.shape, name
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5, msg=name)


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


def test_rope_reads_strided_views_in_place():
    """megatron's q / k are views into the fused qkv output ([s, b, groups, (q + k + v) * d] split on the last
    dim); the kernel reads them with their strides. A strided upstream gradient is read the same way."""
    torch.manual_seed(6)
    s, b, h, d = 5, 2, 3, 8
    qkv = torch.randn(s, b, h, 3 * d, device=DEVICE)
    freqs = torch.randn(s, 1, 1, d, device=DEVICE) * 3
    upstream = torch.randn(b, s, h, d, device=DEVICE).transpose(0, 1)  # [s, b, h, d], not contiguous
    outputs = []
    for fn in (_megatron_rope, triton_apply_rotary_pos_emb):
        leaf = qkv.detach().clone().requires_grad_(True)
        key = leaf[..., d:2 * d]
        assert not key.is_contiguous()
        y = fn(key, freqs)
        y.backward(upstream)
        outputs.append((y.detach(), leaf.grad))
    for name, r, f in zip(("y", "dqkv"), *outputs):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6, msg=name)


def test_rope_rejects_what_it_does_not_implement():
    t = torch.randn(4, 1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="non-interleaved"):
        triton_apply_rotary_pos_emb(t, torch.zeros(4, 1, 1, 8, device=DEVICE), rotary_interleaved=True)
    with pytest.raises(ValueError, match="freqs"):
        triton_apply_rotary_pos_emb(t, torch.zeros(4, 2, 1, 8, device=DEVICE))


def _swiglu_reference(y):
    gate, up = torch.chunk(y, 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _swiglu_forward_backward(fn, y, upstream):
    leaf = y.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(upstream)
    return out.detach(), leaf.grad


# (3, 2, 2 * 40): one masked block per row; (2, 1, 2 * (MAX_BLOCK + 24)): a row split over two programs
@pytest.mark.parametrize("shape", [(3, 2, 80), (2, 1, 2 * (MAX_BLOCK + 24))])
def test_swiglu_fp32_matches_torch(shape):
    torch.manual_seed(4)
    y = torch.randn(shape, device=DEVICE) * 3
    upstream = torch.randn(*shape[:-1], shape[-1] // 2, device=DEVICE)
    ref = _swiglu_forward_backward(_swiglu_reference, y, upstream)
    fused = _swiglu_forward_backward(triton_swiglu, y, upstream)
    for name, r, f in zip(("out", "dy"), ref, fused):
        assert f.dtype == r.dtype and f.shape == r.shape, name
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5, msg=name)


def test_swiglu_bf16_matches_fp32_torch_within_bf16_rounding():
    torch.manual_seed(5)
    y = (torch.randn(6, 2, 96, device=DEVICE) * 3).bfloat16()
    upstream = torch.randn(6, 2, 48, device=DEVICE).bfloat16()
    ref = _swiglu_forward_backward(_swiglu_reference, y.float(), upstream.float())
    fused = _swiglu_forward_backward(triton_swiglu, y, upstream)
    for name, r, f in zip(("out", "dy"), ref, fused):
        assert f.dtype == torch.bfloat16, name
        # elementwise: one bf16 rounding of each fp32 result
        assert ((f.float() - r).abs() <= BF16_RTOL * r.abs() + 1e-6).all(), name


def test_swiglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match="even last dimension"):
        triton_swiglu(torch.randn(2, 7, device=DEVICE))


@pytest.fixture
def kernel_calls():
    """How often the modules called our RoPE / SwiGLU kernels (they import the functions at call time)."""
    from helpers import count_kernel_calls

    calls = {"rope": 0, "swiglu": 0}
    originals = count_kernel_calls(calls)
    yield calls
    for module, name, original in originals:
        setattr(module, name, original)


def _mlp_submodules(entry):
    """The local spec's MLP submodules: a ModuleSpec (megatron-core <= 0.18) or 0.19's partial."""
    return entry.submodules if hasattr(entry, "submodules") else entry.keywords["submodules"]


TINY = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
            vocab_size=64, seq_length=8)


def _mlp_pair(arch):
    init_distributed(1, 1)
    config = builder.transformer_config(arch, Parallel())
    sub = _mlp_submodules(layer_spec(arch).submodules.mlp)
    set_seed(3)
    plain = MLP(config, sub, ffn_hidden_size=arch.ffn_hidden_size)
    fused = FusedSwiGLUMLP(config, sub, ffn_hidden_size=arch.ffn_hidden_size)
    with torch.no_grad():  # non-zero biases, so that the bias is seen to be added before the activation
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused.load_state_dict(plain.state_dict())
    return config, plain.to(DEVICE), fused.to(DEVICE)


def _mlp_step(mlp, x, upstream):
    leaf = x.detach().clone().requires_grad_(True)
    out, bias = mlp(leaf)
    out = out + bias if bias is not None else out
    out.backward(upstream)
    return [out.detach(), leaf.grad] + [p.grad for p in mlp.parameters()]


def test_fused_swiglu_mlp_matches_megatron_mlp_and_its_fused_swiglu(kernel_calls):
    arch = ModelArch(**TINY, add_bias_linear=True)
    config, plain, fused = _mlp_pair(arch)
    assert swiglu_kernel_covers(config)
    x = torch.randn(5, 2, arch.hidden_size, device=DEVICE)
    upstream = torch.randn(5, 2, arch.hidden_size, device=DEVICE)
    ref = _mlp_step(plain, x, upstream)
    got = _mlp_step(fused, x, upstream)
    assert kernel_calls["swiglu"] == 1
    for i, (r, g) in enumerate(zip(ref, got)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"output/grad {i}")
    # megatron's own fused path (config.bias_activation_fusion): the subclass steps aside, megatron's
    # bias_swiglu_impl runs and agrees with ours
    config.bias_activation_fusion = True
    assert not swiglu_kernel_covers(config)
    fused.zero_grad()
    megatron_fused = _mlp_step(fused, x, upstream)
    assert kernel_calls["swiglu"] == 1
    for i, (m, g) in enumerate(zip(megatron_fused, got)):
        torch.testing.assert_close(m, g, rtol=1e-5, atol=1e-5, msg=f"output/grad {i}")


def test_swiglu_kernel_covers_only_plain_swiglu():
    init_distributed(1, 1)
    assert swiglu_kernel_covers(builder.transformer_config(ModelArch(**TINY), Parallel()))
    assert not swiglu_kernel_covers(builder.transformer_config(ModelArch(**TINY, activation="gelu"), Parallel()))
    config = builder.transformer_config(ModelArch(**TINY), Parallel())
    config.activation_func_clamp_value = 7.0  # megatron clamps gate and up first: its path
    assert not swiglu_kernel_covers(config)


def _attention_pair(arch, **config_attrs):
    init_distributed(1, 1)
    config = builder.transformer_config(arch, Parallel())
    for name, value in config_attrs.items():  # before building: megatron 0.19 caches the YaRN mscale
        setattr(config, name, value)
    spec = layer_spec(arch, fused_kernels=True).submodules.self_attention
    assert spec.module is FusedRoPESelfAttention
    from megatron.core.transformer.spec_utils import build_module
    set_seed(5)
    plain = build_module(dataclasses.replace(spec, module=SelfAttention), config=config, layer_number=1)
    fused = build_module(spec, config=config, layer_number=1)
    fused.load_state_dict(plain.state_dict())
    return config, plain.to(DEVICE), fused.to(DEVICE)


def _attention_step(attention, x, rotary_pos_emb, upstream):
    leaf = x.detach().clone().requires_grad_(True)
    attention.zero_grad()
    out, _ = attention(leaf, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
    out.backward(upstream)
    return [out.detach(), leaf.grad] + [p.grad for p in attention.parameters()]


def _random_freqs(s, rot_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, 1, 1, rot_dim, generator=g) * 3).to(DEVICE)


@pytest.mark.parametrize("form", ["tensor", "pair", "query_only", "output_gate"])
def test_fused_rope_attention_matches_megatron_self_attention(form, kernel_calls):
    """Separate q / k frequencies, rotary_percent 0.5 and a YaRN concentration factor (mscale != 1); with
    attention_output_gate megatron's qkv step returns a fourth tensor (the gate), handed on untouched."""
    arch = ModelArch(**TINY, rotary_percent=0.5)
    extra = {"attention_output_gate": True} if form == "output_gate" else {}
    config, plain, fused = _attention_pair(arch, yarn_rotary_scaling_factor=4.0, **extra)
    s, b, rot = 6, 2, arch.head_dim // 2
    q_freqs, k_freqs = _random_freqs(s, rot, 0), _random_freqs(s, rot, 1)
    rotary = {"tensor": q_freqs, "pair": (q_freqs, k_freqs), "query_only": (q_freqs, None),
              "output_gate": (q_freqs, k_freqs)}[form]
    x = torch.randn(s, b, arch.hidden_size, device=DEVICE)
    upstream = torch.randn(s, b, arch.hidden_size, device=DEVICE)
    ref = _attention_step(plain, x, rotary, upstream)
    got = _attention_step(fused, x, rotary, upstream)
    assert kernel_calls["rope"] == (1 if form == "query_only" else 2)
    for i, (r, g) in enumerate(zip(ref, got)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"output/grad {i}")


def test_fused_rope_attention_leaves_uncovered_cases_to_megatron(kernel_calls):
    arch = ModelArch(**TINY)
    config, plain, fused = _attention_pair(arch, rotary_interleaved=True)  # megatron-only layout
    s, b = 4, 1
    freqs = _random_freqs(s, arch.head_dim, 2)
    x = torch.randn(s, b, arch.hidden_size, device=DEVICE)
    upstream = torch.randn(s, b, arch.hidden_size, device=DEVICE)
    ref = _attention_step(plain, x, freqs, upstream)
    got = _attention_step(fused, x, freqs, upstream)
    assert kernel_calls["rope"] == 0
    for i, (r, g) in enumerate(zip(ref, got)):
        # megatron's own path on both sides (bitwise on CPU; a GPU's attention backward may sum in any order)
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7, msg=f"output/grad {i}")
    config.rotary_interleaved = False
    assert fused._kernel_covers((), {"rotary_pos_emb": freqs})
    for name in ("inference_context", "packed_seq_params", "rotary_pos_cos", "key_value_states"):
        assert not fused._kernel_covers((), {name: object()}), name
    assert not fused._kernel_covers((None,), {})  # anything passed positionally: megatron's call
    config.no_rope_freq = [True, False]  # layer 1 skips RoPE: megatron drops rotary_pos_emb itself
    assert not fused._kernel_covers((), {})


def test_rope_freqs_for_kernel_takes_only_what_the_kernel_implements():
    f = torch.zeros(4, 1, 1, 8)
    assert rope_freqs_for_kernel(None) is None
    assert rope_freqs_for_kernel((None, None)) is None
    assert rope_freqs_for_kernel(f) == (f, f)
    assert rope_freqs_for_kernel((f, None)) == (f, None)
    assert rope_freqs_for_kernel(torch.zeros(4, 2, 1, 8)) is None  # per-batch (mRoPE) frequencies
    assert rope_freqs_for_kernel(torch.zeros(4, 1, 1, 7)) is None  # odd rotary dim


def test_fused_kernels_option_selects_the_fused_modules_only_where_usable():
    assert Train().fused_kernels is False  # the product path is unchanged unless asked for
    with pytest.raises(ValueError, match="fused_kernels"):
        Train(fused_kernels="yes").validate()
    assert not fused_kernels_usable(True, False, torch.device("cpu"))
    assert not fused_kernels_usable(False, False, torch.device("cuda"))
    assert not fused_kernels_usable(True, True, torch.device("cuda"))  # TE's spec fuses its own norms
    rms = ModelArch(normalization="RMSNorm")
    fused, plain = layer_spec(rms, fused_kernels=True).submodules, layer_spec(rms).submodules
    assert fused.input_layernorm is FusedRMSNorm and plain.input_layernorm is Norm
    assert fused.self_attention.module is FusedRoPESelfAttention and plain.self_attention.module is SelfAttention
    assert _mlp_class(fused.mlp) is FusedSwiGLUMLP and _mlp_class(plain.mlp) is MLP
    other = layer_spec(ModelArch(normalization="LayerNorm", activation="gelu", position_embedding="learned_absolute"),
                       fused_kernels=True).submodules
    assert other.input_layernorm is Norm and other.self_attention.module is SelfAttention
    assert _mlp_class(other.mlp) is MLP


def _mlp_class(entry):
    return entry.module if hasattr(entry, "module") else entry.func.__self__


def test_mlp_entry_rewrite_handles_megatron_019s_builder_form(monkeypatch):
    """megatron-core 0.18-0.19's local spec gives ``partial(MLP.as_mlp_submodule, submodules=...)``; 0.16 has no such
    classmethod, so one is stood in here to check that the rewrite builds the subclass with the same arguments."""
    def as_mlp_submodule(cls, **kwargs):
        return cls, kwargs

    monkeypatch.setattr(MLP, "as_mlp_submodule", classmethod(as_mlp_submodule), raising=False)
    entry = functools.partial(MLP.as_mlp_submodule, submodules="subs")
    rewritten = builder._mlp_entry_with_class(entry, FusedSwiGLUMLP)
    assert rewritten(config="c") == (FusedSwiGLUMLP, {"submodules": "subs", "config": "c"})
    from megatron.core.transformer.spec_utils import ModuleSpec
    spec_form = builder._mlp_entry_with_class(ModuleSpec(module=MLP, params={"p": 1}, submodules="subs"),
                                              FusedSwiGLUMLP)  # 0.18+ calls the entry: the builder form
    assert spec_form(config="c") == (FusedSwiGLUMLP, {"submodules": "subs", "p": 1, "config": "c"})
    unrelated = functools.partial(print, submodules="subs")
    assert builder._mlp_entry_with_class(unrelated, FusedSwiGLUMLP) is unrelated


@pytest.mark.parametrize("variant", ["gqa_partial_rope_zero_centered", "mha_full_rope_bias_recompute",
                                     "qk_layernorm_head_dim_16", "qwen3_yarn", "phi3_longrope"])
def test_gpt_with_fused_kernels_matches_the_torch_one(variant, kernel_calls, monkeypatch):
    """A whole (tiny) student step: the fused norms, RoPE and SwiGLU give the torch model's logits and every
    parameter's gradient, with the same state-dict keys; also under full activation recompute (megatron reruns
    each layer's forward in the backward, so the attention's per-call RoPE hand-over runs twice). Qwen3's q/k
    layernorms (head_dim 16 != hidden / heads 8) run the RMSNorm kernel per head, before the RoPE kernel."""
    from megatron_minitron.kernels import rmsnorm_triton

    init_distributed(1, 1)
    recompute = variant.endswith("recompute")
    if variant == "gqa_partial_rope_zero_centered":
        arch = ModelArch(**TINY, layernorm_zero_centered_gamma=True, rotary_percent=0.5)
    elif variant == "qk_layernorm_head_dim_16":
        arch = ModelArch(**TINY, kv_channels=16, qk_layernorm=True)
    elif variant == "phi3_longrope":  # 8 positions past an original context of 4: the long factors
        arch = ModelArch(**TINY, rotary_percent=0.5, position_embedding="longrope", longrope_short_factor=[1.0, 2.0],
                         longrope_long_factor=[3.0, 9.0], longrope_original_max_position_embeddings=4,
                         longrope_attention_factor=1.25)
    elif variant == "qwen3_yarn":  # YaRN: other frequencies and a concentration of 0.1 ln 4 + 1 on q and k
        arch = ModelArch(**TINY, kv_channels=16, qk_layernorm=True, position_embedding="yarn",
                         yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=4)
    else:
        arch = ModelArch(**{**TINY, "num_query_groups": 4}, add_bias_linear=True)
    set_seed(7)
    reference = build_gpt(arch, Parallel(), device=torch.device(DEVICE), recompute=recompute)
    # on CPU build_gpt never picks the fused modules itself (fused_kernels_usable): ask for the spec directly
    fused = build_gpt(arch, Parallel(), device=torch.device(DEVICE), recompute=recompute,
                      layer_spec_transform=lambda spec, config: layer_spec(arch, fused_kernels=True))
    assert list(fused.state_dict()) == list(reference.state_dict())
    fused.load_state_dict(reference.state_dict())
    layer = fused.decoder.layers[0]
    assert isinstance(layer.input_layernorm, FusedRMSNorm)
    assert isinstance(layer.self_attention, FusedRoPESelfAttention) and isinstance(layer.mlp, FusedSwiGLUMLP)
    if arch.position_embedding == "yarn":
        assert layer.self_attention._mscale() == pytest.approx(0.1 * math.log(4.0) + 1)
    if arch.position_embedding == "longrope":
        assert layer.self_attention._mscale() == pytest.approx(1.25)
    qk_norms = ("q_layernorm", "k_layernorm") if arch.qk_layernorm else ()
    for name in qk_norms:
        assert type(getattr(layer.self_attention, name)) is FusedRMSNorm
        assert type(getattr(reference.decoder.layers[0].self_attention, name)) is Norm
    with torch.no_grad():  # non-trivial gammas and biases everywhere
        for (name, a), b in zip(reference.named_parameters(), fused.parameters()):
            a.add_(torch.randn_like(a) * (0.3 if "q_layernorm" in name or "k_layernorm" in name else 0.02))
            b.copy_(a)
    norm_inputs = []  # the shape of every input the fused model's RMSNorm kernel gets
    original_rms_norm = rmsnorm_triton.triton_rms_norm
    monkeypatch.setattr(rmsnorm_triton, "triton_rms_norm",
                        lambda x, *a, **k: norm_inputs.append(tuple(x.shape)) or original_rms_norm(x, *a, **k))
    tokens = torch.randint(0, arch.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    positions = torch.arange(8, device=DEVICE).expand(2, 8)
    outputs = []
    for model in (reference, fused):
        logits = model(tokens, positions, None)
        logits.float().square().mean().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    passes = 2 if recompute else 1  # the fused model's calls only
    assert kernel_calls == {"rope": 2 * arch.num_layers * passes, "swiglu": arch.num_layers * passes}
    # the layers' two norms (the final norm is the block's, left as Norm by the CPU build), then the per-head ones
    hidden_norms = [shape for shape in norm_inputs if shape[-1] == arch.hidden_size]
    assert hidden_norms == [(8, 2, arch.hidden_size)] * 2 * arch.num_layers * passes
    per_head = [shape for shape in norm_inputs if shape[-1] != arch.hidden_size]
    heads = (arch.num_attention_heads, arch.query_groups)  # q_layernorm's rows, then k_layernorm's
    assert per_head == ([(8, 2, h, arch.head_dim) for h in heads] * arch.num_layers * passes if qk_norms else [])
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    qk_grads = [name for name in outputs[0][1] if any(f".{norm}." in name for norm in qk_norms)]
    assert len(qk_grads) == len(qk_norms) * arch.num_layers  # compared above, and not trivially zero
    assert all(outputs[0][1][name].abs().max() > 0 for name in qk_grads)


@pytest.mark.parametrize("tile", [8, 16])
def test_rope_splits_heads_over_programs(monkeypatch, tile):
    """Heads that do not fit one program's tile (MAX_TILE) are split over the second grid axis, the last block
    masked (3 heads in blocks of 1 or 2): the same result as megatron's, forward and backward."""
    from megatron_minitron.kernels import rope_triton

    monkeypatch.setattr(rope_triton, "MAX_TILE", tile)  # rot_dim 16: half 8, so 1 or 2 heads per program
    torch.manual_seed(8)
    s, b, h, d = 4, 2, 3, 20
    freqs = torch.randn(s, 1, 1, 16, device=DEVICE) * 3
    t, upstream = torch.randn(s, b, h, d, device=DEVICE), torch.randn(s, b, h, d, device=DEVICE)
    ref = _rope_forward_backward(_megatron_rope, t, freqs, upstream)
    fused = _rope_forward_backward(triton_apply_rotary_pos_emb, t, freqs, upstream)
    for name, r, f in zip(("y", "dt"), ref, fused):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6, msg=name)


def test_building_with_our_mlp_class_drops_only_megatrons_unknown_mlp_notice(caplog, monkeypatch):
    """megatron-core 0.16-0.17 logs 'Unknown MLP type' per layer for any MLP class but its own; build_gpt keeps it
    out of the output for ours (FusedSwiGLUMLP here, the FP8 teacher's too). Without the filter the notice is
    there, where megatron has it (0.19.2's TransformerLayer has none)."""
    import contextlib
    import inspect
    import logging

    from megatron.core.transformer import transformer_layer

    from megatron_minitron.model import mlp

    init_distributed(1, 1)
    arch = ModelArch(**TINY)

    def notices():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megatron.core.transformer.transformer_layer"):
            build_gpt(arch, Parallel(), layer_spec_transform=lambda spec, config: layer_spec(arch, fused_kernels=True))
        return [r for r in caplog.records if r.getMessage().startswith("Unknown MLP type")]

    assert notices() == []
    monkeypatch.setattr(mlp, "quiet_unknown_mlp_type", contextlib.nullcontext)
    logs_notice = "Unknown MLP type" in inspect.getsource(transformer_layer)
    assert len(notices()) == (arch.num_layers if logs_notice else 0)
