"""Fused produce-and-quantize FP8 kernels (kernels.fp8_fused): the e4m3 rounding trick vs torch's cast, the
Triton kernels (CPU, TRITON_INTERPRET=1) vs the torch reference, both vs float64 math done here by hand.
On a GPU machine `TRITON_INTERPRET=0 python -m pytest tests/unit/test_fp8_fused.py` runs the compiled kernels
(`bash benchmarks/gpu_run.sh kernel_tests`)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_minitron.kernels import fp8_fused  # noqa: E402
from megatron_minitron.kernels.fp8_fused import (attention_output_quantize, norm_quantize, quantize_rows,  # noqa: E402
                                                 round_to_e4m3_grid, swiglu_quantize)

E4M3 = torch.float8_e4m3fn
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
HAVE_TRITON = fp8_fused.triton is not None and (DEVICE == "cpu" or torch.cuda.is_available())
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton cannot be imported (or no GPU and "
                                                           "TRITON_INTERPRET is not 1)")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bits(t):
    return t.float().view(torch.int32)


def _rounding_cases() -> torch.Tensor:
    """fp32 values in [-448, 448]: every e4m3 value, every tie between neighbours (exponent carries, ties to
    odd and even) and the fp32 values either side of it, subnormals, random values, signed zeros."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    grid = grid[torch.isfinite(grid)].unique()  # drops NaN, merges +-0
    ties = (grid[1:] + grid[:-1]) / 2  # exact in fp32
    around = torch.cat([torch.nextafter(ties, torch.full_like(ties, 1e9)),
                        torch.nextafter(ties, torch.full_like(ties, -1e9))]).clamp(-448, 448)
    log_uniform = torch.exp2(torch.rand(20000, generator=_gen(0)) * 18.8 - 10)  # 2^-10 .. 448
    signs = torch.where(torch.rand(20000, generator=_gen(1)) < 0.5, -1.0, 1.0)
    subnormal = (torch.rand(4000, generator=_gen(2)) * 2 - 1) * 2.0 ** -6
    edges = torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0 ** -6, -(2.0 ** -6), 2.0 ** -9, 2.0 ** -10,
                          -(2.0 ** -10), 1e-30, -1e-30, 3 * 2.0 ** -11])
    return torch.cat([grid, ties, around, (log_uniform * signs).clamp(-448, 448), subnormal, edges])


def test_round_to_e4m3_grid_matches_torch_cast():
    v = _rounding_cases()
    expected = v.to(E4M3).float()
    got = round_to_e4m3_grid(v)
    bad = _bits(got) != _bits(expected)  # bitwise: -0.0 must stay -0.0
    assert not bad.any(), list(zip(v[bad][:8].tolist(), got[bad][:8].tolist(), expected[bad][:8].tolist()))


@needs_triton
def test_triton_rounding_matches_torch_cast():
    """Each row holds 448, so its scale is exactly 1 and the kernel's q is its rounding of the input itself."""
    v = _rounding_cases()
    v = torch.cat([v, torch.zeros(-len(v) % 255)]).view(-1, 255)
    rows = torch.cat([v, torch.full((v.shape[0], 1), 448.0)], dim=1)
    q, scale = quantize_rows(rows.to(DEVICE), backend="triton", block=128)
    assert (scale.cpu() == 1).all()
    assert torch.equal(q.cpu().view(torch.uint8), rows.to(E4M3).view(torch.uint8))


# ---------------------------------------------------------------------------------------------------------
# float64 references, written out here rather than taken from the module

def _norm64(x, weight, bias, eps, kind, zero_centered):
    x = x.double().reshape(-1, x.shape[-1])
    g = weight.double() + 1 if zero_centered else weight.double()
    if kind == "RMSNorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g
    centered = x - x.mean(-1, keepdim=True)
    y = centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + eps) * g
    return y if bias is None else y + bias.double()


def _swiglu64(x):
    x = x.double().reshape(-1, x.shape[-1])
    f = x.shape[-1] // 2
    gate, up = x[:, :f], x[:, f:]
    return gate / (1 + torch.exp(-gate)) * up


def _attention64(out):
    b, h, s, d = out.shape
    y = torch.empty(s, b, h * d, dtype=torch.float64)
    for si in range(s):
        for bi in range(b):
            y[si, bi] = out[bi, :, si, :].double().reshape(-1)
    return y.reshape(s * b, h * d)


def _assert_close_to_float64(q, scale, y64):
    """e4m3 keeps 3 mantissa bits: |error| <= 2^-4 |y| for normal values, half of 2^-9 * scale for subnormal
    ones (bounded here by the full step); each nonzero row's largest |y| lands on exactly +-448."""
    q, scale = q.cpu(), scale.cpu()
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (y64.shape[0], 1)
    dq = q.double() * scale.double()
    bound = 2.0 ** -4 * y64.abs() + scale.double() * 2.0 ** -9 + 1e-6 * y64.abs()  # + fp32 error in y
    err = (dq - y64).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    amax = y64.abs().amax(-1)
    nonzero = amax > 0
    peak = y64.abs().argmax(-1, keepdim=True)
    at_peak = q.float().gather(-1, peak).squeeze(-1).double()
    sign = y64.gather(-1, peak).squeeze(-1).sign()
    assert torch.equal(at_peak[nonzero], 448.0 * sign[nonzero])
    torch.testing.assert_close(scale.squeeze(-1).double()[nonzero], amax[nonzero] / 448, rtol=1e-5, atol=0)
    assert (scale.squeeze(-1)[~nonzero] == 1).all() and (q.float()[~nonzero] == 0).all()


def _assert_matches_reference(q, scale, q_ref, scale_ref):
    """Triton vs torch: bit-identical except where fp32 y, computed in another order, sits within an ulp of a
    rounding tie: then one e4m3 step apart at most, and rarely."""
    q, scale = q.cpu(), scale.cpu()
    assert q.shape == q_ref.shape and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    ref = q_ref.float()
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -6))) - 3)  # 2^-9 for subnormals
    assert ((q.float() - ref).abs() <= ulp).all()
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same >= 0.99, f"only {same:.4f} of the elements are bit-identical"


def _randn(shape, seed, dtype=torch.float32, scale=2.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale + 0.3).to(dtype)


NORM_CASES = [  # kind, bias, zero-centered gamma, dtype
    ("RMSNorm", False, False, torch.float32),
    ("RMSNorm", False, True, torch.bfloat16),
    ("LayerNorm", True, False, torch.float32),
    ("LayerNorm", True, True, torch.bfloat16),
    ("LayerNorm", False, False, torch.bfloat16),
]
SHAPES = [((3, 7, 300), 64), ((5, 48), None), ((37, 130), None)]  # (x shape, block): 5 chunks / 1 / 1 masked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("kind,has_bias,zero_centered,dtype", NORM_CASES)
def test_norm_quantize(kind, has_bias, zero_centered, dtype, shape, block, backend):
    n = shape[-1]
    x = _randn(shape, 1, dtype)
    x.view(-1, n)[2].zero_()  # an all-zero row: RMSNorm / bias-free LayerNorm give y = 0 -> scale 1, q = 0
    weight = _randn(n, 2, dtype, scale=0.5) + (0 if zero_centered else 1)
    bias = _randn(n, 3, dtype, scale=0.2) if has_bias else None
    q, scale = norm_quantize(x.to(DEVICE), weight.to(DEVICE), None if bias is None else bias.to(DEVICE), 1e-5,
                             kind, zero_centered, backend=backend, block=block)
    assert q.shape == (x.numel() // n, n) and q.is_contiguous()
    _assert_close_to_float64(q, scale, _norm64(x, weight, bias, 1e-5, kind, zero_centered))
    if backend == "triton":
        _assert_matches_reference(q, scale, *norm_quantize(x, weight, bias, 1e-5, kind, zero_centered,
                                                           backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block", [((3, 7, 2 * 150), 32), ((37, 2 * 48), None)])
def test_swiglu_quantize(shape, block, dtype, backend):
    x = _randn(shape, 4, dtype, scale=3.0)
    x.view(-1, shape[-1])[1].zero_()
    q, scale = swiglu_quantize(x.to(DEVICE), backend=backend, block=block)
    assert q.shape == (x.numel() // shape[-1], shape[-1] // 2)
    _assert_close_to_float64(q, scale, _swiglu64(x))
    if backend == "triton":
        _assert_matches_reference(q, scale, *swiglu_quantize(x, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bshd,block", [((2, 5, 3, 24), 64), ((3, 4, 6, 16), None)])
def test_attention_output_quantize(bshd, block, dtype, backend):
    """SDPA's [b, h, s, d] output as a non-contiguous permute of [b, s, h, d], and a contiguous one; d = 24 is
    not a power of two, block 64 spreads the heads over several steps."""
    b, s, h, d = bshd
    base = _randn(bshd, 5, dtype)
    base[1, 2].zero_()  # token (s=2, b=1): an all-zero row
    for out in (base.permute(0, 2, 1, 3), base.permute(0, 2, 1, 3).contiguous()):
        q, scale = attention_output_quantize(out.to(DEVICE), backend=backend, block=block)
        assert q.shape == (s, b, h * d) and q.is_contiguous() and scale.shape == (s * b, 1)
        _assert_close_to_float64(q.reshape(s * b, h * d), scale, _attention64(out))
        if backend == "triton":
            q_ref, scale_ref = attention_output_quantize(out, backend="torch")
            _assert_matches_reference(q.reshape(s * b, -1), scale, q_ref.reshape(s * b, -1), scale_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [32, None], ids=["3 chunks", "one chunk"])
def test_quantize_rows(dtype, backend, block):
    x = _randn((4, 5, 77), 6, dtype, scale=10.0)
    x[0, 3].zero_()
    x_strided = torch.stack([x, -x], dim=-1).flatten(-2)[..., ::2] if dtype == torch.float32 else x  # stride 2
    q, scale = quantize_rows(x_strided.to(DEVICE), backend=backend, block=block)
    _assert_close_to_float64(q, scale, x.double().reshape(-1, 77))
    if backend == "triton":
        q_ref, scale_ref = quantize_rows(x, backend="torch")
        assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale.cpu(), scale_ref)


def test_torch_reference_is_fp8_quantize_token():
    """The generic path is exactly kernels.fp8.quantize_fp8(x, "token") on the rows."""
    from megatron_minitron.kernels.fp8 import quantize_fp8

    x = _randn((6, 40), 7)
    q, scale = quantize_rows(x, backend="torch")
    q_ref, scale_ref = quantize_fp8(x, "token")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)


@needs_triton
def test_auto_backend(monkeypatch):
    x = torch.zeros(2, 8)
    assert fp8_fused._use_triton(x.to(DEVICE), "auto")
    assert not fp8_fused._use_triton(x, "torch")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not fp8_fused._use_triton(x, "auto")


@pytest.mark.parametrize("call,match", [
    (lambda: swiglu_quantize(torch.zeros(3, 7)), "even"),
    (lambda: norm_quantize(torch.zeros(3, 8), torch.ones(7)), "weight"),
    (lambda: norm_quantize(torch.zeros(3, 8), torch.ones(8), torch.zeros(7), kind="LayerNorm"), "bias"),
    (lambda: norm_quantize(torch.zeros(3, 8), torch.ones(8), torch.zeros(8)), "RMSNorm has no bias"),
    (lambda: norm_quantize(torch.zeros(3, 8), torch.ones(8), kind="BatchNorm"), "kind"),
    (lambda: attention_output_quantize(torch.zeros(2, 3, 8)), "4-D"),
    (lambda: quantize_rows(torch.zeros(3, 0)), "non-empty"),
    (lambda: quantize_rows(torch.zeros(3, 4, dtype=torch.int32)), "floating point"),
    (lambda: quantize_rows(torch.zeros(3, 4), backend="cuda"), "backend"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@needs_triton
def test_block_must_be_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        quantize_rows(torch.ones(2, 8, device=DEVICE), backend="triton", block=24)
