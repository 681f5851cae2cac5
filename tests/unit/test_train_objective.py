"""The Trainer's objective contract (train.objective.Objective): the objectives implement it, the optional hooks
have working defaults, a non-objective is refused up front, and the loop's report reduction (one process) gives
sum / count per metric in the objective's order."""
from types import SimpleNamespace

import pytest
import torch

from megatron_minitron.config import ModelArch, TrainConfig
from megatron_minitron.distill.config import Distill
from megatron_minitron.distill.objective import KDObjective
from megatron_minitron.train.loop import Trainer
from megatron_minitron.train.objective import BaseObjective, LMObjective, Objective

ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 vocab_size=200, seq_length=16)
TEACHER = ModelArch(num_layers=4, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    vocab_size=200, seq_length=16)


class TwoMetrics(BaseObjective):
    metric_names = ("a", "b")

    def forward_step(self, data_iterator, model):
        raise AssertionError("not called here")


def test_objectives_implement_the_protocol():
    kd = KDObjective(Distill(teacher="t"), TEACHER, "t")
    kd_with_pairs = KDObjective(Distill(teacher="t", intermediate_pairs=[[1, 3]]), TEACHER, "t")
    for objective in (LMObjective(), kd, kd_with_pairs, TwoMetrics()):
        assert isinstance(objective, Objective), type(objective).__name__
    assert kd.metric_names == ("kd_loss", "lm_loss", "loss")
    assert kd_with_pairs.metric_names == ("kd_loss", "lm_loss", "is_loss", "loss")


def test_default_hooks_change_nothing():
    objective, model = TwoMetrics(), torch.nn.Linear(2, 2)
    assert objective.wrap_model(trainer=None, model=model) is model
    assert objective.schedule_kwargs(True) == {} and objective.schedule_kwargs(False) == {}
    text = objective.describe(ARCH)
    assert text.startswith("train:") and f"{ARCH.num_parameters():,}" in text


def test_kd_objective_describes_student_and_teacher():
    text = KDObjective(Distill(teacher="t"), TEACHER, "t").describe(ARCH)
    assert text.startswith("distill:")
    assert f"{ARCH.num_parameters():,}" in text and f"{TEACHER.num_parameters():,}" in text
    assert ARCH.num_parameters() < TEACHER.num_parameters()


class OnlyForwardStep:  # the core of the contract but none of the hooks, and no BaseObjective
    metric_names = ("lm_loss",)

    def forward_step(self, data_iterator, model):
        raise AssertionError("not called here")


@pytest.mark.parametrize("objective", [object(), OnlyForwardStep()])
def test_trainer_refuses_what_is_not_an_objective(objective):
    with pytest.raises(ValueError, match="not a training objective.*BaseObjective"):
        Trainer(TrainConfig(), objective=objective)


def test_default_objective_is_the_lm_loss():
    assert isinstance(Trainer(TrainConfig()).objective, LMObjective)


def test_reduce_reports_averages_each_metric_over_micro_batches():
    trainer = Trainer(TrainConfig(), objective=TwoMetrics())
    trainer.rt = SimpleNamespace(device=torch.device("cpu"))
    reports = [{"a": torch.tensor([3.0, 2.0]), "b": torch.tensor([1.0, 4.0])},
               {"a": torch.tensor([5.0, 6.0]), "ignored": torch.tensor([9.0, 1.0])},
               {"b": torch.tensor([0.5, 0.0])}]
    expected = {}
    for name in ("a", "b"):
        sums = [r[name][0].item() for r in reports if name in r]
        counts = [r[name][1].item() for r in reports if name in r]
        expected[name] = sum(sums) / sum(counts)
    assert trainer._reduce_reports(reports) == pytest.approx(expected, rel=1e-12)
    assert trainer._reduce_reports([]) == {"a": 0.0, "b": 0.0}  # nothing counted (e.g. not the last stage)
