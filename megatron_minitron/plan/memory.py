"""Per-GPU memory of a train / distill / prune job at a parallel layout: pure functions of the architecture.

Every term is bytes on the most loaded rank (the maximum over pipeline stages). The model is the one our
trainer builds (``train/optim.py``, ``model/builder.py``, ``distill/``); see docs/memory_planner.md for the
derivation of each term and what is left out.

Weights and optimizer (megatron-core DDP with ``grad_reduce_in_fp32=True``):
    weights  N * param_bytes                  (bf16: 2, fp32: 4)
    grads    N * 4                            (the fp32 ``main_grad`` buffer, whatever the param dtype)
    optim    N * (4 + 4 + 4) / DP             (fp32 master copy + Adam m, v, sharded by the distributed
                                               optimizer; fp32 params need no master copy: 8 bytes)
    teacher  N_teacher * teacher_bytes         (frozen: no grads, no optimizer state)
    step     N * 4 / DP                       (torch's foreach Adam, megatron-core's without Apex / TE: its
                                               sqrt(v) temporary for a whole param group; after backward, so
                                               only what the freed activations and logits do not cover)

Activations per transformer layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", adapted): T = tokens in the micro-batch, t = TP, a = bytes of
the activation dtype, d = head dim, q/g = query heads/groups, f = ffn size. SDPA / flash attention keeps
no [s, s] scores (the paper's 5as^2b term is gone) but keeps its output and an fp32 log-sum-exp per head:
    norm inputs + QKV/fc1 inputs   4 h a T / t_sp   (t_sp = t with sequence parallelism, else 1)
    q, k, v                        d (q + 2g) a T / t
    attention output + proj input  2 q d a T / t
    MLP                            (4f if gated else 2f) a T / t   (fc1 output, act output, fc2 input)
    fp32 statistics                4 T (q / t + 2 / t_sp)      (log-sum-exp, two norm rstd)
    q/k layernorms (Qwen3)         d (q + g) a T / t + 4 T (q + g) / t   (their inputs, an rstd per head)
    dropout masks                  T h / t_sp per hidden dropout site (only when hidden_dropout > 0)
With full recomputation a layer keeps only its input (h a T / t_sp) and one layer is rebuilt at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelArch
from ..model import params

GIB = 1024 ** 3
KD_CHUNK_ELEMENTS = 1 << 24  # distill/vocab_parallel.DEFAULT_CHUNK_ELEMENTS: fp32 values per KD chunk
KD_CHUNK_BUFFERS = 3  # fp32 chunk temporaries alive at once in the chunked KD loss (a, b, softmax)
NAIVE_KD_COPIES = 5  # fp32 [T, V/t] copies of a naive log_softmax + kl_div (measured: +21.5 GB at 4.2 GB each)
KD_LINEAR_CHUNK_LOGITS = 1 << 27  # distill/kd_linear.DEFAULT_CHUNK_LOGITS: logits per chunk and model, fused KD
KD_LOSSES = ("chunked", "naive", "fused_linear")  # fused_linear: distill's GPU default for KL (kd_linear)
JOB_KINDS = ("train", "distill", "prune")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    recompute: bool = False
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        return (f"TP{self.tp} PP{self.pp} DP{self.dp} mbs{self.micro_batch_size}"
                f"{' SP' if self.sequence_parallel else ''}{' recompute' if self.recompute else ''}")


@dataclass
class Job:
    """What runs: the trained model (the student for distillation), an optional frozen teacher."""
    kind: str
    model: ModelArch
    seq_length: int
    global_batch_size: int
    teacher: Optional[ModelArch] = None
    param_bytes: int = 2  # bf16
    teacher_bytes: int = 2  # bf16; 1 for an fp8 teacher
    distributed_optimizer: bool = True
    # torch's foreach AdamW steps the optimizer (megatron-core without Apex / TE, train.fused_adam off)
    foreach_adam: bool = True
    kd_loss: str = "chunked"  # chunked (ours) | naive ([T, V/t] fp32 copies) | fused_linear (no [T, V] logits)
    lm_loss: bool = False  # distillation: backpropagate the CE term too (it is always reported)

    def validate(self) -> None:
        if self.kind not in JOB_KINDS:
            raise ValueError(f"job kind {self.kind!r}: one of {JOB_KINDS}")
        if self.kind == "distill" and self.teacher is None:
            raise ValueError("a distillation plan needs the teacher architecture: give --teacher (a checkpoint "
                             "or a YAML with a model section)")
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss={self.kd_loss!r}: one of {KD_LOSSES}")


@dataclass
class Estimate:
    layout: Layout
    stage: int  # the pipeline stage with the most memory
    parts: dict = field(default_factory=dict)  # name -> bytes on that stage

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def gib(self, name: Optional[str] = None) -> float:
        return (self.total if name is None else self.parts[name]) / GIB


# ------------------------------------------------------------------------------------------ parameters

def layer_parameters(arch: ModelArch, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (linear weights split, norms replicated)."""
    return params.layer_parameters_per_rank(arch, tp)


def layers_on_stage(num_layers: int, pp: int, stage: int) -> int:
    return num_layers // pp + (1 if stage < num_layers % pp else 0)


def stage_parameters(arch: ModelArch, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (a tied embedding's copy on a last stage that is
    not the first counts: megatron keeps one there)."""
    n = layers_on_stage(arch.num_layers, pp, stage) * layer_parameters(arch, tp)
    return n + params.outer_parameters_per_rank(arch, tp, first_stage=stage == 0, last_stage=stage == pp - 1)


def optimizer_step_bytes(job: Job, layout: Layout, n: int) -> int:
    """The temporary of one optimizer step on a rank holding ``n`` parameters: torch's foreach Adam computes
    sqrt(v) for every element of a param group at once (``torch._foreach_sqrt``, fp32), one more copy of the
    rank's largest group of master weights (the weight-decayed one: all but norms and biases; counted as all).
    Fused Adam (train.fused_adam, Apex's, TE's) updates in place: nothing."""
    if not job.foreach_adam:
        return 0
    return 4 * (n // layout.dp if job.distributed_optimizer else n)


# What the backward pass has released by the time the optimizer steps.
FREED_BEFORE_STEP = ("activations", "teacher_activations", "output_layer_input", "logits", "kd_loss_buffers")


# ------------------------------------------------------------------------------------------ activations

def layer_activation_bytes(arch: ModelArch, tokens: int, tp: int, sequence_parallel: bool,
                           act_bytes: int = 2) -> int:
    """Bytes one transformer layer keeps for backward for ``tokens`` tokens (no recomputation)."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, g = arch.num_attention_heads, arch.query_groups
    t_sp = tp if sequence_parallel else 1
    mlp = 4 * f if arch.activation == "swiglu" else 2 * f
    split_dims = d * (q + 2 * g) + 2 * q * d + mlp
    stored = act_bytes * tokens * (4 * h // t_sp + split_dims // tp)
    stored += 4 * tokens * q // tp + 4 * tokens * 2 // t_sp
    if arch.qk_layernorm:  # each norm keeps its input and one fp32 rstd per head row; RoPE after it keeps none
        stored += (act_bytes * d + 4) * tokens * (q + g) // tp
    if arch.hidden_dropout > 0:
        stored += 2 * tokens * h // t_sp
    return stored


def boundary_state_bytes(arch: ModelArch, layout: Layout, tokens: int, act_bytes: int = 2,
                         block_size: int = 1) -> int:
    """The most layer-boundary hidden states block importance (prune/importance.py ``_Probes``) holds at once
    for a micro-batch: a block of ``block_size`` layers is scored when its last state arrives, so the states
    of the last ``block_size`` boundaries wait next to the arriving one (default settings: size 1, two states;
    blocks that cross pipeline stages keep their states to the batch's end, not counted here)."""
    t_sp = layout.tp if layout.sequence_parallel else 1
    return (block_size + 1) * act_bytes * tokens * arch.hidden_size // t_sp


def stage_activation_bytes(arch: ModelArch, layout: Layout, stage: int, seq_length: int, num_microbatches: int,
                           act_bytes: int = 2) -> int:
    """Activations of stage ``stage``: 1F1B keeps min(PP - stage, M) micro-batches in flight."""
    tokens = layout.micro_batch_size * seq_length
    tp, sp = layout.tp, layout.sequence_parallel
    t_sp = tp if sp else 1
    layers = layers_on_stage(arch.num_layers, layout.pp, stage)
    in_flight = min(layout.pp - stage, num_microbatches)
    per_layer = layer_activation_bytes(arch, tokens, tp, sp, act_bytes)
    if layout.recompute:
        kept = layers * act_bytes * tokens * arch.hidden_size // t_sp
        return in_flight * kept + per_layer  # + the one layer rebuilt during its backward
    return in_flight * layers * per_layer


def logits_and_loss_bytes(job: Job, layout: Layout, act_bytes: int = 2) -> dict:
    """Last-stage buffers of the output layer and the loss for one micro-batch, by name."""
    tokens = layout.micro_batch_size * job.seq_length
    t_sp = layout.tp if layout.sequence_parallel else 1
    vocab_local = job.model.padded_vocab_size(layout.tp) // layout.tp
    logits = tokens * vocab_local
    parts = {"output_layer_input": act_bytes * tokens * job.model.hidden_size * 2 // t_sp}  # final norm in+out
    if job.kind == "train":
        # megatron's vocab-parallel CE: bf16 logits, its saved fp32 softmax, the fp32 gradient in backward
        parts["logits"] = act_bytes * logits + 2 * 4 * logits
    elif job.kind == "prune":
        parts["logits"] = act_bytes * logits + 4 * logits  # forward only (lm_loss depth metric)
    elif job.kd_loss == "fused_linear":
        parts.update(fused_linear_kd_bytes(job, layout, act_bytes))
    else:
        parts["logits"] = act_bytes * logits + job.teacher_bytes * logits  # both saved by the KD loss
        parts["logits"] += act_bytes * logits  # the student-logit gradient
        # the CE term is always computed (reported): an fp32 copy, and the saved softmax when trained
        parts["logits"] += 4 * logits * (2 if job.lm_loss else 1)
        if job.kd_loss == "naive":
            parts["kd_loss_buffers"] = NAIVE_KD_COPIES * 4 * logits
        else:
            chunk_tokens = max(1, min(tokens, KD_CHUNK_ELEMENTS // max(1, vocab_local)))
            parts["kd_loss_buffers"] = KD_CHUNK_BUFFERS * 4 * chunk_tokens * vocab_local + 3 * 4 * tokens
    return parts


def fused_linear_chunk_tokens(vocab_local: int, tokens: int) -> int:
    """Rows of the fused KD loss's logits buffers (``distill/kd_linear.linear_kd_loss``'s default chunk)."""
    chunk = max(1, KD_LINEAR_CHUNK_LOGITS // max(1, vocab_local))
    if chunk >= 128:
        chunk -= chunk % 64
    return min(chunk, tokens)


def fused_linear_kd_bytes(job: Job, layout: Layout, act_bytes: int = 2) -> dict:
    """Distillation with the KD (and LM) loss fused with both output layers (``distill/kd_linear.py``): neither
    model's [T, V/t] logits exist. What the loss holds at its peak (its forward, where the gradients are made):
    one [chunk, V/t] logits buffer per model; d loss / d h_s [T, h] and d loss / d W_s [V/t, h] (model dtype,
    kept until backward); the teacher's final hidden state [T, h_t] (and with SP the gathered student one,
    else it is the final-norm output already counted); per-token fp32 kd, lm and weights, int64 labels."""
    tokens = layout.micro_batch_size * job.seq_length
    vocab_local = job.model.padded_vocab_size(layout.tp) // layout.tp
    h, h_t = job.model.hidden_size, job.teacher.hidden_size
    # an fp8 teacher stores fp8 weights but its GEMMs write bf16 outputs
    teacher_act = job.teacher_bytes if job.teacher_bytes > 1 else act_bytes
    chunk = fused_linear_chunk_tokens(vocab_local, tokens)
    buffers = act_bytes * tokens * h + act_bytes * vocab_local * h + teacher_act * tokens * h_t
    if layout.sequence_parallel:
        buffers += act_bytes * tokens * h
    buffers += (3 * 4 + 8) * tokens
    return {"logits": chunk * vocab_local * (act_bytes + teacher_act), "kd_loss_buffers": buffers}


# ------------------------------------------------------------------------------------------ the estimate

def num_microbatches(job: Job, layout: Layout) -> int:
    per_step = layout.micro_batch_size * layout.dp
    if job.global_batch_size % per_step:
        raise ValueError(f"global batch {job.global_batch_size} is not a multiple of micro-batch "
                         f"{layout.micro_batch_size} x DP {layout.dp}")
    return job.global_batch_size // per_step


def estimate_stage(job: Job, layout: Layout, stage: int, overhead_bytes: int = 0) -> Estimate:
    """Memory of one rank of pipeline stage ``stage``, by component."""
    arch, tp, pp = job.model, layout.tp, layout.pp
    act_bytes = job.param_bytes
    n = stage_parameters(arch, tp, pp, stage)
    parts = {"weights": n * job.param_bytes}
    if job.kind == "prune":
        parts["pruned_copy"] = n * job.param_bytes  # trimmed shards built while the source is alive
        tokens = layout.micro_batch_size * job.seq_length
        # one layer's working set, the boundary states block importance holds, and their casts for the
        # cosines (half precision -> fp32, fp32 -> float64: importance._Boundaries)
        states = boundary_state_bytes(arch, layout, tokens, act_bytes)
        parts["activations"] = (layer_activation_bytes(arch, tokens, tp, layout.sequence_parallel, act_bytes)
                                + states + states * (4 if act_bytes < 4 else 8) // act_bytes)
    else:
        parts["grads"] = n * 4
        state = (12 if job.param_bytes < 4 else 8) * n
        parts["optimizer"] = state // layout.dp if job.distributed_optimizer else state
        m = num_microbatches(job, layout)
        parts["activations"] = stage_activation_bytes(arch, layout, stage, job.seq_length, m, act_bytes)
        if job.teacher is not None and job.kind == "distill":
            parts["teacher_weights"] = stage_parameters(job.teacher, tp, pp, stage) * job.teacher_bytes
            tokens = layout.micro_batch_size * job.seq_length
            t_sp = tp if layout.sequence_parallel else 1
            # the teacher runs without grad: only one layer's working set at a time (its largest tensors are
            # the MLP's fc1 and activation outputs), plus (PP > 1) its hidden state riding in every
            # in-flight p2p buffer next to the student's
            teacher = job.teacher
            fc1_out, act_out = params.axis_size(teacher, "fc1"), params.axis_size(teacher, "ffn")
            parts["teacher_activations"] = job.teacher_bytes * tokens * (fc1_out + act_out) // tp
            if pp > 1:
                in_flight = min(pp - stage, m)
                parts["teacher_activations"] += in_flight * act_bytes * tokens * teacher.hidden_size // t_sp
    if stage == pp - 1:
        parts.update(logits_and_loss_bytes(job, layout, act_bytes))
    if job.kind != "prune":
        # the step's peak comes after backward's: count only what it needs beyond the memory backward freed
        freed = sum(parts.get(name, 0) for name in FREED_BEFORE_STEP)
        step = optimizer_step_bytes(job, layout, n)
        if step > freed:
            parts["optimizer_step"] = step - freed
    if overhead_bytes:
        parts["runtime_overhead"] = overhead_bytes
    return Estimate(layout=layout, stage=stage, parts=parts)


def estimate(job: Job, layout: Layout, overhead_bytes: int = 0) -> Estimate:
    """The most loaded pipeline stage's estimate."""
    job.validate()
    stages = [estimate_stage(job, layout, s, overhead_bytes) for s in range(layout.pp)]
    return max(stages, key=lambda e: e.total)
