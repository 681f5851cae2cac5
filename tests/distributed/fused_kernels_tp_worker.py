"""2 ranks at TP2, without and with sequence parallelism: the student GPT built with train.fused_kernels' modules
(fused RMSNorm, RoPE and SwiGLU, run by the Triton interpreter on CPU) gives the plain GPT's logits shard and every
parameter's gradient on each TP rank, from the same weights; and the kernels really ran (calls counted)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported

import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_minitron.config import ModelArch, Parallel  # noqa: E402
from megatron_minitron.model.builder import build_gpt, layer_spec  # noqa: E402
from megatron_minitron.model.attention import FusedRoPESelfAttention  # noqa: E402
from megatron_minitron.model.mlp import FusedSwiGLUMLP  # noqa: E402
from megatron_minitron.runtime.distributed import init_distributed, set_seed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from helpers import count_kernel_calls  # noqa: E402

ARCH = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                 vocab_size=256, seq_length=8, rotary_percent=0.5, layernorm_zero_centered_gamma=True)
CALLS = {"rope": 0, "swiglu": 0}
count_kernel_calls(CALLS)


def step(model, tokens, positions):
    logits = model(tokens, positions, None)  # this rank's vocab shard
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def main():
    for sp in (False, True):
        init_distributed(2, 1)
        par = Parallel(tensor_model_parallel_size=2, sequence_parallel=sp)
        set_seed(7)
        reference = build_gpt(ARCH, par)
        # on CPU build_gpt never picks the fused modules itself (fused_kernels_usable): ask for the spec
        fused = build_gpt(ARCH, par, layer_spec_transform=lambda spec, config: layer_spec(ARCH, fused_kernels=True))
        layer = fused.decoder.layers[0]
        assert isinstance(layer.self_attention, FusedRoPESelfAttention) and isinstance(layer.mlp, FusedSwiGLUMLP)
        with torch.no_grad():  # the same non-trivial weights on both (each rank its own shards)
            g = torch.Generator().manual_seed(100 + dist.get_rank())
            for a, b in zip(reference.parameters(), fused.parameters()):
                a.add_(torch.randn(a.shape, generator=g) * 0.02)
                b.copy_(a)
        tokens = torch.randint(0, ARCH.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(8).expand(2, 8)
        CALLS.update(rope=0, swiglu=0)
        want_logits, want_grads = step(reference, tokens, positions)
        assert CALLS == {"rope": 0, "swiglu": 0}, CALLS
        got_logits, got_grads = step(fused, tokens, positions)
        assert CALLS == {"rope": 2 * ARCH.num_layers, "swiglu": ARCH.num_layers}, CALLS
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"sp={sp} {name}")
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"TP2 sp={sp}: fused logits and grads match", flush=True)
    if dist.get_rank() == 0:
        print("FUSED TP OK", flush=True)


if __name__ == "__main__":
    main()
