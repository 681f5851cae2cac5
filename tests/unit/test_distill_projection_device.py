"""The KD projection layers (student -> teacher hidden size, for intermediate-state losses) are created where the
student lives. Nothing moves the DistillationModel after it is built (the Trainer wraps it in DDP as it is), so a
projection left on the CPU next to a GPU student would fail at its first forward. A 'meta' student stands in for a
GPU one: a device no CPU default can produce."""
import pytest
import torch

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.distill.teacher import DistillationModel
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed

STUDENT = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    vocab_size=64, seq_length=8)
TEACHER = ModelArch(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    vocab_size=64, seq_length=8)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    init_distributed(1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_are_built_on_the_students_device_and_dtype(dtype):
    student = build_gpt(STUDENT, Parallel(), dtype, device=torch.device("meta"), initialize=False)
    teacher = build_gpt(TEACHER, Parallel(), dtype, device=torch.device("meta"), initialize=False)
    model = DistillationModel(student, teacher, intermediate_pairs=[[0, 1], [1, 1]])
    weights = [model.projection(0, 1).weight, model.projection(1, 1).weight]
    assert [(w.device.type, w.dtype, tuple(w.shape)) for w in weights] == [("meta", dtype, (48, 32))] * 2
