"""Fused Triton KD-loss kernels, run on CPU under TRITON_INTERPRET=1, vs float64 references."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported (read at @triton.jit time)

import pytest  # noqa: E402
import torch  # noqa: E402

from kd_reference import make_logits, reference_loss_and_grad  # noqa: E402
from megatron_minitron.distill.losses import logit_kd_loss  # noqa: E402

try:
    import triton  # noqa: F401, E402
    from megatron_minitron.distill import kl_triton  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton cannot be imported ({exc}); `pip install --no-deps triton` to run these tests",
                allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# fp32 -> bf16 in the kernel: round-to-nearest on a GPU (relative error <= 2^-8), but the Triton 3.x
# interpreter truncates (<= 2^-7); measured, see test output if this ever changes
BF16_GRAD_RTOL = 2 ** -7 if DEVICE == "cpu" else 2 ** -8


def _run(student, teacher, kind, upstream, backend="triton", **kwargs):
    leaf = student.detach().clone().to(DEVICE).requires_grad_(True)
    loss = logit_kd_loss(leaf, teacher.to(DEVICE), kind, group=None, backend=backend, **kwargs)
    loss.backward(upstream.to(DEVICE, loss.dtype))
    return loss.detach().cpu(), leaf.grad.cpu()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("vocab,block", [(37, 16), (100, 32), (64, 64), (5, 8)])
def test_fp32_matches_float64(kind, vocab, block):
    """Vocab sizes that are not multiples of the block (37/16, 100/32), exactly one block, one partial block."""
    student, teacher = make_logits((3, 4, vocab), seed=vocab)
    upstream = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) + 0.5
    loss, grad = _run(student, teacher, kind, upstream, triton_block=block)
    ref_loss, ref_grad = reference_loss_and_grad(student, teacher, kind, upstream)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=2e-6)
    # p_s - p_t cancels: fp32 absolute error ~ eps * max(p) * upstream
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature,scaled", [(2.0, True), (0.5, False)])
def test_temperature_and_bf16(kind, temperature, scaled):
    student, teacher = make_logits((9, 45), seed=2, dtype=torch.bfloat16)
    upstream = torch.rand(9, generator=torch.Generator().manual_seed(3))
    loss, grad = _run(student, teacher, kind, upstream, temperature=temperature,
                      scale_by_temperature_squared=scaled, triton_block=16)
    ref_loss, ref_grad = reference_loss_and_grad(student, teacher, kind, upstream, temperature=temperature,
                                                 scale_by_temperature_squared=scaled)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=BF16_GRAD_RTOL, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN rows on purpose
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_masked_tokens(kind):
    student, teacher = make_logits((2, 7, 30), seed=4)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    student[~mask] = float("nan")
    teacher[~mask] = float("-inf")
    upstream = torch.ones(2, 7)
    loss, grad = _run(student, teacher, kind, upstream, loss_mask=mask, triton_block=8)
    assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask]))
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    ref_loss, ref_grad = reference_loss_and_grad(student[mask], teacher[mask], kind, upstream[mask])
    torch.testing.assert_close(loss[mask].double(), ref_loss, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad[mask].double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_agrees_with_torch_path_on_strided_input(kind):
    """[s, b, V] viewed as [b, s, V] (non-contiguous rows): both backends see the same tokens."""
    student, teacher = make_logits((5, 3, 40), seed=5)
    student, teacher = student.transpose(0, 1), teacher.transpose(0, 1)
    upstream = torch.rand(3, 5, generator=torch.Generator().manual_seed(6))
    loss_tr, grad_tr = _run(student, teacher, kind, upstream, triton_block=16, temperature=1.5)
    loss_pt, grad_pt = _run(student, teacher, kind, upstream, backend="torch", temperature=1.5)
    torch.testing.assert_close(loss_tr, loss_pt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_tr, grad_pt, rtol=1e-5, atol=1e-7)


def test_partial_stats_of_two_vocab_halves_rescale_to_the_whole():
    """What the TP combine relies on: per-shard (max, shifted sums) rescaled to the global max add up."""
    student, teacher = (t.to(DEVICE) for t in make_logits((6, 50), seed=7))
    for reverse, owners in ((False, [0, 1, 1]), (True, [0, 1, 0])):
        halves = [kl_triton.kl_partial_stats(student[:, sl], teacher[:, sl], 0.8, reverse, block=16)
                  for sl in (slice(0, 23), slice(23, 50))]
        whole_max, whole_sums = kl_triton.kl_partial_stats(student, teacher, 0.8, reverse, block=16)
        global_max = torch.maximum(halves[0][0], halves[1][0])
        combined = sum(sums * torch.exp(local_max - global_max)[owners] for local_max, sums in halves)
        torch.testing.assert_close(global_max, whole_max)
        torch.testing.assert_close(combined, whole_sums, rtol=1e-5, atol=1e-6)


def test_cpu_tensors_need_interpreter(monkeypatch):
    """Outside interpreter mode a CPU call must fail with the fix in the message, not crash in the driver."""
    monkeypatch.setattr(kl_triton, "_kl_partial_stats_kernel", object())
    student, teacher = make_logits((2, 8), seed=8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kl_triton.kl_partial_stats(student, teacher, 1.0, False)
