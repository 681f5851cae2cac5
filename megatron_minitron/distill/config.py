"""`minitron distill` configuration: the training sections plus what distillation adds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import TrainConfig
from .kinds import HIDDEN_LOSSES, KD_LOSS_BACKENDS, KL_LOSSES, LOGIT_LOSSES


@dataclass
class Distill:
    teacher: Optional[str] = None  # teacher checkpoint (its architecture comes from its metadata)
    student: Optional[str] = None  # student checkpoint (e.g. `minitron prune` output); None = train.load
    logit_loss: str = "forward_kl"  # KL(p_teacher || p_student): the paper's choice
    temperature: float = 1.0
    scale_by_temperature_squared: bool = True
    kd_weight: float = 1.0
    lm_loss_weight: float = 0.0  # paper best practice: logit-only KD unless depth is cut a lot
    # Intermediate-state pairs [student_layer, teacher_layer] (0-based global layer indices; the output of
    # that layer), student states projected to the teacher's width by a trained linear layer.
    intermediate_pairs: list = field(default_factory=list)
    intermediate_loss: str = "cosine"
    intermediate_weight: Optional[float] = None  # None = dynamic alpha = L_logit / L_is (detached)
    # auto (the student's) | bf16 | fp32 | fp8 (e4m3 matmuls in the teacher's transformer layers)
    teacher_precision: str = "auto"
    # fp8 only: Hopper's fast FP8 accumulation in the teacher's GEMMs (Transformer Engine's forward default)
    teacher_fp8_fast_accum: bool = False
    # auto: on GPU, forward/reverse KL fused with both output layers (no [T, V] logits, distill/kd_linear.py),
    # MSE/cosine from the logits; on CPU the chunked torch path. fused_linear forces the fused path (also on
    # CPU); triton / torch: the logits path with the Triton KL kernel / in torch.
    kd_loss_backend: str = "auto"

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError("distill.teacher is required: the checkpoint of the unpruned teacher")
        if self.logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"distill.logit_loss={self.logit_loss!r}: choose one of {LOGIT_LOSSES}")
        if self.intermediate_loss not in HIDDEN_LOSSES:
            raise ValueError(f"distill.intermediate_loss={self.intermediate_loss!r}: one of {HIDDEN_LOSSES}")
        if not self.temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.kd_weight < 0 or self.lm_loss_weight < 0:
            raise ValueError("distill.kd_weight and distill.lm_loss_weight must be >= 0")
        if self.kd_weight == 0 and self.lm_loss_weight == 0 and not self.intermediate_pairs:
            raise ValueError("every loss weight is 0: set distill.kd_weight > 0 (the default is 1)")
        for pair in self.intermediate_pairs:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(i, int) for i in pair)):
                raise ValueError(f"distill.intermediate_pairs entry {pair!r} must be [student_layer, "
                                 "teacher_layer] (0-based integers)")
        if self.teacher_precision not in ("auto", "bf16", "fp32", "fp8"):
            raise ValueError(f"distill.teacher_precision={self.teacher_precision!r}: auto, bf16, fp32 or fp8")
        if self.teacher_fp8_fast_accum and self.teacher_precision != "fp8":
            raise ValueError("distill.teacher_fp8_fast_accum=true only applies to distill.teacher_precision=fp8")
        if self.kd_loss_backend not in KD_LOSS_BACKENDS:
            raise ValueError(f"distill.kd_loss_backend={self.kd_loss_backend!r}: one of {KD_LOSS_BACKENDS}")
        if self.kd_loss_backend in ("triton", "fused_linear") and self.logit_loss not in KL_LOSSES:
            raise ValueError(f"distill.kd_loss_backend={self.kd_loss_backend} implements {' and '.join(KL_LOSSES)}, "
                             f"not {self.logit_loss!r}: use kd_loss_backend=auto")


@dataclass
class DistillConfig(TrainConfig):
    distill: Distill = field(default_factory=Distill)
