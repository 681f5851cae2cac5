"""One co-located distillation step (real megatron GPTModels, fp32, CPU) with distill.kd_loss_backend=fused_linear
gives the same loss, report and student gradients as the logits path (kd_loss_backend=torch)."""
import pytest
import torch

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.distill.config import Distill
from megatron_minitron.distill.objective import KDObjective, uses_fused_output_layer
from megatron_minitron.distill.teacher import DistillationModel
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed, set_seed

SEQ, BATCH = 12, 2
STUDENT = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    vocab_size=200, seq_length=SEQ, tie_embeddings=True)
TEACHER = ModelArch(num_layers=3, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    vocab_size=200, seq_length=SEQ)


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    init_distributed(1, 1)


@pytest.fixture(scope="module")
def weights():
    set_seed(3)
    return build_gpt(STUDENT, Parallel()).state_dict(), build_gpt(TEACHER, Parallel()).state_dict()


def distill_step(weights, backend, **distill_kwargs):
    student, teacher = build_gpt(STUDENT, Parallel()), build_gpt(TEACHER, Parallel())
    student.load_state_dict(weights[0])
    teacher.load_state_dict(weights[1])
    cfg = Distill(teacher="unused", kd_loss_backend=backend, **distill_kwargs)
    cfg.validate()
    objective = KDObjective(cfg, TEACHER, "unused")
    model = DistillationModel(student, teacher, cfg.intermediate_pairs,
                              fused_output=uses_fused_output_layer(cfg, torch.device("cpu")))
    objective.model = model
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, STUDENT.vocab_size, (BATCH, SEQ + 1), generator=gen)
    loss_mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.25).float()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    out = model(tokens[:, :-1], positions, None)
    assert ("student_final_hidden" in out) == (backend == "fused_linear")
    total, count, report = objective.loss_func(tokens[:, 1:], loss_mask, out)
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total.detach(), count, {k: v.detach() for k, v in report.items()}, grads


@pytest.mark.parametrize("distill_kwargs", [
    dict(logit_loss="forward_kl", lm_loss_weight=0.5),
    dict(logit_loss="reverse_kl", temperature=2.0, intermediate_pairs=[[0, 1]], intermediate_loss="cosine"),
], ids=["forward_kl+lm", "reverse_kl+tau2+intermediate"])
def test_fused_linear_step_equals_logits_step(weights, distill_kwargs):
    total, count, report, grads = distill_step(weights, "torch", **distill_kwargs)
    f_total, f_count, f_report, f_grads = distill_step(weights, "fused_linear", **distill_kwargs)
    assert count == f_count
    torch.testing.assert_close(f_total, total, rtol=1e-5, atol=1e-6)
    assert report.keys() == f_report.keys()
    for name in report:
        torch.testing.assert_close(f_report[name], report[name], rtol=1e-5, atol=1e-6, msg=name)
    assert grads.keys() == f_grads.keys() and "student.embedding.word_embeddings.weight" in grads
    for name in grads:  # includes the tied embedding / output weight and the KD projection
        scale = grads[name].abs().max().item()
        torch.testing.assert_close(f_grads[name], grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_fused_linear_needs_a_kl_loss():
    with pytest.raises(ValueError, match="implements forward_kl and reverse_kl"):
        Distill(teacher="t", kd_loss_backend="fused_linear", logit_loss="mse").validate()


def test_auto_fuses_the_output_layers_for_kl_losses_on_gpu_only(monkeypatch):
    from megatron_minitron.distill import objective as objective_module

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")  # a device object needs no GPU

    def fused(device, mtp=False, **kwargs):
        return uses_fused_output_layer(Distill(teacher="t", **kwargs), device, mtp)

    assert fused(gpu) and fused(gpu, logit_loss="reverse_kl", intermediate_pairs=[[0, 1]])
    assert not fused(cpu)  # the chunked torch path on CPU
    assert not fused(gpu, logit_loss="mse") and not fused(gpu, logit_loss="cosine")  # they need the logits
    assert not fused(gpu, mtp=True)
    assert not fused(gpu, kd_loss_backend="triton") and not fused(gpu, kd_loss_backend="torch")
    assert fused(cpu, kd_loss_backend="fused_linear")  # asked for: also on CPU (torch epilogue)
    monkeypatch.setattr(objective_module, "triton_available", lambda: False)
    assert not fused(gpu)  # without Triton the epilogue would be fp32 torch copies: keep the logits path
