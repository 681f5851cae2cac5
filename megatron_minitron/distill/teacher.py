"""The co-located teacher: student and frozen teacher stages on the same ranks, one model to megatron.

``DistillationModel`` is what the training loop and megatron's pipeline schedule see. Each pipeline stage
holds its share of both models (same TP x PP; they may differ in width and depth). Between stages the
activation sent is ``cat([student_hidden, teacher_hidden], -1)``, so the p2p shapes are widened by the
teacher's hidden size (``adjust_tensor_shapes``); the teacher half carries no gradient. The last stage
returns both models' vocab-parallel logits (and captured hidden states) for the KD loss.

With ``fused_output`` (``distill.kd_loss_backend=fused_linear``, or ``auto`` for KL losses on GPU) the last
stage skips both output layers and returns the final hidden states and the output weights instead, for
``distill.kd_linear`` to compute the loss tile by tile without either model's [T, V] logits.

The teacher is deliberately *not* a registered submodule: DDP, the optimizer and checkpoints only ever
see the student and the KD projection layers, so the teacher has no grads, no optimizer state and is
never written. It runs in eval mode under ``torch.no_grad``.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule


def _global_layer_index(layer) -> int:
    return layer.layer_number - 1  # megatron's layer_number is 1-based and global across stages


def init_projection(weight: torch.Tensor, s_layer: int, t_layer: int) -> None:
    """nn.Linear's default uniform(+-1/sqrt(fan_in)), from a generator seeded by the pair, so the initial
    projection is the same at every parallel layout and on every rank."""
    bound = 1.0 / weight.shape[1] ** 0.5
    g = torch.Generator().manual_seed(1_000_003 * (s_layer + 1) + t_layer)
    with torch.no_grad():
        weight.copy_(torch.rand(weight.shape, generator=g, dtype=torch.float32).mul_(2 * bound).sub_(bound))


class _HiddenCapture:
    """Forward hooks recording the output hidden state of chosen (global) layers of one stage."""

    def __init__(self, model, wanted: set):
        self.states = {}
        self.handles = []
        for layer in model.decoder.layers:
            index = _global_layer_index(layer)
            if index in wanted:
                self.handles.append(layer.register_forward_hook(self._hook(index)))

    def _hook(self, index):
        def record(module, inputs, output):
            self.states[index] = output[0] if isinstance(output, tuple) else output
        return record

    def pop(self) -> dict:
        states, self.states = self.states, {}
        return states


class _OutputLayerBypass:
    """Within the context, ``model.output_layer`` returns its input (the final, normed hidden states,
    [s/TP, b, h] under sequence parallelism) instead of the logits; GPTModel then hands them back as
    [b, s(/TP), h]. Module hooks still run (megatron's param-gather pre-hooks)."""

    def __init__(self, model):
        self.layer = model.output_layer

    def __enter__(self):
        self.layer.forward = lambda input_, weight=None, runtime_gather_output=None: (input_, None)
        return self

    def __exit__(self, *exc):
        del self.layer.forward  # the instance attribute shadowed the class's forward


def output_weight(model) -> torch.Tensor:
    """The [V/TP, h] weight GPTModel's output layer multiplies by (the word embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


class DistillationModel(MegatronModule):
    def __init__(self, student, teacher, intermediate_pairs=(), sequence_parallel: bool = False,
                 fused_output: bool = False):
        super().__init__(config=student.config)
        self.student = student
        self.fused_output = fused_output
        if fused_output and any(getattr(m.config, "mtp_num_layers", None) for m in (student, teacher)):
            raise ValueError("distill.kd_loss_backend=fused_linear does not support multi-token prediction layers; "
                             "use kd_loss_backend=triton (the logits path)")
        object.__setattr__(self, "teacher", teacher)  # unregistered on purpose (see module docstring)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.pre_process, self.post_process = student.pre_process, student.post_process
        self.student_hidden = student.config.hidden_size
        self.teacher_hidden = teacher.config.hidden_size
        self.pairs = [tuple(p) for p in intermediate_pairs]
        self.kd_projections = torch.nn.ModuleDict()
        if self.post_process:
            # on the student's device: nothing moves the wrapper after this (DDP wraps it where it is)
            device = next(student.parameters()).device
            for s_layer, t_layer in self.pairs:
                if self.student_hidden != self.teacher_hidden:
                    proj = torch.nn.Linear(self.student_hidden, self.teacher_hidden, bias=False,
                                           dtype=student.config.params_dtype, device=device)
                    init_projection(proj.weight, s_layer, t_layer)
                    for p in proj.parameters():  # grads summed over TP when states are sequence-split
                        setattr(p, "sequence_parallel", sequence_parallel)
                    self.kd_projections[f"{s_layer}_{t_layer}"] = proj
        self._student_capture = _HiddenCapture(student, {s for s, _ in self.pairs})
        self._teacher_capture = _HiddenCapture(teacher, {t for _, t in self.pairs})

    def __getattr__(self, name):
        # megatron's schedules and grad finalisation look attributes up on the model they are given
        # (model_type, share_embeddings_and_output_weights, shared_embedding_or_output_weight, decoder, ...):
        # those are the student's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            student = self._modules.get("student")
            if student is None:
                raise
            return getattr(student, name)

    @property
    def init_target(self):
        """Where weights-only initialisation (`train.load` = the student checkpoint) goes."""
        return self.student

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (dropout off)
        return self

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if tensor is None:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        student_part, teacher_part = tensor.split([self.student_hidden, self.teacher_hidden], dim=-1)
        self.student.set_input_tensor(student_part)
        self.teacher.set_input_tensor(teacher_part.detach().to(self.teacher.config.params_dtype))

    def adjust_tensor_shapes(self, recv_shapes: list, send_shapes: list):
        widen = self.student_hidden + self.teacher_hidden

        def fix(shapes):
            return [tuple(s[:-1]) + (widen,) for s in shapes]
        return fix(recv_shapes), fix(send_shapes)

    def forward(self, input_ids, position_ids, attention_mask=None):
        if self.fused_output and self.post_process:
            return self._forward_final_hidden(input_ids, position_ids, attention_mask)
        with torch.no_grad():
            teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        student_out = self.student(input_ids, position_ids, attention_mask)
        if not self.post_process:
            return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)
        return {"student_logits": student_out, "teacher_logits": teacher_out,
                "student_hidden": self._student_capture.pop(), "teacher_hidden": self._teacher_capture.pop()}

    def _forward_final_hidden(self, input_ids, position_ids, attention_mask):
        """Last stage, fused output layer: final hidden states as [s(/TP), b, h] and both output weights."""
        with torch.no_grad(), _OutputLayerBypass(self.teacher):
            teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        with _OutputLayerBypass(self.student):
            student_out = self.student(input_ids, position_ids, attention_mask)
        return {"student_final_hidden": student_out.transpose(0, 1),
                "teacher_final_hidden": teacher_out.transpose(0, 1),
                "student_output_weight": output_weight(self.student),
                "teacher_output_weight": output_weight(self.teacher),
                "student_hidden": self._student_capture.pop(), "teacher_hidden": self._teacher_capture.pop()}

    def projection(self, s_layer: int, t_layer: int) -> Optional[torch.nn.Module]:
        return self.kd_projections[f"{s_layer}_{t_layer}"] if f"{s_layer}_{t_layer}" in self.kd_projections \
            else None

    # Checkpoints hold the student (under its own keys, so a distilled checkpoint is a plain GPT
    # checkpoint) plus the KD projections under `kd_projections.`.
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = self.student.sharded_state_dict(prefix, sharded_offsets, metadata)
        if len(self.kd_projections):
            state = self.kd_projections.state_dict(prefix="", keep_vars=True)
            sharded.update(make_sharded_tensors_for_checkpoint(state, f"{prefix}kd_projections."))
        return sharded

    def load_state_dict(self, state_dict, strict: bool = True):
        student_state = {k: v for k, v in state_dict.items() if not k.startswith("kd_projections.")}
        projection_state = {k[len("kd_projections."):]: v for k, v in state_dict.items()
                            if k.startswith("kd_projections.")}
        result = self.student.load_state_dict(student_state, strict=strict)
        if projection_state or (strict and len(self.kd_projections)):
            self.kd_projections.load_state_dict(projection_state, strict=strict)
        return result
