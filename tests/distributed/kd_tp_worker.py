"""2 ranks, TP2: vocab-parallel KD losses on real shards vs float64 full-vocabulary references.

Every rank builds the same full [s, b, V] logits, keeps its own V/2 columns and calls the loss with the
default group (megatron's TP group). Checked for forward/reverse KL (torch and Triton-interpreter backends),
MSE and cosine, fp32 and bf16, with a loss mask and temperature: the per-token loss equals the reference
and is bitwise identical on both ranks, and each rank's gradient equals the reference gradient's columns.
The KL losses again with -inf logits (padded vocabulary, masked / top-k columns, a whole shard -inf).
Then sequence-parallel hidden-state losses: each rank holds half the positions; masked_mean(group=TP)
gives the full-sequence mean, local gradients match, and the TP-summed projection gradient matches.
Last, the FP8 teacher at TP2 with sequence parallelism: with activation quantization fused into its
producers (the e4m3 rows are all-gathered over the sequence) its logits equal the unfused FP8 path's, and
both stay close to the unquantized model.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TESTS, "unit"))
sys.path.insert(0, TESTS)
from helpers import check_close, check_same_on_all_ranks  # noqa: E402
from kd_reference import make_logits, reference_kl_with_neg_inf, reference_loss_and_grad, with_neg_inf  # noqa: E402
from megatron_minitron.distill.losses import (hidden_state_loss, logit_kd_loss, masked_mean,  # noqa: E402
                                              triton_available)
from megatron_minitron.runtime.distributed import destroy, init_distributed  # noqa: E402

LOCAL_VOCAB = 37  # odd, and not a multiple of the Triton block used below
SEQ, BATCH = 6, 2


def logit_checks(tp_rank, tp_group):
    columns = slice(tp_rank * LOCAL_VOCAB, (tp_rank + 1) * LOCAL_VOCAB)
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(SEQ, BATCH, generator=gen) > 0.3
    upstream = torch.rand(SEQ, BATCH, generator=gen) + 0.5
    cases = []
    for kind in ("forward_kl", "reverse_kl", "mse", "cosine"):
        backends = ["torch"] + (["triton"] if kind.endswith("kl") and triton_available() else [])
        for backend in backends:
            for dtype in (torch.float32, torch.bfloat16):
                cases.append((kind, backend, dtype))
    for i, (kind, backend, dtype) in enumerate(cases):
        student, teacher = make_logits((SEQ, BATCH, 2 * LOCAL_VOCAB), seed=100 + i, dtype=dtype)
        kl_kwargs = dict(temperature=1.7, scale_by_temperature_squared=(i % 2 == 0)) if kind.endswith("kl") else {}
        leaf = student[..., columns].clone().requires_grad_(True)
        loss = logit_kd_loss(leaf, teacher[..., columns], kind, loss_mask=mask, backend=backend, chunk_tokens=5,
                             triton_block=16, **kl_kwargs)
        loss.backward(upstream)
        ref_loss, ref_grad = reference_loss_and_grad(student, teacher, kind, upstream, **kl_kwargs)
        ref_loss = torch.where(mask, ref_loss, torch.zeros_like(ref_loss))
        ref_grad = torch.where(mask[..., None], ref_grad, torch.zeros_like(ref_grad))[..., columns]
        name = f"{kind}/{backend}/{dtype}"
        assert leaf.grad.dtype == dtype, name
        check_close(name + " loss", loss, ref_loss, rtol=1e-5, atol=5e-6)
        grad_rtol = 1e-4 if dtype == torch.float32 else 2 ** -7
        check_close(name + " grad", leaf.grad, ref_grad, rtol=grad_rtol, atol=1e-6)
        check_same_on_all_ranks(name, loss, tp_group)
        assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask])), name
    return len(cases)


def neg_inf_logit_checks(tp_rank, tp_group):
    """-inf logits across shards: a padded vocabulary (the last columns, all on rank 1), masked/top-k
    columns, and rows whose whole shard on one rank is -inf on the zero-weight side."""
    columns = slice(tp_rank * LOCAL_VOCAB, (tp_rank + 1) * LOCAL_VOCAB)
    upstream = torch.rand(SEQ, BATCH, generator=torch.Generator().manual_seed(4)) + 0.5
    backends = ["torch"] + (["triton"] if triton_available() else [])
    count = 0
    for kind in ("forward_kl", "reverse_kl"):
        for backend in backends:
            student, teacher = make_logits((SEQ, BATCH, 2 * LOCAL_VOCAB), seed=200 + count)
            student, teacher = with_neg_inf(student, teacher, kind, seed=300 + count)
            (teacher if kind == "forward_kl" else student)[0, :, LOCAL_VOCAB:] = float("-inf")
            leaf = student[..., columns].clone().requires_grad_(True)
            loss = logit_kd_loss(leaf, teacher[..., columns], kind, backend=backend, chunk_tokens=5,
                                 triton_block=16, temperature=1.3)
            loss.backward(upstream)
            ref_loss, ref_grad = reference_kl_with_neg_inf(student, teacher, kind, upstream, temperature=1.3)
            name = f"-inf {kind}/{backend}"
            assert torch.isfinite(loss).all() and torch.isfinite(leaf.grad).all(), name
            check_close(name + " loss", loss, ref_loss, rtol=1e-5, atol=5e-6)
            check_close(name + " grad", leaf.grad, ref_grad[..., columns], rtol=1e-4, atol=1e-6)
            check_same_on_all_ranks(name, loss, tp_group)
            count += 1
    return count


def sequence_parallel_hidden_checks(tp_rank, tp_size, tp_group):
    gen = torch.Generator().manual_seed(1)
    student_full = torch.randn(SEQ * tp_size, BATCH, 12, generator=gen)
    teacher_full = torch.randn(SEQ * tp_size, BATCH, 20, generator=gen)
    mask_full = torch.rand(SEQ * tp_size, BATCH, generator=gen) > 0.25
    rows = slice(tp_rank * SEQ, (tp_rank + 1) * SEQ)
    for kind in ("mse", "cosine"):
        torch.manual_seed(2)
        proj = torch.nn.Linear(12, 20)
        ref_proj = torch.nn.Linear(12, 20)
        ref_proj.load_state_dict(proj.state_dict())
        ref_student = student_full.clone().requires_grad_(True)
        ref = masked_mean(hidden_state_loss(ref_student, teacher_full, ref_proj, kind), mask_full)
        ref.backward()

        local_student = student_full[rows].clone().requires_grad_(True)
        value = masked_mean(hidden_state_loss(local_student, teacher_full[rows], proj, kind), mask_full[rows],
                            group=tp_group)
        value.backward()
        check_close(f"SP {kind} value", value, ref, rtol=1e-6, atol=1e-7)
        check_close(f"SP {kind} student grad", local_student.grad, ref_student.grad[rows], rtol=1e-5, atol=1e-8)
        proj_grad = proj.weight.grad.clone()
        dist.all_reduce(proj_grad, group=tp_group)  # what megatron does for `sequence_parallel` params
        check_close(f"SP {kind} projection grad", proj_grad, ref_proj.weight.grad, rtol=1e-5, atol=1e-7)
    return 2


def fp8_teacher_sequence_parallel_checks():
    from megatron_minitron.config import ModelArch, Parallel
    from megatron_minitron.distill.fp8_teacher import quantize_teacher
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import set_seed

    arch = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     vocab_size=256, seq_length=16)
    layout = Parallel(tensor_model_parallel_size=2, sequence_parallel=True)
    set_seed(5)
    full = build_gpt(arch, layout).eval()
    models = {}
    for fuse in (False, True):
        models[fuse] = build_gpt(arch, layout).eval()
        models[fuse].load_state_dict(full.state_dict())
        quantize_teacher(models[fuse], fuse=fuse)
    assert models[True].fp8_fused_sites == 4 * arch.num_layers, models[True].fp8_fused_sites
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        reference, unfused, fused = (m(tokens, positions, None) for m in (full, models[False], models[True]))
    check_close("FP8 teacher TP2+SP fused vs unfused", fused, unfused, rtol=0, atol=2e-3 * unfused.abs().max().item())
    relative = ((fused - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.1, relative
    return 2


def main():
    runtime = init_distributed(tp=2)
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    checks = logit_checks(tp_rank, tp_group)
    checks += neg_inf_logit_checks(tp_rank, tp_group)
    checks += sequence_parallel_hidden_checks(tp_rank, runtime.tp, tp_group)
    checks += fp8_teacher_sequence_parallel_checks()
    dist.barrier()
    if runtime.is_rank0:
        print(f"KD_TP_OK {checks} checks, triton={'yes' if triton_available() else 'no'}", flush=True)
    destroy()


if __name__ == "__main__":
    main()
