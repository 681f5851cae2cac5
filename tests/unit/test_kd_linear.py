"""KD loss fused with the output layer (distill/kd_linear.py, distill/kd_linear_triton.py) vs a float64
reference built from full logits + log_softmax + autograd, and vs the unfused path in bf16."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from kd_reference import LargestTensorRecorder  # noqa: E402
from linear_kd_reference import make_linear_inputs, reference_linear_kd  # noqa: E402
from megatron_minitron.distill.kd_linear import LinearKDOutput, linear_kd_loss  # noqa: E402
from megatron_minitron.distill.losses import logit_kd_loss, triton_available  # noqa: E402

SEQ, BATCH, H_S, H_T, VOCAB = 4, 3, 8, 12, 37  # 12 tokens in chunks of 5; 37 = 2 blocks of 16 + a partial one
# TRITON_INTERPRET=0 on a GPU machine: the same tests on CUDA tensors, kernels compiled (gpu_run.sh kernel_tests)
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and TRITON_INTERPRET=1 or a GPU")


@pytest.fixture
def small_triton_block():
    if not triton_available():
        yield
        return
    from megatron_minitron.distill.kd_linear_triton import TritonTileEpilogue

    TritonTileEpilogue.block = 16  # several vocab blocks per row
    yield
    TritonTileEpilogue.block = None


def run_fused(inputs, kind, backend, upstream=1.0, with_labels=True, **kwargs):
    h_s, w_s, h_t, w_t, labels, weights = (x.to(DEVICE) for x in inputs)
    hidden = h_s.reshape(SEQ, BATCH, H_S).clone().requires_grad_(True)  # megatron's [s, b, h] layout
    weight = w_s.clone().requires_grad_(True)
    out = linear_kd_loss(hidden, weight, h_t.reshape(SEQ, BATCH, H_T), w_t, kind,
                         loss_mask=weights.reshape(SEQ, BATCH),
                         labels=labels.reshape(SEQ, BATCH) if with_labels else None,
                         group=None, backend=backend, chunk_tokens=5, **kwargs)
    (out.loss * upstream).backward()
    assert out.kd.shape == (SEQ, BATCH) and hidden.grad.dtype == h_s.dtype and weight.grad.dtype == w_s.dtype
    out = LinearKDOutput(out.loss.cpu(), out.kd.cpu(), out.lm.cpu() if out.lm is not None else None)
    return out, hidden.grad.reshape(-1, H_S).cpu(), weight.grad.cpu()


def check_against_reference(inputs, out, grad_h, grad_w, kind, upstream, with_labels, rtol, atol, **kwargs):
    h_s, w_s, h_t, w_t, labels, weights = inputs
    kd, lm, total, ref_h, ref_w = reference_linear_kd(h_s, w_s, h_t, w_t, kind, token_weight=weights,
                                                      labels=labels if with_labels else None, **kwargs)
    close = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(out.kd.reshape(-1).double(), kd, **close)
    torch.testing.assert_close(out.loss.double(), total, **close)
    if with_labels:
        torch.testing.assert_close(out.lm.reshape(-1).double(), lm, **close)
    else:
        assert out.lm is None
    scale = max(ref_w.abs().max().item(), ref_h.abs().max().item())
    torch.testing.assert_close(grad_h.double(), ref_h * upstream, rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(grad_w.double(), ref_w * upstream, rtol=rtol, atol=atol * scale)
    masked = weights == 0
    assert masked.any()
    assert torch.equal(out.kd.reshape(-1)[masked], torch.zeros(int(masked.sum())))
    assert torch.equal(grad_h[masked], torch.zeros_like(grad_h[masked]))  # exact zeros for masked tokens


CASES = [  # kind, temperature, scale_by_temperature_squared, labels, kd_weight, lm_weight
    ("forward_kl", 1.0, True, True, 1.0, 0.5),
    ("reverse_kl", 1.0, True, True, 0.7, 0.3),
    ("forward_kl", 1.7, False, True, 1.0, 0.25),
    ("reverse_kl", 2.0, True, False, 1.0, 0.0),
    ("forward_kl", 1.5, True, True, 0.0, 1.0),  # LM only (reported KD, no KD gradient)
    ("forward_kl", 1.3, True, True, 1.0, 0.0),  # LM reported only (no LM gradient)
]


@pytest.mark.parametrize("kind,tau,scale,with_labels,kd_weight,lm_weight", CASES)
def test_torch_fp32_matches_float64(kind, tau, scale, with_labels, kd_weight, lm_weight):
    inputs = make_linear_inputs(SEQ * BATCH, H_S, H_T, VOCAB, seed=len(kind) + int(10 * tau))
    kwargs = dict(temperature=tau, scale_by_temperature_squared=scale, kd_weight=kd_weight, lm_weight=lm_weight)
    out, grad_h, grad_w = run_fused(inputs, kind, "torch", upstream=1.3, with_labels=with_labels, **kwargs)
    check_against_reference(inputs, out, grad_h, grad_w, kind, 1.3, with_labels, rtol=2e-5, atol=2e-6, **kwargs)


@needs_triton
@pytest.mark.parametrize("kind,tau,scale,with_labels,kd_weight,lm_weight", [CASES[0], CASES[2], CASES[3]])
def test_triton_fp32_matches_float64(small_triton_block, kind, tau, scale, with_labels, kd_weight, lm_weight):
    inputs = make_linear_inputs(SEQ * BATCH, H_S, H_T, VOCAB, seed=50 + int(10 * tau))
    kwargs = dict(temperature=tau, scale_by_temperature_squared=scale, kd_weight=kd_weight, lm_weight=lm_weight)
    out, grad_h, grad_w = run_fused(inputs, kind, "triton", upstream=0.8, with_labels=with_labels, **kwargs)
    check_against_reference(inputs, out, grad_h, grad_w, kind, 0.8, with_labels, rtol=2e-5, atol=2e-6, **kwargs)


def unfused_bf16(inputs, kind, temperature, kd_weight, lm_weight):
    """The path the fused one replaces: bf16 logits from F.linear, the chunked KL, fp32 CE, autograd."""
    h_s, w_s, h_t, w_t, labels, weights = (x.to(DEVICE) for x in inputs)
    hidden, weight = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    z_s = torch.nn.functional.linear(hidden, weight)
    z_t = torch.nn.functional.linear(h_t, w_t)
    kd = logit_kd_loss(z_s, z_t, kind, temperature=temperature, loss_mask=weights, group=None, backend="torch")
    lm = torch.nn.functional.cross_entropy(z_s.float(), labels, reduction="none")
    lm = torch.where(weights != 0, lm, torch.zeros_like(lm))
    (kd_weight * (kd * weights).sum() + lm_weight * (lm * weights).sum()).backward()
    return kd.detach().cpu(), lm.detach().cpu(), hidden.grad.cpu(), weight.grad.cpu()


@pytest.mark.parametrize("backend,kind,tau", [
    ("torch", "forward_kl", 1.0), ("torch", "reverse_kl", 1.5),
    pytest.param("triton", "reverse_kl", 1.5, marks=needs_triton)])
def test_bf16_within_bf16_error(small_triton_block, backend, kind, tau):
    inputs = make_linear_inputs(SEQ * BATCH, H_S, H_T, VOCAB, seed=7, dtype=torch.bfloat16)
    kwargs = dict(temperature=tau, kd_weight=0.7, lm_weight=0.4)
    out, grad_h, grad_w = run_fused(inputs, kind, backend, **kwargs)
    # vs float64 of the same (bf16-valued) inputs: the logits themselves are rounded to bf16 (2^-8)
    h_s, w_s, h_t, w_t, labels, weights = inputs
    kd, lm, _, ref_h, ref_w = reference_linear_kd(h_s, w_s, h_t, w_t, kind, temperature=tau, token_weight=weights,
                                                  labels=labels, kd_weight=0.7, lm_weight=0.4)

    def relative(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for name, value, expected in (("kd", out.kd.reshape(-1), kd), ("lm", out.lm.reshape(-1), lm),
                                  ("grad_h", grad_h, ref_h), ("grad_w", grad_w, ref_w)):
        assert relative(value, expected) < 2e-2, name
    # vs the unfused bf16 path: the same bf16 logits, so the losses agree to fp32 rounding
    kd_u, lm_u, grad_h_u, grad_w_u = unfused_bf16(inputs, kind, tau, 0.7, 0.4)
    torch.testing.assert_close(out.kd.reshape(-1), kd_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.lm.reshape(-1), lm_u, rtol=1e-5, atol=1e-5)
    assert relative(grad_h, grad_h_u) < 1e-2 and relative(grad_w, grad_w_u) < 1e-2


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_student_with_fp32_teacher(small_triton_block, backend):
    """distill.teacher_precision=fp32 under a bf16 student: each model's logits keep their own dtype."""
    inputs = make_linear_inputs(SEQ * BATCH, H_S, H_T, VOCAB, seed=9)
    inputs[0], inputs[1] = inputs[0].bfloat16(), inputs[1].bfloat16()
    out, grad_h, grad_w = run_fused(inputs, "forward_kl", backend, temperature=1.5, lm_weight=0.3)
    h_s, w_s, h_t, w_t, labels, weights = inputs
    kd, lm, _, ref_h, ref_w = reference_linear_kd(h_s, w_s, h_t, w_t, "forward_kl", temperature=1.5,
                                                  token_weight=weights, labels=labels, lm_weight=0.3)
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    for name, value, expected in (("kd", out.kd.reshape(-1), kd), ("lm", out.lm.reshape(-1), lm),
                                  ("grad_h", grad_h, ref_h), ("grad_w", grad_w, ref_w)):
        error = ((value.double() - expected).norm() / expected.norm()).item()
        assert error < 2e-2, (name, error)  # the student's logits are bf16 (2^-8)


def test_no_grad_reports_losses_without_gradients():
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulCounter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                MatmulCounter.calls += 1
            return func(*args, **(kwargs or {}))

    h_s, w_s, h_t, w_t, labels, weights = make_linear_inputs(SEQ * BATCH, H_S, H_T, VOCAB, seed=3)
    h_s, w_s = h_s.requires_grad_(True), w_s.requires_grad_(True)  # as in validation: trainable, grad off
    chunk = 5
    with torch.no_grad(), MatmulCounter():
        out = linear_kd_loss(h_s, w_s, h_t, w_t, labels=labels, loss_mask=weights, group=None, backend="torch",
                             chunk_tokens=chunk)
    chunks = -(-SEQ * BATCH // chunk)
    assert MatmulCounter.calls == 2 * chunks  # both logit GEMMs per chunk, no gradient GEMMs
    kd, lm, total, _, _ = reference_linear_kd(h_s, w_s, h_t, w_t, "forward_kl", token_weight=weights, labels=labels)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.kd.double(), kd, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out.lm.double(), lm, rtol=2e-5, atol=2e-6)


def test_user_errors_raise_value_error():
    h_s, w_s, h_t, w_t, labels, weights = make_linear_inputs(6, H_S, H_T, VOCAB, seed=4)
    call = dict(group=None, backend="torch")
    with pytest.raises(ValueError, match="need the logits"):
        linear_kd_loss(h_s, w_s, h_t, w_t, "mse", **call)
    with pytest.raises(ValueError, match="same dtype"):
        linear_kd_loss(h_s, w_s.double(), h_t, w_t, **call)
    with pytest.raises(ValueError, match="same \\(padded\\) vocabulary"):
        linear_kd_loss(h_s, w_s, h_t, w_t[:-1], **call)
    with pytest.raises(ValueError, match="needs labels"):
        linear_kd_loss(h_s, w_s, h_t, w_t, lm_weight=1.0, **call)
    bad = labels.clone()
    bad[0] = VOCAB
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        linear_kd_loss(h_s, w_s, h_t, w_t, labels=bad, **call)
    # a masked token may carry an ignore index
    mask = torch.ones(6)
    mask[0] = 0
    linear_kd_loss(h_s, w_s, h_t, w_t, labels=bad, loss_mask=mask, **call)
    with pytest.raises(ValueError, match="one entry per token"):
        linear_kd_loss(h_s, w_s, h_t, w_t, loss_mask=torch.ones(5), **call)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_tile_epilogues_count_zero_probability_terms_as_zero(small_triton_block, backend, kind):
    """The epilogues themselves on logits holding -inf (a padded vocabulary, top-k / masked columns): finite KL
    and gradient equal to the reference on the finite columns (GEMM logits are finite; the property is kept)."""
    from kd_reference import make_logits, reference_kl_with_neg_inf, with_neg_inf
    from megatron_minitron.distill.kd_linear import TorchTileEpilogue, sum_owners
    from megatron_minitron.distill.kl_torch import kl_from_global_stats
    from megatron_minitron.distill.vocab_parallel import combine_partial_softmax_stats

    epilogue = TorchTileEpilogue
    if backend == "triton":
        from megatron_minitron.distill.kd_linear_triton import TritonTileEpilogue as epilogue
    tau, reverse = 1.4, kind == "reverse_kl"
    student, teacher = with_neg_inf(*make_logits((6, VOCAB), seed=11), kind, seed=12)
    upstream = torch.rand(6, generator=torch.Generator().manual_seed(13)) + 0.5
    s, t = student.clone().to(DEVICE), teacher.clone().to(DEVICE)
    local_max, local_sums = epilogue.partial_stats(s, t, None, 1 / tau, reverse, None)
    global_max, global_sums = combine_partial_softmax_stats(local_max, local_sums, sum_owners(reverse, None), None)
    kl, lse_s, lse_t = kl_from_global_stats(global_max, global_sums, reverse)
    grad = epilogue.grad_(s, t, None, lse_s, lse_t, kl, (upstream * tau).to(DEVICE), None, None, 1 / tau, reverse)
    ref_loss, ref_grad = reference_kl_with_neg_inf(student, teacher, kind, upstream, temperature=tau)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    torch.testing.assert_close((kl * tau ** 2).cpu().double(), ref_loss, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-6)


def _floating_point_recorder():
    """Largest floating-point tensor any op produces: the 'no [T, V] logits' claim, checked rather than assumed
    (integer tensors are skipped: the Triton interpreter copies kernel arguments as byte tensors)."""
    return LargestTensorRecorder(lambda t: t.is_floating_point())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_never_materialises_token_by_vocab_logits(small_triton_block, backend):
    tokens, vocab, chunk = 32, 96, 8
    h_s, w_s, h_t, w_t, labels, weights = (x.to(DEVICE) for x in make_linear_inputs(tokens, H_S, H_T, vocab, seed=6))
    hidden, weight = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    with _floating_point_recorder() as recorder:
        out = linear_kd_loss(hidden, weight, h_t, w_t, labels=labels, loss_mask=weights, lm_weight=0.5,
                             temperature=1.5, group=None, backend=backend, chunk_tokens=chunk)
        out.loss.backward()
    # the inputs / gradients themselves ([V, H_t] weight, [T, H_t] states) and one [chunk, V] buffer at most
    bound = max(chunk * vocab, vocab * H_T, tokens * H_T)
    assert bound < tokens * vocab
    assert recorder.largest <= bound, (recorder.largest, bound)


def test_second_backward_raises():
    h_s, w_s, h_t, w_t, _, _ = make_linear_inputs(6, H_S, H_T, VOCAB, seed=8)
    hidden = h_s.clone().requires_grad_(True)
    out = linear_kd_loss(hidden, w_s, h_t, w_t, group=None, backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        out.loss.backward()
