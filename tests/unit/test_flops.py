"""MFU's FLOP count (train/progress.py) against torch's own FLOP counter over a real GPT forward, and the
distillation objective's share (the teacher's forward) in what the loop counts."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed, set_seed
from megatron_minitron.train.objective import LMObjective
from megatron_minitron.train.progress import forward_flops_per_token, training_flops_per_token

ARCHS = [
    ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
              vocab_size=200, seq_length=16),
    ModelArch(num_layers=3, hidden_size=48, ffn_hidden_size=80, num_attention_heads=4, num_query_groups=1,
              kv_channels=16, activation="gelu", normalization="LayerNorm", add_bias_linear=True,
              vocab_size=130, seq_length=24),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_flops_equal_counted_matmul_flops(arch):
    """Every matmul of a forward, counted by torch.utils.flop_counter (megatron's unfused attention: its
    baddbmm/bmm compute all s x s scores, the causal mask applied afterwards) equals our count with attention
    at the full window: 2 x the causal attention term, whose half is the masked-out triangle."""
    init_distributed(1, 1)
    set_seed(0)
    model = build_gpt(arch, Parallel(), attention_backend="unfused").eval()
    b, s = 2, arch.seq_length
    tokens = torch.randint(0, arch.vocab_size, (b, s))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, torch.arange(s).expand(b, s), None)
    causal_attention = 2 * arch.num_layers * s * arch.num_attention_heads * arch.head_dim
    per_token = forward_flops_per_token(arch)
    assert counter.get_total_flops() == b * s * (per_token + causal_attention)
    assert training_flops_per_token(arch) == 3 * per_token
    # another window changes only the attention term
    assert forward_flops_per_token(arch, 2 * s) - per_token == causal_attention


def test_distillation_adds_the_teachers_forward():
    from megatron_minitron.distill.config import Distill
    from megatron_minitron.distill.objective import KDObjective

    teacher = ARCHS[0]
    kd = KDObjective(Distill(teacher="t", student="s"), teacher, "t")
    assert kd.extra_flops_per_token(64) == forward_flops_per_token(teacher, 64)
    assert LMObjective().extra_flops_per_token(64) == 0.0
