"""4 ranks. Distillation of a smaller student from a teacher, both loaded from checkpoints:

- one KD step (forward KL + intermediate cosine loss with dynamic alpha) gives the loss and the updated
  student weights of a plain-torch float64 reference at TP1PP1 (DP4), TP2PP1, TP1PP2 and TP2PP2; at the PP2
  layouts kd_loss_backend=fused_linear gives the same KD loss, loss and gradient norm;
- the teacher's weights are bit-identical after the steps;
- stop-and-resume reproduces the uninterrupted distillation exactly;
- with the teacher as its own student, the KD loss is exactly 0.
"""
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from megatron_minitron import checkpoint
from megatron_minitron.config import Data, ModelArch, Parallel, Train
from megatron_minitron.distill.config import Distill, DistillConfig
from megatron_minitron.distill.job import prepare
from megatron_minitron.distill.objective import KDObjective
from megatron_minitron.distill.teacher import init_projection
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed, set_seed
from megatron_minitron.train.loop import Trainer

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from helpers import SyntheticTokens, load_state, save_state  # noqa: E402

TEACHER = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=256, seq_length=16)
STUDENT = ModelArch(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, kv_channels=16, vocab_size=256, seq_length=16)
PAIRS = [[1, 3]]  # last student layer vs last teacher layer: on the last stage at PP2 too
GLOBAL_BATCH = 8
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def config(tp, pp, teacher, student, pairs=PAIRS, kd_loss_backend="auto"):
    return DistillConfig(
        parallel=Parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=Data(micro_batch_size=1, global_batch_size=GLOBAL_BATCH),
        train=Train(train_iters=1, lr=1e-2, min_lr=1e-2, lr_warmup_iters=0, lr_decay_style="constant",
                    adam_eps=1e-5, weight_decay=0.0, clip_grad=0.0, eval_iters=0, eval_interval=0,
                    progress_bar=False),
        distill=Distill(teacher=teacher, student=student, intermediate_pairs=pairs,
                        intermediate_loss="cosine", kd_loss_backend=kd_loss_backend))


def distill_trainer(cfg, ds):
    teacher_arch = prepare(cfg)
    return Trainer(cfg, objective=KDObjective(cfg.distill, teacher_arch, cfg.distill.teacher),
                   datasets=(ds, None)).setup()


def reference_step(teacher, student, batch, lr):
    """float64 plain torch: per sample (= micro-batch, mbs 1) sum mask*KL(p_t||p_s) + alpha * sum
    mask*(1-cos(P h_s, h_t)), alpha = that sample's mean KD / mean IS (detached), summed over samples and
    divided by the token count; then one Adam step."""
    from torch.func import functional_call

    tokens = torch.stack([x["tokens"] for x in batch])
    mask = torch.stack([x["loss_mask"] for x in batch]).double()
    positions = torch.stack([x["position_ids"] for x in batch])
    hidden = {}
    hooks = [teacher.decoder.layers[3].register_forward_hook(lambda m, i, o: hidden.__setitem__("t", o[0])),
             student.decoder.layers[1].register_forward_hook(lambda m, i, o: hidden.__setitem__("s", o[0]))]
    with torch.no_grad():
        t_logits = teacher.eval()(tokens, positions, None).double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in student.named_parameters()}
    projection = torch.empty(TEACHER.hidden_size, STUDENT.hidden_size)
    init_projection(projection, *PAIRS[0])
    projection.requires_grad_(True)
    s_logits = functional_call(student.train(), params, (tokens, positions, None)).double()
    for h in hooks:
        h.remove()
    kl = (torch.softmax(t_logits, -1) * (torch.log_softmax(t_logits, -1) - torch.log_softmax(s_logits, -1))
          ).sum(-1)
    s_proj = hidden["s"].double() @ projection.double().t()
    t_h = hidden["t"].double()
    cos = 1 - (s_proj * t_h).sum(-1) / (s_proj.norm(dim=-1) * t_h.norm(dim=-1))  # [s, b]
    kd_per_sample = (kl * mask).sum(1)
    is_per_sample = (cos * mask.t()).sum(0)
    alpha = (kd_per_sample / is_per_sample).detach()
    kd_sum = kd_per_sample.sum()
    loss = (kd_sum + (alpha * is_per_sample).sum()) / mask.sum()
    loss.backward()
    everything = list(params.values()) + [projection]
    opt = torch.optim.AdamW(everything, lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    opt.step()
    return (kd_sum / mask.sum()).item(), loss.item(), {n: p.detach() for n, p in params.items()}


def main():
    root = sys.argv[1]
    ds = SyntheticTokens(64, TEACHER.seq_length, TEACHER.vocab_size, seed=11)
    teacher_dir, student_dir = os.path.join(root, "teacher"), os.path.join(root, "student")

    # Random teacher and student checkpoints, written once at TP1PP1 (DP4).
    init_distributed(1, 1)
    set_seed(3)
    teacher = build_gpt(TEACHER, Parallel())
    student = build_gpt(STUDENT, Parallel())
    checkpoint.save_checkpoint_to(teacher_dir, [teacher], arch=TEACHER)
    checkpoint.save_checkpoint_to(student_dir, [student], arch=STUDENT)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items() if v is not None}
    ref_kd, ref_loss, ref_after = reference_step(teacher, student, [ds[i] for i in range(GLOBAL_BATCH)], 1e-2)

    for tp, pp in LAYOUTS:
        tag = f"tp{tp}pp{pp}"
        trainer = distill_trainer(config(tp, pp, teacher_dir, student_dir), ds)
        metrics = trainer.train_step(trainer._batches(ds, 0))
        assert abs(metrics["kd_loss"] - ref_kd) < 1e-5, f"{tag}: kd {metrics['kd_loss']} vs {ref_kd}"
        assert abs(metrics["loss"] - ref_loss) < 1e-5, f"{tag}: loss {metrics['loss']} vs {ref_loss}"
        if pp == 2:  # the KD loss fused with the output layers, on the last pipeline stage: the same step
            fused = distill_trainer(config(tp, pp, teacher_dir, student_dir, kd_loss_backend="fused_linear"), ds)
            assert fused.unwrapped()[0].fused_output, tag
            fused_metrics = fused.train_step(fused._batches(ds, 0))
            for key in ("kd_loss", "loss", "grad_norm"):
                assert abs(fused_metrics[key] - metrics[key]) < 1e-5 * max(1.0, abs(metrics[key])), \
                    f"{tag} fused_linear: {key} {fused_metrics[key]} vs {metrics[key]}"
            del fused
        trainer.train_step(trainer._batches(ds, GLOBAL_BATCH))  # teacher must not move over more steps
        save_state([trainer.unwrapped()[0].teacher], os.path.join(root, f"teacher_{tag}"))
        # Only the first step is compared: store the student after step one by replaying it fresh.
        trainer = distill_trainer(config(tp, pp, teacher_dir, student_dir), ds)
        trainer.train_step(trainer._batches(ds, 0))
        save_state([trainer.unwrapped()[0].student], os.path.join(root, f"student_{tag}"))
        if dist.get_rank() == 0:
            print(f"{tag}: kd {metrics['kd_loss']:.6f} loss {metrics['loss']:.6f} == reference", flush=True)

    init_distributed(1, 1)
    check_student = build_gpt(STUDENT, Parallel())
    check_teacher = build_gpt(TEACHER, Parallel())
    for tp, pp in LAYOUTS:
        tag = f"tp{tp}pp{pp}"
        load_state([check_student], os.path.join(root, f"student_{tag}"))
        for name, p in check_student.named_parameters():
            diff = (p.detach() - ref_after[name]).abs().max().item()
            assert diff < 2e-5, f"{tag}: student {name} differs from the reference step by {diff}"
        load_state([check_teacher], os.path.join(root, f"teacher_{tag}"))
        for name, t in check_teacher.state_dict().items():
            if t is not None and name in teacher_before:
                assert torch.equal(t, teacher_before[name]), f"{tag}: teacher {name} changed"
    if dist.get_rank() == 0:
        print("students match the reference step; teachers bit-identical", flush=True)

    # Resume: 2 steps, stop, resume for 2 more == 4 uninterrupted steps (student, KD projection, optimizer,
    # schedule and data position all come back), at TP1PP2 x DP2.
    def resumable(save, **kw):
        c = config(1, 2, teacher_dir, student_dir)
        c.train = dataclasses.replace(c.train, train_iters=4, save=save, lr_decay_style="cosine", min_lr=1e-3,
                                      **kw)
        return distill_trainer(c, ds)
    whole = resumable(os.path.join(root, "kd_whole")).run().history
    first = resumable(os.path.join(root, "kd_split"), exit_interval=2).run().history
    second = resumable(os.path.join(root, "kd_split")).run().history
    keys = ("kd_loss", "is_loss", "loss", "grad_norm", "lr")
    assert [[h[k] for k in keys] for h in whole] == [[h[k] for k in keys] for h in first + second], \
        (whole, first + second)
    if dist.get_rank() == 0:
        print("distillation resume is exact", flush=True)

    # The teacher as its own student: KL is exactly zero.
    same = distill_trainer(config(2, 2, teacher_dir, teacher_dir, pairs=[]), ds)
    metrics = same._forward_backward(same._batches(ds, 0), forward_only=True)
    assert metrics["kd_loss"] == 0.0 or abs(metrics["kd_loss"]) < 1e-7, metrics
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"self-distillation KL = {metrics['kd_loss']}", flush=True)
        print("DISTILL OK", flush=True)


if __name__ == "__main__":
    main()
