"""2 ranks, TP2, with and without sequence parallelism: the spec-built FP8 teacher (build_fp8_teacher,
weights loaded from a checkpoint saved at TP2) gives the same logits, bit for bit, as the previous
construction (a bf16 model whose module instances are patched, tests/fp8_patched_teacher.py) on the same
weights, fused and unfused; under SP the fused producers' e4m3 rows and scales are all-gathered over the
sequence by the column-parallel linears."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fp8_patched_teacher import patch_teacher  # noqa: E402
from megatron_minitron import checkpoint  # noqa: E402
from megatron_minitron.config import ModelArch, Parallel  # noqa: E402
from megatron_minitron.distill.fp8_teacher import build_fp8_teacher, fused_sites, quantize_weights  # noqa: E402
from megatron_minitron.model.builder import build_gpt  # noqa: E402
from megatron_minitron.runtime.distributed import destroy, init_distributed, set_seed  # noqa: E402

ARCH = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                 vocab_size=256, seq_length=16)


def main(directory):
    init_distributed(tp=2)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(16).expand(2, 16)
    checks = 0
    for sequence_parallel in (False, True):
        layout = Parallel(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
        set_seed(5)
        reference = build_gpt(ARCH, layout).eval()
        saved = checkpoint.save_checkpoint_to(os.path.join(directory, f"sp{int(sequence_parallel)}"),
                                              [reference], arch=ARCH, parallel=layout)
        for fuse in (False, True):
            patched = build_gpt(ARCH, layout).eval()
            patched.load_state_dict(reference.state_dict())
            patch_teacher(patched, fuse=fuse)
            spec = build_fp8_teacher(ARCH, layout, torch.float32, fuse=fuse).eval()
            checkpoint.load_weights(saved, [spec], arch=ARCH)
            assert quantize_weights(spec) == 4 * ARCH.num_layers
            assert fused_sites(spec) == patched.fp8_fused_sites == (4 * ARCH.num_layers if fuse else 0)
            with torch.no_grad():
                expected, actual = patched(tokens, positions, None), spec(tokens, positions, None)
            assert torch.equal(actual, expected), (
                f"rank {dist.get_rank()} SP={sequence_parallel} fuse={fuse}: max |diff| "
                f"{(actual - expected).abs().max().item():.3e}")
            checks += 1
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"FP8_TEACHER_TP_OK {checks} checks", flush=True)
    destroy()


if __name__ == "__main__":
    main(sys.argv[1])
