"""Knowledge distillation as a training-loop objective (``train.objective.Objective`` is the contract).

    L = kd_weight * L_logit  +  lm_loss_weight * L_CLM  +  alpha * L_is

L_logit: forward KL (default) between temperature-softened teacher and student distributions, computed
vocab-parallel (``losses.logit_kd_loss``); L_CLM: the student's next-token loss; L_is: intermediate-state
losses on the configured (student layer, teacher layer) pairs, alpha = L_logit / L_is (detached) or fixed;
the dynamic alpha is computed per micro-batch (where both losses are known), so it does not depend on the
parallel layout as long as the micro-batch size is kept.
All terms are token sums over the micro-batch (megatron divides by the global token count) and each is
reported separately.
With the output layers fused in (``kd_loss_backend=fused_linear``, and ``auto`` for the KL losses on GPU)
L_logit and L_CLM come from ``kd_linear.linear_kd_loss``: computed tile by tile from both models' final
hidden states and output weights, never materialising their [T, V] logits; the value and gradients are
those of the logits path.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from ..train.objective import BaseObjective, per_token_report
from .config import Distill
from .intermediate import dynamic_alpha, hidden_state_loss
from .kinds import KL_LOSSES
from .losses import logit_kd_loss, triton_available


def wants_fused_output_layer(distill: Distill) -> bool:
    """What the config asks for on a GPU: ``fused_linear``, or ``auto`` with a forward / reverse KL loss, where
    fusing saves both models' [T, V] logits (4 GB at Llama-3 vocabulary and 8k tokens) for the same GEMM work
    (MSE / cosine need the logits)."""
    return distill.kd_loss_backend == "fused_linear" or (distill.kd_loss_backend == "auto"
                                                          and distill.logit_loss in KL_LOSSES)


def uses_fused_output_layer(distill: Distill, device: torch.device, multi_token_prediction: bool = False) -> bool:
    """Whether the KD (and LM) loss is computed with the output layers fused in (``kd_linear``): always when
    asked (``fused_linear``); under ``auto`` when wanted and on a GPU, unless multi-token-prediction layers
    need the logits or Triton is missing (the fused path's epilogue would then run in torch)."""
    if distill.kd_loss_backend == "fused_linear":
        return True
    return (wants_fused_output_layer(distill) and device.type == "cuda" and not multi_token_prediction
            and triton_available())


class KDObjective(BaseObjective):
    def __init__(self, distill: Distill, teacher_arch, teacher_path: str):
        self.cfg = distill
        self.teacher_arch = teacher_arch
        self.teacher_path = teacher_path
        names = ["kd_loss", "lm_loss", "loss"]
        if distill.intermediate_pairs:
            names.insert(2, "is_loss")
        self.metric_names = tuple(names)
        self.fused_output = False  # decided in wrap_model, which knows the device

    # -- hooks called by the Trainer
    def wrap_model(self, trainer, student):
        from .teacher import DistillationModel

        teacher = self.build_teacher(trainer)
        mtp = any(getattr(m.config, "mtp_num_layers", None) for m in (student, teacher))
        self.fused_output = uses_fused_output_layer(self.cfg, trainer.rt.device, mtp)
        self.model = DistillationModel(student, teacher, self.cfg.intermediate_pairs,
                                       trainer.cfg.parallel.sequence_parallel, fused_output=self.fused_output)
        return self.model

    def build_teacher(self, trainer):
        """This rank's stage of the frozen teacher, at the student's layout, with its weights set."""
        from ..model.builder import build_gpt, resolve_dtype

        precision = self.cfg.teacher_precision
        dtype = trainer.dtype if precision in ("auto", "fp8") else resolve_dtype(precision)
        build = dict(attention_backend=trainer.cfg.train.attention_backend,
                     use_te=trainer.cfg.train.transformer_engine, device=trainer.rt.device,
                     initialize=False)  # set_teacher_weights fills every tensor (no CPU random init)
        if precision == "fp8":  # built from the FP8 layer spec; its weights are quantized once loaded
            from .fp8_teacher import FP8Options, build_fp8_teacher, quantize_weights
            teacher = build_fp8_teacher(self.teacher_arch, trainer.cfg.parallel, dtype,
                                        options=FP8Options(fast_accum=self.cfg.teacher_fp8_fast_accum), **build)
        else:
            teacher = build_gpt(self.teacher_arch, trainer.cfg.parallel, dtype, **build)
        self.set_teacher_weights(teacher)
        if precision == "fp8":
            quantize_weights(teacher)
        return teacher

    def set_teacher_weights(self, teacher) -> None:
        """Every tensor of the freshly built (uninitialised) teacher: from the teacher checkpoint. A subclass
        may set them otherwise (benchmarks/bench_kd_step.py draws random weights on the GPU)."""
        from .. import checkpoint

        checkpoint.load_weights(self.teacher_path, [teacher], arch=self.teacher_arch)

    def extra_flops_per_token(self, seq_length: int) -> float:
        """The teacher's forward, which each trained token also costs (for MFU)."""
        from ..train.progress import forward_flops_per_token

        return forward_flops_per_token(self.teacher_arch, seq_length)

    def schedule_kwargs(self, pipeline_parallel: bool) -> dict:
        return {"adjust_tensor_shapes_fn": self.model.adjust_tensor_shapes} if pipeline_parallel else {}

    def describe(self, arch) -> str:
        kd_path = ("fused with both output layers, no logits" if self.fused_output
                   else "from both models' logits")
        return (f"distill: student {arch.num_parameters():,} parameters from a teacher of "
                f"{self.teacher_arch.num_parameters():,}; {self.cfg.logit_loss} {kd_path}")

    # -- megatron forward step
    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None)
        return out, partial(self.loss_func, batch["labels"], batch["loss_mask"])

    def loss_func(self, labels, loss_mask, out):
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        mask = loss_mask.float()
        if "student_final_hidden" in out:
            total, kd, lm, token_mask = self._fused_logit_terms(labels, mask, out)
        else:
            total, kd, lm, token_mask = self._logit_terms(labels, mask, out)
        mask_flat = token_mask.reshape(-1)
        report = {**per_token_report("kd_loss", kd, token_mask), **per_token_report("lm_loss", lm, token_mask)}
        if cfg.intermediate_pairs:
            kd_sum = (kd.reshape(-1) * mask_flat).sum()
            is_local, is_sum, is_count = self._intermediate(out, mask, ps)
            alpha = (cfg.intermediate_weight if cfg.intermediate_weight is not None
                     else dynamic_alpha(kd_sum / mask_flat.sum().clamp(min=1), is_sum / is_count.clamp(min=1)))
            total = total + alpha * is_local
            # reported per token and pair, counted like the other terms (tokens) so DP sums stay exact
            report["is_loss"] = torch.stack([is_sum / len(self.model.pairs), mask_flat.sum()])
        report["loss"] = torch.stack([total.detach(), mask_flat.sum()])
        return total, mask_flat.sum().to(torch.int), report

    def _logit_terms(self, labels, mask, out):
        """kd_weight * L_logit + lm_loss_weight * L_CLM (token sums) from both models' logits, and the
        per-token KD and LM losses with the mask they are counted with ([b, s], like the logits)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        cfg = self.cfg
        student, teacher = out["student_logits"], out["teacher_logits"]
        kd = logit_kd_loss(student, teacher, cfg.logit_loss, temperature=cfg.temperature,
                           scale_by_temperature_squared=cfg.scale_by_temperature_squared, loss_mask=mask,
                           backend=cfg.kd_loss_backend)
        mask_flat = mask.reshape(-1)
        kd_sum = (kd.reshape(-1) * mask_flat).sum()
        total = cfg.kd_weight * kd_sum if cfg.kd_weight else kd_sum * 0.0
        # megatron's vocab-parallel CE works in place on its input: give it its own fp32 copy
        if cfg.lm_loss_weight:
            lm = vocab_parallel_cross_entropy(student.float().clone(), labels)
        else:
            with torch.no_grad():  # reported either way (validation LM loss of the student)
                lm = vocab_parallel_cross_entropy(student.detach().float().clone(), labels)
        if cfg.lm_loss_weight:
            total = total + cfg.lm_loss_weight * (lm.reshape(-1) * mask_flat).sum()
        return total, kd, lm, mask

    def _fused_logit_terms(self, labels, mask, out):
        """The same terms for ``fused_output`` models, from final hidden states and output weights
        (``kd_linear``); token order [s, b] like the states."""
        from .kd_linear import linear_kd_loss

        cfg = self.cfg
        token_mask = mask.t()
        fused = linear_kd_loss(out["student_final_hidden"], out["student_output_weight"], out["teacher_final_hidden"],
                               out["teacher_output_weight"], cfg.logit_loss, temperature=cfg.temperature,
                               scale_by_temperature_squared=cfg.scale_by_temperature_squared, loss_mask=token_mask,
                               labels=labels.t(), kd_weight=cfg.kd_weight, lm_weight=cfg.lm_loss_weight,
                               sequence_parallel=self.model.student.config.sequence_parallel)
        return fused.loss, fused.kd, fused.lm, token_mask

    def _intermediate(self, out, mask, ps):
        """Token sums of hidden-state losses over all pairs: (this rank's sum, to backpropagate; the whole
        sequence's sum, detached; the whole sequence's token x pair count). States [s, b, h], mask [b, s]."""
        token_mask = mask.transpose(0, 1)  # [s, b] like the hidden states
        sp = self.model.student.config.sequence_parallel
        if sp:  # states hold this rank's sequence shard
            tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
            chunk = token_mask.shape[0] // tp
            token_mask = token_mask[tp_rank * chunk:(tp_rank + 1) * chunk]
        total = torch.zeros((), device=mask.device)
        for s_layer, t_layer in self.model.pairs:
            per_token = hidden_state_loss(out["student_hidden"][s_layer], out["teacher_hidden"][t_layer],
                                          self.model.projection(s_layer, t_layer), self.cfg.intermediate_loss)
            total = total + (per_token * token_mask).sum()
        stats = torch.stack([total.detach(), token_mask.sum() * len(self.model.pairs)])
        if sp:  # alpha and the report use the whole sequence; each rank backpropagates its own shard
            dist.all_reduce(stats, group=ps.get_tensor_model_parallel_group())
        return total, stats[0], stats[1]
