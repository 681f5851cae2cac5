import pytest
import torch

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.model.builder import build_gpt, have_transformer_engine, pipeline_layout
from megatron_minitron.runtime.distributed import init_distributed, set_seed


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    init_distributed(1, 1)


ARCHS = {
    "llama_gqa": ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                           num_query_groups=2, vocab_size=200),
    "nemotron_like": ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                               activation="squared_relu", normalization="LayerNorm",
                               layernorm_zero_centered_gamma=True, rotary_percent=0.5, vocab_size=200),
    "qwen_like_tied": ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                                num_query_groups=1, add_qkv_bias=True, tie_embeddings=True, vocab_size=200),
    "gpt2_like": ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                           activation="gelu", normalization="LayerNorm", add_bias_linear=True,
                           position_embedding="learned_absolute", vocab_size=200),
    "qwen3_like_qk_layernorm": ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                                         num_query_groups=2, kv_channels=32, qk_layernorm=True, vocab_size=200),
    "head_dim_not_hidden_over_heads": ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96,
                                                num_attention_heads=4, num_query_groups=2, kv_channels=24,
                                                vocab_size=200),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_parameter_count_formula_matches_model(name):
    arch = ARCHS[name]
    model = build_gpt(arch, Parallel())
    counted = sum(p.numel() for p in model.parameters())
    assert counted == arch.num_parameters()
    embedding = arch.padded_vocab_size() * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    if arch.position_embedding == "learned_absolute":
        embedding += arch.seq_length * arch.hidden_size
    assert arch.num_parameters(include_embeddings=False) == counted - embedding


@pytest.mark.parametrize("name", list(ARCHS))
def test_sdpa_matches_megatron_unfused_attention(name):
    arch = ARCHS[name]
    set_seed(5)
    sdpa = build_gpt(arch, Parallel(), attention_backend="sdpa").eval()
    unfused = build_gpt(arch, Parallel(), attention_backend="unfused").eval()
    unfused.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, 24)
    causal = torch.triu(torch.ones(24, 24, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        a = sdpa(tokens, positions, None)
        b = unfused(tokens, positions, causal)
    assert (a - b).abs().max().item() < 1e-5


def test_zero_centered_gamma_norm_is_standard_norm_at_init():
    arch = ARCHS["nemotron_like"]
    model = build_gpt(arch, Parallel())
    norm = model.decoder.layers[0].input_layernorm
    assert torch.all(norm.weight == 0)
    x = torch.randn(3, 5, arch.hidden_size)
    ref = torch.nn.functional.layer_norm(x, (arch.hidden_size,), eps=arch.norm_epsilon)
    assert torch.allclose(norm(x), ref, atol=1e-6)


def test_transformer_engine_requested_without_it():
    if have_transformer_engine():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError, match="attention_backend=sdpa"):
        build_gpt(ARCHS["llama_gqa"], Parallel(), use_te=True)


def test_pipeline_layout_strings():
    assert pipeline_layout(Parallel(pipeline_model_parallel_size=2, pipeline_split=[1, 3]), 4) == "Et|tttL"
    assert pipeline_layout(Parallel(pipeline_model_parallel_size=2), 4) is None


@pytest.mark.parametrize("name", list(ARCHS))
def test_uninitialised_build_loads_to_the_same_model_without_random_init(name, tmp_path):
    """initialize=False (prune, eval, convert, the teacher: builds that a checkpoint load fills) draws no
    random numbers for megatron's layers, and after a load holds exactly what a randomly initialised model holds after the same load
    (every tensor, biases and norms included, is set by the load)."""
    from megatron_minitron import checkpoint

    arch = ARCHS[name]
    set_seed(7)
    saved = build_gpt(arch, Parallel())
    checkpoint.save_checkpoint_to(str(tmp_path / "ckpt"), [saved], arch=arch)
    rng = torch.get_rng_state()
    empty = build_gpt(arch, Parallel(), initialize=False)
    if arch.position_embedding != "learned_absolute":  # torch.nn.Embedding (positions) inits itself
        assert torch.equal(torch.get_rng_state(), rng)  # no init drew from the generator
    initialised = build_gpt(arch, Parallel())
    assert not torch.equal(torch.get_rng_state(), rng)
    # the same TP attributes on every weight (megatron's grad norm counts TP-split weights by them)
    attrs = ("tensor_model_parallel", "partition_dim", "partition_stride")
    marks = lambda m: {n: tuple(getattr(p, a, None) for a in attrs) for n, p in m.named_parameters()}  # noqa: E731
    assert marks(empty) == marks(initialised)
    assert any(mark[0] for mark in marks(empty).values())
    for model in (empty, initialised):
        checkpoint.load_weights(str(tmp_path / "ckpt"), [model], arch=arch)
    want = saved.state_dict()
    for key, value in empty.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            assert torch.equal(value, want[key]) and torch.equal(value, initialised.state_dict()[key]), key


def test_sdpa_repeats_kv_heads_where_no_fused_kernel_takes_gqa(monkeypatch):
    """The kv-head repeat (fp32 / masked GQA on CUDA) gives the enable_gqa result: the same layer, forced
    down that branch on CPU, against itself with enable_gqa, forward and gradients."""
    from megatron_minitron.model import layers

    assert layers.fused_kernel_takes_gqa("cuda", torch.bfloat16, False)
    assert not layers.fused_kernel_takes_gqa("cuda", torch.float32, False)
    assert not layers.fused_kernel_takes_gqa("cuda", torch.bfloat16, True)
    assert layers.fused_kernel_takes_gqa("cpu", torch.float32, False)
    arch = ARCHS["llama_gqa"]
    set_seed(6)
    model = build_gpt(arch, Parallel(), attention_backend="sdpa")
    tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24).expand(2, 24)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        calls.append((k.shape[1], kwargs["enable_gqa"]))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", recording_sdpa)
    results = []
    for takes_gqa in (True, False):
        monkeypatch.setattr(layers, "fused_kernel_takes_gqa", lambda *args, takes=takes_gqa: takes)
        model.zero_grad()
        logits = model(tokens, positions, None)
        logits.float().square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    groups, heads = arch.num_query_groups, arch.num_attention_heads
    assert calls == [(groups, True)] * arch.num_layers + [(heads, False)] * arch.num_layers
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_run.sh kernel_tests)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_gqa_runs_a_fused_kernel_on_cuda(dtype):
    """On the GPU, grouped-query attention never lands on SDPA's math kernel (its [b, heads, s, s] scores),
    in fp32 (kv heads repeated) or bf16 (enable_gqa), and gives the math kernel's result."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import profile

    from megatron_minitron.model.layers import SDPAttention

    g = torch.Generator(device="cuda").manual_seed(0)
    b, heads, groups, s, d = 2, 8, 2, 256, 64
    q = torch.randn(b, heads, s, d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(b, groups, s, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    attention = SimpleNamespace(heads=heads, groups=groups, softmax_scale=d ** -0.5)
    with profile() as prof:
        out = SDPAttention._sdpa(attention, q, k, v, None, True, 0.0)
        torch.cuda.synchronize()
    kernels = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product_")}
    assert kernels and not any("math" in name for name in kernels), kernels
    k64, v64 = (t.double().repeat_interleave(heads // groups, 1) for t in (k, v))
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k64, v64, is_causal=True,
                                                                    scale=d ** -0.5)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
