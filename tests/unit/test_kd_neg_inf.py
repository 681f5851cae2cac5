"""KD losses with -inf logits (a vocabulary padded or masked with -inf, top-k teacher logits): every backend
must give the float64 reference value with zero-probability terms counted as 0, and finite gradients.
IEEE arithmetic alone gives NaN there (0 * inf, (-inf) - (-inf))."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from kd_reference import make_logits, reference_kl_with_neg_inf, with_neg_inf  # noqa: E402
from megatron_minitron.distill.losses import logit_kd_loss, triton_available  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


def _loss_and_grad(student, teacher, kind, upstream, backend, **kwargs):
    leaf = student.detach().clone().requires_grad_(True)
    loss = logit_kd_loss(leaf, teacher, kind, group=None, backend=backend, chunk_tokens=3, triton_block=16,
                         **kwargs)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_logits_match_reference(backend, kind, dtype):
    student, teacher = make_logits((5, 2, 41), seed=7, dtype=dtype)
    student, teacher = with_neg_inf(student, teacher, kind, seed=8)
    upstream = torch.rand(5, 2, generator=torch.Generator().manual_seed(9)) + 0.5
    kwargs = dict(temperature=1.5, scale_by_temperature_squared=True)
    loss, grad = _loss_and_grad(student, teacher, kind, upstream, backend, **kwargs)
    ref_loss, ref_grad = reference_kl_with_neg_inf(student, teacher, kind, upstream, **kwargs)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=5e-6)
    grad_rtol = 1e-4 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=1e-6)
    assert torch.equal(grad[torch.isinf(student)], torch.zeros_like(grad[torch.isinf(student)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mass_where_the_other_side_has_none_is_infinite_not_nan(backend):
    """Forward KL with the student -inf where the teacher has mass is +inf, mathematically; never NaN."""
    student, teacher = make_logits((4, 23), seed=3)
    student[:, 5] = float("-inf")
    loss, _ = _loss_and_grad(student, teacher, "forward_kl", torch.ones(4), backend)
    assert torch.isposinf(loss).all(), loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_of_neg_inf_stay_zero(backend):
    """A masked-out row may be all -inf (e.g. padding positions): it gets exactly 0 loss and gradient."""
    student, teacher = make_logits((4, 19), seed=4)
    student[1], teacher[1] = float("-inf"), float("-inf")
    mask = torch.tensor([True, False, True, True])
    leaf = student.clone().requires_grad_(True)
    loss = logit_kd_loss(leaf, teacher, "reverse_kl", group=None, backend=backend, loss_mask=mask, triton_block=16)
    loss.sum().backward()
    assert loss[1] == 0 and torch.isfinite(loss).all()
    assert torch.equal(leaf.grad[1], torch.zeros_like(leaf.grad[1])) and torch.isfinite(leaf.grad).all()
