"""Memory planner: every term against numbers worked out by hand for a tiny model, plus invariants."""
import argparse
import os

import pytest

from megatron_minitron.config import ModelArch
from megatron_minitron.plan import (Job, Layout, best_layout, enumerate_layouts, estimate, estimate_stage,
                                    layer_activation_bytes, layer_parameters, logits_and_loss_bytes,
                                    stage_activation_bytes, stage_parameters)
from megatron_minitron.plan.memory import GIB, KD_CHUNK_BUFFERS, NAIVE_KD_COPIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(**kw) -> ModelArch:
    base = dict(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
                kv_channels=4, vocab_size=128, seq_length=4)
    base.update(kw)
    return ModelArch(**base)


def test_layer_parameters_by_hand():
    # qkv 8*4*(2+2*1)=128, proj 2*4*8=64, fc1 8*(2*16)=256, fc2 16*8=128, two RMSNorms 2*8=16
    assert layer_parameters(tiny(), tp=1) == 128 + 64 + 256 + 128 + 16
    assert layer_parameters(tiny(), tp=2) == (128 + 64 + 256 + 128) // 2 + 16
    # squared ReLU: fc1 is 8*16; LayerNorm has weight and bias
    assert layer_parameters(tiny(activation="squared_relu", normalization="LayerNorm"), tp=1) == \
        128 + 64 + 128 + 128 + 2 * 16


@pytest.mark.parametrize("arch", [tiny(), tiny(tie_embeddings=True), tiny(num_layers=4, activation="gelu")])
@pytest.mark.parametrize("pp", [1, 2])
def test_stage_parameters_sum_to_model_count(arch, pp):
    if arch.tie_embeddings and pp > 1:  # the last stage keeps its own copy of the tied embedding
        extra = arch.padded_vocab_size() * arch.hidden_size
    else:
        extra = 0
    total = sum(stage_parameters(arch, 1, pp, s) for s in range(pp))
    assert total == arch.num_parameters() + extra


def test_stage_parameters_tp_shards_everything_but_norms():
    arch = tiny()
    tp = 2
    replicated = arch.num_layers * 2 * arch.hidden_size + arch.hidden_size  # layer norms + final norm
    assert stage_parameters(arch, tp, 1, 0) * tp == arch.num_parameters(tp) + (tp - 1) * replicated


def test_layer_activation_bytes_by_hand():
    arch, tokens = tiny(), 4
    # bf16: 4h=32 (norm inputs, qkv/fc1 inputs) + q,k,v 4*(2+2)=16 + attn out & proj in 2*2*4=16 + MLP 4*16=64
    # -> 2 bytes * 4 tokens * 128 = 1024; fp32 stats: lse 4*4*2 = 32, two norm rstd 4*4*2 = 32
    assert layer_activation_bytes(arch, tokens, tp=1, sequence_parallel=False) == 1024 + 32 + 32
    # TP2 + SP: everything halves
    assert layer_activation_bytes(arch, tokens, tp=2, sequence_parallel=True) == (1024 + 32 + 32) // 2
    # TP2 without SP: the 4h terms and the rstd stay whole
    assert layer_activation_bytes(arch, tokens, tp=2, sequence_parallel=False) == \
        2 * 4 * (32 + 96 // 2) + 32 // 2 + 32
    # hidden dropout adds two one-byte masks per token and channel
    assert layer_activation_bytes(tiny(hidden_dropout=0.1), tokens, 1, False) == 1088 + 2 * 4 * 8
    # q/k layernorms keep their inputs (q + g = 3 head rows of d = 4 bf16 channels per token) and an fp32 rstd
    # per row: 4 tokens * 3 rows * (2 * 4 + 4) bytes
    assert layer_activation_bytes(tiny(qk_layernorm=True), tokens, 1, False) == 1088 + 4 * 3 * (2 * 4 + 4)


def test_pipeline_in_flight_and_recompute():
    arch = tiny(num_layers=4)
    per_layer = layer_activation_bytes(arch, 4, 1, False)
    lay = Layout(pp=2, micro_batch_size=1)
    # 1F1B: stage 0 keeps PP=2 micro-batches of its 2 layers, the last stage one
    assert stage_activation_bytes(arch, lay, 0, 4, num_microbatches=8) == 2 * 2 * per_layer
    assert stage_activation_bytes(arch, lay, 1, 4, num_microbatches=8) == 1 * 2 * per_layer
    assert stage_activation_bytes(arch, lay, 0, 4, num_microbatches=1) == 1 * 2 * per_layer
    # full recomputation: each layer keeps its bf16 input [T, h]; one layer is rebuilt at a time
    rec = Layout(pp=2, micro_batch_size=1, recompute=True)
    assert stage_activation_bytes(arch, rec, 0, 4, 8) == 2 * 2 * (2 * 4 * 8) + per_layer


def test_train_estimate_by_hand():
    arch = tiny()
    n = arch.num_parameters()
    job = Job("train", arch, seq_length=4, global_batch_size=4)
    est = estimate(job, Layout(dp=2, micro_batch_size=2))
    assert est.parts["weights"] == 2 * n
    assert est.parts["grads"] == 4 * n  # fp32 main grads
    assert est.parts["optimizer"] == 12 * n // 2  # master + m + v over DP=2
    assert est.parts["activations"] == 2 * layer_activation_bytes(arch, 8, 1, False)
    logits = 8 * 128
    assert est.parts["logits"] == 2 * logits + 2 * 4 * logits
    assert est.total == sum(est.parts.values())
    fp32 = estimate(Job("train", arch, 4, 4, param_bytes=4, distributed_optimizer=False), Layout())
    assert fp32.parts["optimizer"] == 8 * n and fp32.parts["weights"] == 4 * n


def test_distill_estimate_and_kd_buffers():
    student, teacher = tiny(), tiny(hidden_size=16, ffn_hidden_size=32, num_layers=4)
    job = Job("distill", student, 4, 4, teacher=teacher, teacher_bytes=1)
    est = estimate(job, Layout(micro_batch_size=1))
    assert est.parts["teacher_weights"] == teacher.num_parameters()  # 1 byte per weight, all on one stage
    assert "grads" in est.parts and est.parts["grads"] == 4 * student.num_parameters()
    lay = Layout(micro_batch_size=1)
    chunked = logits_and_loss_bytes(job, lay)["kd_loss_buffers"]
    naive = logits_and_loss_bytes(Job("distill", student, 4, 4, teacher=teacher, kd_loss="naive"), lay)
    assert chunked == KD_CHUNK_BUFFERS * 4 * 4 * 128 + 3 * 4 * 4  # the whole micro-batch fits one chunk
    assert naive["kd_loss_buffers"] == NAIVE_KD_COPIES * 4 * 4 * 128
    big = ModelArch(num_layers=1, hidden_size=64, ffn_hidden_size=64, num_attention_heads=1, vocab_size=131072,
                    seq_length=8192)
    big_job = Job("distill", big, 8192, 1, teacher=big)
    chunk_tokens = (1 << 24) // 131072  # 128 tokens of the full vocabulary per fp32 chunk
    assert logits_and_loss_bytes(big_job, Layout())["kd_loss_buffers"] == \
        KD_CHUNK_BUFFERS * 4 * chunk_tokens * 131072 + 3 * 4 * 8192
    with pytest.raises(ValueError, match="teacher"):
        estimate(Job("distill", student, 4, 4), Layout())


def test_fused_linear_kd_keeps_no_logits():
    student, teacher = tiny(), tiny(hidden_size=16, ffn_hidden_size=32, num_layers=4)
    job = Job("distill", student, 4, 4, teacher=teacher, kd_loss="fused_linear")
    parts = logits_and_loss_bytes(job, Layout(micro_batch_size=2))
    tokens, v, h, h_t = 8, 128, 8, 16
    assert parts["logits"] == tokens * v * (2 + 2)  # one chunk (the whole micro-batch) per model, bf16
    # d/dh_s [T, h], d/dW_s [V, h], the teacher's final hidden [T, h_t]; fp32 kd, lm, weights + int64 labels
    assert parts["kd_loss_buffers"] == 2 * tokens * h + 2 * v * h + 2 * tokens * h_t + (12 + 8) * tokens
    sp = logits_and_loss_bytes(job, Layout(tp=2, micro_batch_size=2, sequence_parallel=True))
    v2 = student.padded_vocab_size(2) // 2
    assert sp["logits"] == tokens * v2 * 4
    assert sp["kd_loss_buffers"] == 2 * tokens * h * 2 + 2 * v2 * h + 2 * tokens * h_t + 20 * tokens
    # at a real vocabulary the fused loss needs a small fraction of the chunked one's logits memory
    big = ModelArch(num_layers=1, hidden_size=64, ffn_hidden_size=64, num_attention_heads=1, vocab_size=131072,
                    seq_length=8192)
    fused = logits_and_loss_bytes(Job("distill", big, 8192, 1, teacher=big, kd_loss="fused_linear"), Layout())
    chunked = logits_and_loss_bytes(Job("distill", big, 8192, 1, teacher=big), Layout())
    assert fused["logits"] == 1024 * 131072 * 4  # 2^27 logits per model and chunk: 1024 tokens
    assert 10 * (fused["logits"] + fused["kd_loss_buffers"]) < chunked["logits"] + chunked["kd_loss_buffers"]


@pytest.mark.parametrize("vocab", [3000, (1 << 20) + 7, (1 << 20) - 5])
def test_fused_linear_chunk_is_the_one_kd_linear_uses(vocab, monkeypatch):
    import inspect

    import torch

    from megatron_minitron.distill import kd_linear
    from megatron_minitron.plan.memory import KD_LINEAR_CHUNK_LOGITS, fused_linear_chunk_tokens

    assert KD_LINEAR_CHUNK_LOGITS == kd_linear.DEFAULT_CHUNK_LOGITS
    seen = []
    real = kd_linear.FusedLinearKD.apply
    chunk_at = list(inspect.signature(kd_linear.FusedLinearKD.forward).parameters).index("chunk") - 1  # - ctx

    def spy(*args):
        seen.append(args[chunk_at])
        return real(*args)

    monkeypatch.setattr(kd_linear.FusedLinearKD, "apply", spy)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, 2, generator=g, dtype=torch.bfloat16)
    hidden = torch.randn(3, 2, generator=g, dtype=torch.bfloat16)
    kd_linear.linear_kd_loss(hidden, weight, hidden, weight, group=None, backend="torch")
    assert seen == [fused_linear_chunk_tokens(vocab, tokens=1 << 40)]


def test_prune_estimate_has_no_optimizer():
    est = estimate_stage(Job("prune", tiny(), 4, 1), Layout(), 0)
    assert "optimizer" not in est.parts and est.parts["pruned_copy"] == est.parts["weights"]


def test_layout_search_respects_shapes_and_memory():
    arch = tiny(num_attention_heads=4, num_query_groups=2, kv_channels=2, num_layers=4)
    job = Job("train", arch, 4, 16)
    layouts = enumerate_layouts(job, nodes=2, gpus_per_node=4)
    assert layouts and all(arch.query_groups % lay.tp == 0 and arch.num_layers % lay.pp == 0 for lay in layouts)
    assert all(lay.world_size == 8 and 16 % (lay.micro_batch_size * lay.dp) == 0 for lay in layouts)
    assert {lay.tp for lay in layouts} == {1, 2}  # 4 does not divide the 2 query groups
    best = best_layout(job, 2, 4, gpu_memory_gib=1.0, margin=0.1, overhead_gib=0)
    assert best.fits and best.estimate.total <= 0.9 * GIB
    assert best.layout.pp == 1 and not best.layout.recompute  # no bubble, no recompute when all fit
    with pytest.raises(ValueError, match="nothing fits"):
        best_layout(job, 2, 4, gpu_memory_gib=1e-6, overhead_gib=0)
    with pytest.raises(ValueError, match="no parallel layout"):
        best_layout(Job("train", tiny(num_layers=3), 4, 3), 2, 4)  # PP1 only, DP 4 or 8 cannot split 3


def test_plan_cli_table(tmp_path, capsys):
    from megatron_minitron.plan import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["plan", os.path.join(ROOT, "examples", "mn_minitron_8b_distill.yaml"),
                              "--teacher", os.path.join(ROOT, "examples", "mistral_nemo_12b_teacher_correction.yaml"),
                              "--nodes", "32"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "suggested: TP" in out and "parallel.tensor_model_parallel_size=" in out
    args = parser.parse_args(["plan", os.path.join(ROOT, "examples", "mn_minitron_8b_distill.yaml"), "--nodes", "1"])
    with pytest.raises(ValueError, match="--teacher"):
        args.handler(args)



def test_plan_prints_parameter_counts_at_every_scale():
    from megatron_minitron.plan import cli

    assert cli.parameter_count_text(8_412_000_000) == "8.41B"
    assert cli.parameter_count_text(262_720_000) == "262.72M"
    assert cli.parameter_count_text(999_999) == "999,999"
    assert cli.parameter_count_text(262_720) == "262,720"  # examples/tiny_cpu.yaml: not "0.00B"

def test_plan_kd_loss_follows_what_distill_runs_on_gpu(capsys):
    from megatron_minitron.distill.config import Distill
    from megatron_minitron.plan import cli

    assert cli.planned_kd_loss("auto", Distill(teacher="t")) == "fused_linear"  # forward KL, auto backend
    assert cli.planned_kd_loss("auto", Distill(teacher="t", logit_loss="mse")) == "chunked"  # needs logits
    assert cli.planned_kd_loss("auto", Distill(teacher="t", kd_loss_backend="triton")) == "chunked"
    assert cli.planned_kd_loss("auto", None) == "chunked"
    assert cli.planned_kd_loss("naive", Distill(teacher="t")) == "naive"
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    config = os.path.join(ROOT, "examples", "mn_minitron_8b_distill.yaml")
    teacher = os.path.join(ROOT, "examples", "mistral_nemo_12b_teacher_correction.yaml")
    base = ["plan", config, "--teacher", teacher, "--nodes", "1"]
    runs = {"default": base, "--kd-loss chunked": base + ["--kd-loss", "chunked"],
            "triton backend": base[:2] + ["distill.kd_loss_backend=triton"] + base[2:]}
    plans = {}
    for name, argv in runs.items():
        job, _ = cli.load_job(parser.parse_args(argv))
        plans[name] = (job.kd_loss, estimate(job, Layout(tp=8, sequence_parallel=True)).total)
    assert plans["default"][0] == "fused_linear"
    assert plans["--kd-loss chunked"][0] == plans["triton backend"][0] == "chunked"
    assert plans["default"][1] < plans["--kd-loss chunked"][1] == plans["triton backend"][1]


@pytest.mark.parametrize("block_sizes", [[], [2]])
def test_prune_plan_counts_the_boundary_states_block_importance_holds(monkeypatch, block_sizes):
    """The planner's boundary-state bytes equal the most the importance pass really holds at once (a tiny GPT,
    one calibration batch: the held states' bytes at every arrival), for blocks of 1 and of 2 layers; and the
    prune estimate counts them."""
    import torch

    from megatron_minitron.config import Parallel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.plan.memory import boundary_state_bytes, layer_activation_bytes
    from megatron_minitron.prune import ImportanceSettings, estimate_importance, importance
    from megatron_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1)
    arch = tiny(num_layers=4, seq_length=8)
    model = build_gpt(arch, Parallel())
    held = []
    real_boundary = importance._Probes._boundary

    def spy(self, j, h):
        held.append(sum(t.numel() * t.element_size() for t in self.hiddens.values()) + h.numel() * h.element_size())
        return real_boundary(self, j, h)

    monkeypatch.setattr(importance._Probes, "_boundary", spy)
    batch, seq = 2, 8
    tokens = torch.randint(0, arch.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    estimate_importance([model], [{"tokens": tokens}], ImportanceSettings(block_sizes=block_sizes))
    act_bytes = next(model.parameters()).element_size()
    assert len(held) == arch.num_layers + 1
    largest_block = max([1, *block_sizes])
    assert max(held) == boundary_state_bytes(arch, Layout(micro_batch_size=batch), batch * seq, act_bytes,
                                             block_size=largest_block)
    activations = estimate_stage(Job("prune", arch, seq, batch, param_bytes=act_bytes),
                                 Layout(micro_batch_size=batch), 0).parts["activations"]
    one_layer = layer_activation_bytes(arch, batch * seq, 1, False, act_bytes)
    assert activations - one_layer >= boundary_state_bytes(arch, Layout(), batch * seq, act_bytes)


def test_optimizer_step_counts_what_backward_did_not_free():
    """torch's foreach Adam allocates sqrt(v) for a whole param group in its step: 4 bytes per master weight of
    the rank. It comes after backward, so the plan adds only what the freed activations and logits lack: with
    full recompute and a long vocabulary-free model it shows, without recompute it is covered."""
    from megatron_minitron.plan.memory import FREED_BEFORE_STEP, optimizer_step_bytes

    arch = tiny(num_layers=8, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, vocab_size=64, seq_length=4)
    n = arch.num_parameters()
    lay = Layout(dp=2, micro_batch_size=1, recompute=True)
    job = Job("train", arch, 4, 2)
    assert optimizer_step_bytes(job, lay, n) == 4 * n // 2
    est = estimate(job, lay)
    freed = sum(est.parts.get(k, 0) for k in FREED_BEFORE_STEP)
    assert freed < 4 * n // 2 and est.parts["optimizer_step"] == 4 * n // 2 - freed
    assert est.total == sum(v for k, v in est.parts.items() if k not in FREED_BEFORE_STEP + ("optimizer_step",)) \
        + 4 * n // 2  # the step is the peak: resident state + its temporary
    fused = estimate(Job("train", arch, 4, 2, foreach_adam=False), lay)
    assert "optimizer_step" not in fused.parts and fused.total == est.total - est.parts["optimizer_step"]
    unsharded = estimate(Job("train", arch, 4, 2, distributed_optimizer=False), lay)
    assert unsharded.parts["optimizer_step"] == 4 * n - freed
    long_seq = estimate(Job("train", arch, 4096, 1), Layout(micro_batch_size=1))  # activations cover it
    assert "optimizer_step" not in long_seq.parts
    assert "optimizer_step" not in estimate(Job("prune", arch, 4, 1), Layout()).parts


def test_optimizer_step_bytes_are_the_temporary_megatrons_adam_really_allocates(monkeypatch):
    """The planner's step temporary against a real step of megatron-core's optimizer (bf16 params, fp32
    master weights, distributed optimizer) with torch's foreach AdamW, as on a GPU without Apex / TE: the
    largest tensors ``torch._foreach_sqrt`` returns in one call, summed."""
    import torch

    from megatron_minitron.config import Data, Parallel, Train, TrainConfig
    from megatron_minitron.plan.memory import optimizer_step_bytes
    from megatron_minitron.train.loop import Trainer
    from megatron_minitron.train.optim import set_adam_implementation

    arch = tiny(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, vocab_size=256, seq_length=8)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            t = torch.randint(0, arch.vocab_size, (arch.seq_length + 1,), generator=torch.Generator().manual_seed(i))
            return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(arch.seq_length),
                    "position_ids": torch.arange(arch.seq_length)}

    cfg = TrainConfig(model=arch, parallel=Parallel(), data=Data(micro_batch_size=2, global_batch_size=2),
                      train=Train(train_iters=1, lr_warmup_iters=0, eval_interval=0, eval_iters=0,
                                  precision="bf16", progress_bar=False))
    trainer = Trainer(cfg, datasets=(Tokens(), None)).setup()
    set_adam_implementation(trainer.optimizer, fused=False)
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in opt.optimizer.param_groups:
            group["foreach"] = True  # torch's default on CUDA; on the CPU it would loop per tensor
    calls = []
    real_sqrt = torch._foreach_sqrt

    def spy(tensors):
        out = real_sqrt(tensors)
        calls.append(sum(t.numel() * t.element_size() for t in out))
        return out

    monkeypatch.setattr(torch, "_foreach_sqrt", spy)
    trainer.train_step(trainer._batches(trainer.train_ds, 0))
    assert len(calls) == 2  # megatron's two param groups: weight-decayed, and norms (no decay)
    n = arch.num_parameters()
    planned = optimizer_step_bytes(Job("train", arch, arch.seq_length, 2), Layout(micro_batch_size=2), n)
    assert max(calls) <= planned <= 1.02 * max(calls)  # the planner counts the norms' few weights in too
