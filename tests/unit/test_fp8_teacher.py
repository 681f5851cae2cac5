"""The FP8 teacher: megatron's linears with e4m3 matmuls give logits close to the full-precision teacher's,
and the quantized forward equals the same model with each weight replaced by its dequantized e4m3 value
and each activation rounded the same way (reference computed by plain torch, not through the hook)."""
import pytest
import torch

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.distill.fp8_teacher import quantize_teacher
from megatron_minitron.kernels.fp8 import dequantize, quantize_fp8, quantize_weight
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ARCH = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                 vocab_size=256, seq_length=16)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    init_distributed(1, 1)


def _models():
    set_seed(9)
    reference = build_gpt(ARCH, Parallel()).eval()
    quantized = build_gpt(ARCH, Parallel()).eval()
    quantized.load_state_dict(reference.state_dict())
    return reference, quantized


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_fp8_teacher_matches_emulated_reference_and_stays_close(fuse):
    """fused: norm / attention output / SwiGLU quantize their own outputs (kernels.fp8_fused, torch
    reference on CPU) and hand e4m3 rows to the next linear; the emulation quantizes each linear's input."""
    reference, quantized = _models()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        full = reference(tokens, positions, None)
    assert quantize_teacher(quantized, fuse=fuse) == 4 * ARCH.num_layers
    assert quantized.fp8_fused_sites == (4 * ARCH.num_layers if fuse else 0)
    with torch.no_grad():
        fp8 = quantized(tokens, positions, None)

    # emulate: e4m3 per-channel weights, e4m3 per-token activations, fp32 matmul, via forward hooks that
    # replace each linear's output
    emulated_model = reference
    handles = []
    for module in emulated_model.decoder.modules():
        if type(module).__name__ in ("ColumnParallelLinear", "RowParallelLinear"):
            w = quantize_weight(module.weight.detach(), "channel")
            wdq = dequantize(w.q, w.scale)

            def hook(mod, inputs, output, _w=wdq):
                x = inputs[0]
                xq, xs = quantize_fp8(x.reshape(-1, x.shape[-1]), "token")
                y = (dequantize(xq, xs) @ _w.t()).reshape(*x.shape[:-1], -1)
                return (y, output[1])
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        emulated = emulated_model(tokens, positions, None)
    for h in handles:
        h.remove()
    assert (fp8 - emulated).abs().max().item() < 1e-3 * emulated.abs().max().item()
    relative = ((fp8 - full).norm() / full.norm()).item()
    assert 0 < relative < 0.1, relative  # FP8 changes the logits, but only a little


def test_fp8_teacher_refuses_gradients():
    _, quantized = _models()
    quantize_teacher(quantized)
    tokens = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        quantized(tokens, torch.arange(16)[None], None)
