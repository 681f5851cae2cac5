"""Aggregation of activations: hand-computed values and incremental == one-shot."""
import itertools
import math

import pytest
import torch

from megatron_minitron.prune.aggregate import AGGREGATIONS, RunningAggregate, aggregate, aggregate_sequence


def test_hand_computed_values():
    # one unit, two samples of three tokens: [s=3, b=2, n=1]
    x = torch.tensor([[1.0, 2.0], [2.0, 2.0], [3.0, 5.0]]).unsqueeze(-1)
    # sequence mean per sample: 2, 3; l2: sqrt(14), sqrt(33); var: 2/3, 2
    assert aggregate(x, "mean", "mean").item() == pytest.approx(2.5)
    assert aggregate(x, "l2", "mean").item() == pytest.approx(math.sqrt(4 + 9))
    assert aggregate(x, "var", "mean").item() == pytest.approx((4 + 9) / 2 - 2.5 ** 2)
    assert aggregate(x, "mean", "l2").item() == pytest.approx((math.sqrt(14) + math.sqrt(33)) / 2)
    assert aggregate(x, "l2", "var").item() == pytest.approx(math.sqrt((2 / 3) ** 2 + 4))
    assert aggregate(x, "mean", "var").item() == pytest.approx((2 / 3 + 2) / 2)


@pytest.mark.parametrize("batch,sequence", list(itertools.product(AGGREGATIONS, AGGREGATIONS)))
def test_incremental_equals_one_shot(batch, sequence):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 10, 5, generator=g)  # [s, b, n]
    one_shot = aggregate(x, batch, sequence)
    # per-axis reference written with plain torch ops
    seq = {"mean": x.double().mean(0), "l2": x.double().norm(dim=0),
           "var": x.double().var(0, unbiased=False)}[sequence]
    ref = {"mean": seq.mean(0), "l2": seq.norm(dim=0), "var": seq.var(0, unbiased=False)}[batch]
    torch.testing.assert_close(one_shot, ref)
    # three uneven batches, two "ranks" whose states are summed
    a, b = RunningAggregate(sequence), RunningAggregate(sequence)
    a.update(x[:, :3])
    b.update(x[:, 3:4])
    a.update(x[:, 4:])
    merged = RunningAggregate.finalize_state(a.state() + b.state(), batch)
    torch.testing.assert_close(merged, one_shot)


def test_batch_first_layout_and_errors():
    x = torch.randn(4, 6, 3)  # [b, s, n]
    r = RunningAggregate("l2")
    r.update(x, seq_dim=1, batch_dim=0)
    torch.testing.assert_close(r.result("l2"), aggregate(x.transpose(0, 1), "l2", "l2"))
    with pytest.raises(ValueError, match="choose one of"):
        aggregate(x, "median", "mean")


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_half_precision_input_reduces_in_fp32_close_to_float64(how):
    """bf16 activations (the GPU case) are reduced with fp32 accumulation, no float64 copy: the result is
    float64 and agrees with the float64 reduction of the same bf16 values to ~1e-6 relative."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(512, 3, 40, generator=g) * 4 + 1).bfloat16()
    out = aggregate_sequence(x, how)
    ref = {"mean": x.double().mean(0), "l2": x.double().norm(dim=0),
           "var": x.double().var(0, unbiased=False)}[how]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", AGGREGATIONS)
def test_magnitude_equals_aggregating_the_absolute_values(how, dtype):
    """``magnitude=True`` (the probes' path, no |x| copy) gives what reducing an explicit ``x.abs()`` copy does,
    in float64 from the same values; and the running form agrees with it."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(300, 4, 24, generator=g) * 2 - 0.5).to(dtype)
    ref = {"mean": x.double().abs().mean(0), "l2": x.double().norm(dim=0),
           "var": x.double().abs().var(0, unbiased=False)}[how]
    out = aggregate_sequence(x, how, magnitude=True)
    assert out.dtype == torch.float64
    tol = 1e-5 if dtype == torch.bfloat16 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=0)
    if how == "mean":  # a signed input really differs: the flag is not ignored
        assert not torch.allclose(aggregate_sequence(x, "mean"), ref, rtol=1e-3)
    r = RunningAggregate(how)
    r.update(x[:, :1], magnitude=True)
    r.update(x[:, 1:], magnitude=True)
    torch.testing.assert_close(r.result("l2"), aggregate(x.double().abs(), "l2", how), rtol=tol, atol=0)
