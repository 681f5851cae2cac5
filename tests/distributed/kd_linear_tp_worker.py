"""2 ranks, TP2: the KD loss fused with the output layer on real vocabulary shards vs float64 references.

Every rank builds the same full hidden states and [V, H] output weights, keeps its own V/2 rows of both
weights (megatron's ColumnParallelLinear layout) and calls ``linear_kd_loss`` with the default group
(megatron's TP group). Checked for forward/reverse KL, torch and Triton-interpreter epilogues, fp32 and
bf16, temperature, token weights and the LM loss with labels on both shards: the per-token losses equal
the full-vocabulary reference and are bitwise identical on both ranks, the hidden-state gradient (summed
over TP in the backward) equals the reference, and each rank's weight gradient equals the reference
rows of its shard. Then with sequence parallelism: each rank passes its half of the positions, gathered
inside, and gets the gradient of its own half back. Last, a distillation step of real TP2 GPTModels, with
and without sequence parallelism: kd_loss_backend=fused_linear equals the logits path.
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
from linear_kd_reference import make_linear_inputs, reference_linear_kd  # noqa: E402
from megatron_minitron.distill.kd_linear import linear_kd_loss  # noqa: E402
from megatron_minitron.distill.losses import triton_available  # noqa: E402
from megatron_minitron.runtime.distributed import destroy, init_distributed  # noqa: E402

LOCAL_VOCAB = 37  # odd, not a multiple of the Triton block used below
SEQ, BATCH, H_S, H_T = 6, 2, 8, 12


def run_case(tp_rank, tp_group, index, kind, backend, dtype, tau, with_labels, sequence_parallel):
    rows = slice(tp_rank * LOCAL_VOCAB, (tp_rank + 1) * LOCAL_VOCAB)
    h_s, w_s, h_t, w_t, labels, weights = make_linear_inputs(SEQ * BATCH, H_S, H_T, 2 * LOCAL_VOCAB,
                                                             seed=10 + index, dtype=dtype)
    kd_weight, lm_weight = 0.8, (0.3 if with_labels else 0.0)
    hidden_s, hidden_t = h_s.reshape(SEQ, BATCH, H_S), h_t.reshape(SEQ, BATCH, H_T)
    positions = slice(None)
    if sequence_parallel:  # this rank's half of the sequence
        positions = slice(tp_rank * SEQ // 2, (tp_rank + 1) * SEQ // 2)
    leaf = hidden_s[positions].clone().requires_grad_(True)
    weight = w_s[rows].clone().requires_grad_(True)
    out = linear_kd_loss(leaf, weight, hidden_t[positions], w_t[rows], kind, temperature=tau,
                         loss_mask=weights.reshape(SEQ, BATCH),
                         labels=labels.reshape(SEQ, BATCH) if with_labels else None, kd_weight=kd_weight,
                         lm_weight=lm_weight, sequence_parallel=sequence_parallel, backend=backend, chunk_tokens=5)
    out.loss.backward()
    kd, lm, total, ref_h, ref_w = reference_linear_kd(h_s, w_s, h_t, w_t, kind, temperature=tau,
                                                      token_weight=weights,
                                                      labels=labels if with_labels else None,
                                                      kd_weight=kd_weight, lm_weight=lm_weight)
    name = f"{kind}/{backend}/{dtype}/tau={tau}/labels={with_labels}/sp={sequence_parallel}"
    fp32 = dtype == torch.float32
    loss_tol = dict(rtol=2e-5, atol=2e-5) if fp32 else dict(rtol=2e-2, atol=5e-2)
    check_close(name + " kd", out.kd.reshape(-1), kd, **loss_tol)
    check_close(name + " total", out.loss, total, **loss_tol)
    if with_labels:
        check_close(name + " lm", out.lm.reshape(-1), lm, **loss_tol)
    check_same_on_all_ranks(name + " kd", out.kd, tp_group)
    check_same_on_all_ranks(name + " total", out.loss.reshape(1), tp_group)
    ref_h_local = ref_h.reshape(SEQ, BATCH, H_S)[positions]
    scale = max(ref_h.abs().max().item(), ref_w.abs().max().item())
    grad_tol = dict(rtol=2e-5, atol=2e-6 * scale) if fp32 else dict(rtol=2e-2, atol=2e-2 * scale)
    check_close(name + " grad hidden", leaf.grad, ref_h_local, **grad_tol)
    check_close(name + " grad weight", weight.grad, ref_w[rows], **grad_tol)


def distill_step_checks():
    """A co-located distillation step of real TP2 GPTModels (fp32), with and without sequence parallelism:
    kd_loss_backend=fused_linear gives the logits path's loss and every rank's student gradients."""
    from megatron_minitron.config import ModelArch, Parallel
    from megatron_minitron.distill.config import Distill
    from megatron_minitron.distill.objective import KDObjective, uses_fused_output_layer
    from megatron_minitron.distill.teacher import DistillationModel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import set_seed

    seq = 8
    student_arch = ModelArch(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                             num_query_groups=2, vocab_size=250, seq_length=seq, tie_embeddings=True)
    teacher_arch = ModelArch(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=4,
                             num_query_groups=2, vocab_size=250, seq_length=seq)
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 250, (BATCH, seq + 1), generator=gen)
    loss_mask = (torch.rand(BATCH, seq, generator=gen) > 0.25).float()
    positions = torch.arange(seq).expand(BATCH, seq)
    for sp in (False, True):
        layout = Parallel(tensor_model_parallel_size=2, sequence_parallel=sp)
        results = {}
        for backend in ("torch", "fused_linear"):
            set_seed(21)  # the same weights for both backends
            student, teacher = build_gpt(student_arch, layout), build_gpt(teacher_arch, layout)
            cfg = Distill(teacher="unused", kd_loss_backend=backend, lm_loss_weight=0.5, temperature=1.5)
            objective = KDObjective(cfg, teacher_arch, "unused")
            objective.model = DistillationModel(student, teacher, sequence_parallel=sp,
                                                fused_output=uses_fused_output_layer(cfg, torch.device("cpu")))
            out = objective.model(tokens[:, :-1], positions, None)
            total, _, report = objective.loss_func(tokens[:, 1:], loss_mask, out)
            total.backward()
            results[backend] = (total.detach(), report,
                                {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        (total, report, grads), (f_total, f_report, f_grads) = results["torch"], results["fused_linear"]
        name = f"distill step TP2 sp={sp}"
        check_close(name + " loss", f_total, total, rtol=1e-5, atol=1e-6)
        for key in report:
            check_close(f"{name} report {key}", f_report[key], report[key], rtol=1e-5, atol=1e-6)
        assert grads.keys() == f_grads.keys(), name
        for key in grads:
            check_close(f"{name} grad {key}", f_grads[key], grads[key], rtol=1e-4,
                        atol=1e-5 * grads[key].abs().max().item())
    return 2


def main():
    init_distributed(tp=2)
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    cases = [  # kind, backend, dtype, tau, labels, sequence_parallel
        ("forward_kl", "torch", torch.float32, 1.7, True, False),
        ("reverse_kl", "torch", torch.float32, 1.0, True, False),
        ("forward_kl", "torch", torch.bfloat16, 1.0, True, False),
        ("forward_kl", "torch", torch.float32, 1.3, True, True),
    ]
    if triton_available():
        from megatron_minitron.distill.kd_linear_triton import TritonTileEpilogue

        TritonTileEpilogue.block = 16
        cases += [("forward_kl", "triton", torch.float32, 1.0, True, False),
                  ("reverse_kl", "triton", torch.float32, 1.5, False, True)]
    for index, case in enumerate(cases):
        run_case(tp_rank, tp_group, index, *case)
    steps = distill_step_checks()
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"KD_LINEAR_TP_OK {len(cases)} loss cases, {steps} distill steps, "
              f"triton={'yes' if triton_available() else 'no'}", flush=True)
    destroy()


if __name__ == "__main__":
    main()
