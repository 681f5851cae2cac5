"""train.fused_adam: set_adam_implementation switches the torch AdamW inside megatron-core's optimizer wrappers
to torch's fused kernel and back, also after a load_state_dict that brings the other choice's flags back. The
reference is a separate AdamW with torch's default (foreach) implementation, stepped on the same gradients."""
import types
from unittest import mock

import pytest
import torch

from megatron_minitron.config import Train
from megatron_minitron.train.optim import set_adam_implementation

GRADS = [[torch.randn(shape, generator=torch.Generator().manual_seed(k)) for shape in ((37, 5), (5,))]
         for k in range(6)]


def params():
    g = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(37, 5, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def adamw(ps, **kw):
    return torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)


def step(opt, ps, k):
    for p, g in zip(ps, GRADS[k]):
        p.grad = g.clone()
    opt.step()


def wrapped(inner):
    """The shape of megatron-core's optimizers: a wrapper holding the torch optimizer as ``.optimizer``."""
    return types.SimpleNamespace(optimizer=inner)


def test_fused_steps_through_the_fused_kernel_and_matches_foreach():
    ours, ref = params(), params()
    opt, ref_opt = adamw(ours), adamw(ref, foreach=True)
    assert set_adam_implementation(wrapped(opt), fused=True) == 1
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["foreach"] is False
    with mock.patch.object(torch, "_fused_adamw_", wraps=torch._fused_adamw_) as fused_kernel:
        for k in range(4):
            step(opt, ours, k)
            step(ref_opt, ref, k)
    assert fused_kernel.call_count == 4
    for p, r, start in zip(ours, ref, params()):
        assert (p - start).abs().max() > 1e-3  # it did step
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert all(opt.state[p]["step"].item() == 4 and opt.state[p]["step"].device == p.device for p in ours)


def test_a_load_brings_back_the_saved_choice_and_the_switch_undoes_it():
    """A checkpoint written fused, resumed with fused_adam off (and the other way): torch's load_state_dict
    restores the saved groups' fused/foreach flags; the switch after the load makes this run's choice win, and
    the continued run matches one that never stopped."""
    for saved_fused in (True, False):
        first, whole = params(), params()
        opt, whole_opt = adamw(first), adamw(whole)
        set_adam_implementation(wrapped(opt), fused=saved_fused)
        for k in range(3):
            step(opt, first, k)
            step(whole_opt, whole, k)
        resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
        resumed_opt = adamw(resumed)
        set_adam_implementation(wrapped(resumed_opt), fused=not saved_fused)
        resumed_opt.load_state_dict(opt.state_dict())
        assert bool(resumed_opt.param_groups[0]["fused"]) is saved_fused  # what the switch is there for
        set_adam_implementation(wrapped(resumed_opt), fused=not saved_fused)
        assert bool(resumed_opt.param_groups[0]["fused"]) is (not saved_fused)
        for p in resumed:
            s = resumed_opt.state[p]["step"]
            assert s.item() == 3 and s.dtype == torch.float32
            assert s.device == (p.device if not saved_fused else torch.device("cpu"))
        with mock.patch.object(torch, "_fused_adamw_", wraps=torch._fused_adamw_) as fused_kernel:
            for k in range(3, 6):
                step(resumed_opt, resumed, k)
                step(whole_opt, whole, k)
        assert fused_kernel.call_count == (0 if saved_fused else 3)
        for p, r in zip(resumed, whole):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_chained_optimizers_and_other_optimizers():
    a, b, c = params(), params(), params()
    chained = types.SimpleNamespace(chained_optimizers=[wrapped(adamw(a)), wrapped(torch.optim.Adam(b)),
                                                         wrapped(torch.optim.SGD(c, lr=0.1))])
    assert set_adam_implementation(chained, fused=True) == 2  # SGD (or Apex's FusedAdam) is left as it is
    assert [o.optimizer.defaults.get("fused") for o in chained.chained_optimizers] == [True, True, None]
    assert set_adam_implementation(chained, fused=False) == 2
    assert [o.optimizer.param_groups[0]["fused"] for o in chained.chained_optimizers[:2]] == [None, None]


def test_fused_adam_must_be_a_bool():
    with pytest.raises(ValueError, match="train.fused_adam"):
        Train(fused_adam="yes").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the step counters' devices differ only on a GPU")
def test_on_cuda_a_foreach_checkpoint_resumes_fused_with_its_counters_on_the_gpu():
    """A foreach state (step counters on the CPU) loaded into a fused run: fused reads them on the GPU, and
    back. Run by benchmarks/gpu_run.sh kernel_tests."""
    on_gpu = [torch.nn.Parameter(p.detach().cuda()) for p in params()]
    foreach = adamw(on_gpu)
    for k in range(2):
        for p, g in zip(on_gpu, GRADS[k]):
            p.grad = g.cuda()
        foreach.step()
    assert all(foreach.state[p]["step"].device.type == "cpu" for p in on_gpu)
    fused = adamw(on_gpu)
    fused.load_state_dict(foreach.state_dict())
    set_adam_implementation(wrapped(fused), fused=True)
    assert all(fused.state[p]["step"].device == p.device for p in on_gpu)
    for p, g in zip(on_gpu, GRADS[2]):
        p.grad = g.cuda()
    fused.step()
    back = adamw(on_gpu, fused=True)
    back.load_state_dict(fused.state_dict())
    set_adam_implementation(wrapped(back), fused=False)
    assert all(back.state[p]["step"].device.type == "cpu" and back.state[p]["step"].item() == 3 for p in on_gpu)


def test_grad_norm_and_clip_through_megatron_use_the_foreach_kernels(monkeypatch):
    """megatron-core's own get_grad_norm_fp32 / clip_grad_by_total_norm_fp32, once install_multi_tensor_ops
    has replaced their TE-less fallbacks: the norm and the clipped gradients against float64 by hand, through
    torch's multi-tensor kernels, the clip in place."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from megatron_minitron.runtime.distributed import init_distributed
    from megatron_minitron.train.optim import foreach_l2_norm, foreach_scale, install_multi_tensor_ops

    init_distributed(1, 1)
    if clip_grads.l2_norm_impl not in (utils.local_multi_tensor_l2_norm, foreach_l2_norm):
        pytest.skip("Transformer Engine or Apex provides megatron's multi-tensor kernels here")
    install_multi_tensor_ops()
    install_multi_tensor_ops()  # idempotent
    assert clip_grads.l2_norm_impl is foreach_l2_norm and clip_grads.multi_tensor_scale_impl is foreach_scale
    g = torch.Generator().manual_seed(7)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces the norm on a GPU (kernel_tests)
    grads = [torch.randn(shape, generator=g).to(device) for shape in ((300, 17), (17,), (5, 3, 2))]
    expected = sum(t.double().pow(2).sum() for t in grads).sqrt()
    calls = []
    real_norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: calls.append(len(ts)) or real_norm(ts, *a, **k))
    norm = clip_grads.get_grad_norm_fp32(grads)
    assert calls == [3]
    assert abs(norm - expected.item()) <= 1e-5 * expected.item()
    # megatron's own fallback gives the same number
    reference, _ = utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    assert abs(reference.item() - norm) <= 1e-5 * norm
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(params, grads):
        p.grad = t.clone()
    storages = [p.grad.data_ptr() for p in params]
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=norm)
    coeff = 0.5 / (norm + 1e-6)
    for p, t, ptr in zip(params, grads, storages):
        torch.testing.assert_close(p.grad.double(), t.double() * coeff, rtol=1e-6, atol=0)
        assert p.grad.data_ptr() == ptr  # scaled in place


def test_foreach_scale_copies_between_different_lists():
    from megatron_minitron.train.optim import foreach_scale

    src = [torch.arange(6.0), torch.ones(2, 2)]
    dst = [torch.zeros(6, dtype=torch.bfloat16), torch.zeros(2, 2)]
    foreach_scale(2048, None, [src, dst], 1.0)
    assert torch.equal(dst[0].float(), src[0]) and torch.equal(dst[1], src[1])
    foreach_scale(2048, None, [src, dst], 0.5)
    assert torch.equal(dst[0].float(), src[0] * 0.5) and torch.equal(src[0], torch.arange(6.0))
