"""Torch path of the distillation losses vs float64 log_softmax/autograd references (single process)."""
import math

import pytest
import torch

from kd_reference import LargestTensorRecorder, make_logits, reference_loss_and_grad
from megatron_minitron.distill import losses
from megatron_minitron.distill.losses import (dynamic_alpha, hidden_state_loss, logit_kd_loss, masked_mean)

KINDS = ["forward_kl", "reverse_kl", "mse", "cosine"]


def _run(student, teacher, kind, upstream, **kwargs):
    leaf = student.detach().clone().requires_grad_(True)
    teacher_before = teacher.clone()
    loss = logit_kd_loss(leaf, teacher, kind, group=None, backend="torch", **kwargs)
    loss.backward(upstream.to(loss.dtype))
    # the fp32 chunk buffers are modified in place: the inputs must not be
    assert torch.equal(leaf.detach().nan_to_num(), student.nan_to_num())
    assert torch.equal(teacher.nan_to_num(), teacher_before.nan_to_num())
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_tokens", [1, 4, None])
def test_fp32_loss_and_grad_match_float64(kind, chunk_tokens):
    student, teacher = make_logits((5, 3, 37), seed=1)
    upstream = torch.rand(5, 3, generator=torch.Generator().manual_seed(2)) + 0.5
    loss, grad = _run(student, teacher, kind, upstream, chunk_tokens=chunk_tokens)
    ref_loss, ref_grad = reference_loss_and_grad(student, teacher, kind, upstream)
    assert loss.shape == (5, 3) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature,scaled", [(2.5, True), (2.5, False), (0.7, True)])
def test_temperature(kind, temperature, scaled):
    student, teacher = make_logits((11, 29), seed=3)
    upstream = torch.rand(11, generator=torch.Generator().manual_seed(4))
    loss, grad = _run(student, teacher, kind, upstream, temperature=temperature,
                      scale_by_temperature_squared=scaled, chunk_tokens=3)
    ref_loss, ref_grad = reference_loss_and_grad(student, teacher, kind, upstream, temperature=temperature,
                                                 scale_by_temperature_squared=scaled)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_forward_kl_gradient_is_softmax_difference():
    """The analytic form the brief asks for: (softmax(z_s/tau) - softmax(z_t/tau)) / tau, times tau^2."""
    student, teacher = make_logits((6, 19), seed=5)
    tau = 2.0
    _, grad = _run(student, teacher, "forward_kl", torch.ones(6), temperature=tau,
                   scale_by_temperature_squared=True)
    expected = (torch.softmax(student.double() / tau, -1) - torch.softmax(teacher.double() / tau, -1)) * tau
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs(kind):
    student, teacher = make_logits((4, 6, 53), seed=6, dtype=torch.bfloat16)
    upstream = torch.ones(4, 6)
    loss, grad = _run(student, teacher, kind, upstream, chunk_tokens=5)
    # reference from the same bf16 values: the only extra error is fp32 accumulation and the bf16 grad cast
    ref_loss, ref_grad = reference_loss_and_grad(student, teacher, kind, upstream)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_tokens_get_exactly_zero_loss_and_grad(kind):
    student, teacher = make_logits((3, 8, 31), seed=7)
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(8)) > 0.4
    mask[0, 0], mask[0, 1] = True, False
    student[~mask] = float("nan")  # garbage on masked positions must not leak
    teacher[~mask] = float("inf")
    upstream = torch.ones(3, 8)
    loss, grad = _run(student, teacher, kind, upstream, loss_mask=mask.int(), chunk_tokens=5)
    assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask]))
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    ref_loss, ref_grad = reference_loss_and_grad(student[mask], teacher[mask], kind, upstream[mask])
    torch.testing.assert_close(loss[mask].double(), ref_loss, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad[mask].double(), ref_grad, rtol=1e-4, atol=1e-7)


def _fp32_allocation_recorder():
    """Largest fp32 tensor any op produces: the chunking claim, checked rather than assumed."""
    return LargestTensorRecorder(lambda t: t.dtype in (torch.float32, torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_no_full_fp32_copy_of_bf16_logits(kind):
    tokens, vocab, chunk = 64, 96, 8
    student, teacher = make_logits((tokens, vocab), seed=9, dtype=torch.bfloat16)
    leaf = student.clone().requires_grad_(True)
    with _fp32_allocation_recorder() as rec:
        loss = logit_kd_loss(leaf, teacher, kind, group=None, backend="torch", chunk_tokens=chunk)
        masked_mean(loss).backward()
    assert leaf.grad.dtype == torch.bfloat16
    assert rec.largest <= chunk * vocab, (rec.largest, chunk * vocab)


def test_default_chunk_bounds_fp32_elements():
    from megatron_minitron.distill.vocab_parallel import DEFAULT_CHUNK_ELEMENTS, chunk_size_for

    assert chunk_size_for(8192, 128256, None) * 128256 <= DEFAULT_CHUNK_ELEMENTS
    assert chunk_size_for(3, 10, None) == 3
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_size_for(3, 10, 0)


def test_masked_mean():
    x = torch.tensor([1.0, 2.0, float("nan"), 4.0], requires_grad=True)
    mask = torch.tensor([1, 1, 0, 1])
    m = masked_mean(x, mask)
    m.backward()
    assert m.item() == pytest.approx(7.0 / 3)
    assert torch.equal(x.grad, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))
    weights = torch.tensor([0.5, 1.0, 0.0, 2.0])
    assert masked_mean(x.detach(), weights).item() == pytest.approx((0.5 + 2 + 8) / 3.5)
    assert masked_mean(x.detach(), torch.zeros(4)).item() == 0.0
    assert masked_mean(torch.tensor([1.0, 3.0])).item() == 2.0
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(x, torch.ones(3))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_with_projection(kind):
    gen = torch.Generator().manual_seed(10)
    student_h = torch.randn(4, 2, 12, generator=gen, requires_grad=True)
    teacher_h = torch.randn(4, 2, 20, generator=gen, requires_grad=True)
    proj = torch.nn.Linear(12, 20)
    loss = hidden_state_loss(student_h, teacher_h, proj, kind)
    projected = (student_h.double() @ proj.weight.double().t() + proj.bias.double())
    if kind == "mse":
        expected = torch.nn.functional.mse_loss(projected, teacher_h.double(), reduction="none").mean(-1)
    else:
        expected = 1 - torch.nn.functional.cosine_similarity(projected, teacher_h.double(), dim=-1)
    assert loss.shape == (4, 2)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    masked_mean(loss).backward()
    assert proj.weight.grad is not None and student_h.grad is not None
    assert teacher_h.grad is None  # teacher detached


def test_hidden_state_loss_errors():
    with pytest.raises(ValueError, match="projection=nn.Linear"):
        hidden_state_loss(torch.zeros(2, 4), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="nn.Linear\\(4, 6\\)"):
        hidden_state_loss(torch.zeros(2, 4), torch.zeros(2, 6), torch.nn.Linear(4, 5))
    with pytest.raises(ValueError, match="kind"):
        hidden_state_loss(torch.zeros(2, 4), torch.zeros(2, 4), kind="l1")
    same = torch.randn(3, 4)
    assert torch.allclose(hidden_state_loss(same, same, kind="cosine"), torch.zeros(3), atol=1e-6)


def test_dynamic_alpha():
    logit = torch.tensor(3.0, requires_grad=True)
    inter = torch.tensor(0.5, requires_grad=True)
    alpha = dynamic_alpha(logit, inter)
    assert alpha.item() == 6.0 and not alpha.requires_grad
    # alpha * L_is has the value of L_logit and gradient only through L_is
    (alpha * inter).backward()
    assert inter.grad.item() == 6.0 and logit.grad is None
    assert dynamic_alpha(logit, torch.tensor(0.0)).item() == 0.0


def test_argument_errors():
    s, t = make_logits((2, 5), seed=11)
    with pytest.raises(ValueError, match="kind"):
        logit_kd_loss(s, t, "js", group=None)
    with pytest.raises(ValueError, match="same padded vocab"):
        logit_kd_loss(s, t[:, :4], group=None)
    with pytest.raises(ValueError, match="temperature"):
        logit_kd_loss(s, t, temperature=0.0, group=None)
    with pytest.raises(ValueError, match="loss_mask"):
        logit_kd_loss(s, t, loss_mask=torch.ones(3), group=None)
    with pytest.raises(ValueError, match="forward_kl and reverse_kl only"):
        logit_kd_loss(s, t, "mse", backend="triton", group=None)
    with pytest.raises(ValueError, match="backend"):
        logit_kd_loss(s, t, backend="cuda", group=None)
    with pytest.raises(ValueError, match="group"):
        logit_kd_loss(s, t, group="tp")


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(losses, "triton_available", lambda: True)
    assert losses._pick_backend("auto", "forward_kl", torch.device("cuda", 0)) == "triton"
    assert losses._pick_backend("auto", "forward_kl", torch.device("cpu")) == "torch"
    assert losses._pick_backend("auto", "mse", torch.device("cuda", 0)) == "torch"
    assert losses._pick_backend("torch", "reverse_kl", torch.device("cuda", 0)) == "torch"
    monkeypatch.setattr(losses, "triton_available", lambda: False)
    assert losses._pick_backend("auto", "forward_kl", torch.device("cuda", 0)) == "torch"
    with pytest.raises(ValueError, match="pip install triton"):
        losses._pick_backend("triton", "forward_kl", torch.device("cuda", 0))


def test_identical_distributions_give_zero():
    s = torch.randn(7, 33) * 4
    for kind in KINDS:
        loss = logit_kd_loss(s, s.clone(), kind, group=None, backend="torch")
        assert loss.abs().max().item() < 1e-5, kind
    # and the KL is temperature-sensitive in the right direction: high tau flattens both -> smaller KL
    s2, t2 = make_logits((7, 33), seed=12)
    kl1 = logit_kd_loss(s2, t2, group=None, scale_by_temperature_squared=False).mean()
    kl4 = logit_kd_loss(s2, t2, temperature=4.0, group=None, scale_by_temperature_squared=False).mean()
    assert kl4 < kl1 and math.isfinite(kl4.item())
