"""`PruneConfig`: everything one prune run needs, as a typed dataclass (the job is prune/job.py).

Built in code (``PruneConfig(load=..., save=..., targets=PruneTargets(...))``), or from YAML and
``key=value`` overrides like the other jobs (``load_config(PruneConfig, "prune.yaml", ["save=OUT"])``)::

    load: runs/teacher
    save: runs/pruned
    scores: runs/importance.pt          # read if it exists, else computed and written
    targets: {hidden_size: 3072, ffn_hidden_size: 9216, num_layers: 16}
    calibration: {data: data/mix_train, num_samples: 1024}
    importance: {depth_metrics: [bi, lm_loss]}
    parallel: {tensor_model_parallel_size: 2}

Each field is the `minitron prune` flag of the same name (``--num-samples`` = ``calibration.num_samples``,
``--no-head-merge`` = ``head_merge: false``, ``--tp`` / ``--pp`` = ``parallel.*``); error messages name the
flags. ``validate()`` checks what needs no file; ``job.prepare`` checks the rest before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .plan import PruneTargets
from .scores import ImportanceSettings

SAVE_FORMATS = ("minitron", "megatron-lm")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class Calibration:
    """The calibration pass that computes importance scores (skipped when ``scores`` exists)."""

    data: Optional[str] = None  # dataset prefix (.bin/.idx) from `minitron preprocess`
    num_samples: int = 1024  # paper: 1024
    micro_batch_size: int = 1
    seq_length: Optional[int] = None  # None = the checkpoint's seq_length (its maximum context)
    seed: int = 1234  # which windows of the data are sampled


@dataclass
class PruneParallel:
    """The layout the prune runs at (the pruned checkpoint loads at any layout)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1


@dataclass
class PruneConfig:
    load: Optional[str] = None  # source checkpoint (a directory, or a root with `latest`)
    save: Optional[str] = None  # where the pruned checkpoint goes (or in_place)
    in_place: bool = False  # replace `load` by the pruned checkpoint (crash-safe; prune/rewrite.py)
    save_format: Optional[str] = None  # minitron | megatron-lm; None = the input's format
    scores: Optional[str] = None  # importance scores file: read if it exists, else computed and written
    scores_only: bool = False  # compute / write `scores` and stop
    targets: PruneTargets = field(default_factory=PruneTargets)
    calibration: Calibration = field(default_factory=Calibration)
    importance: ImportanceSettings = field(default_factory=ImportanceSettings)
    head_merge: bool = True  # fold pruned heads into kept ones
    parallel: PruneParallel = field(default_factory=PruneParallel)
    precision: str = "auto"  # auto (the dtype the checkpoint was saved in) | bf16 | fp32
    plan_out: Optional[str] = None  # also write the plan (kept indices) as JSON here

    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_model_parallel_size

    def validate(self) -> None:
        """The checks that need no file (job.prepare does the rest); ValueError with the fix."""
        if not self.load:
            raise ValueError("give --load SRC (PruneConfig.load / `load:`), the checkpoint to prune")
        if self.scores_only:
            if self.in_place or self.save:
                raise ValueError("--scores-only writes only --scores; drop --save/--in-place")
            if not self.scores:
                raise ValueError("--scores-only needs --scores PATH to write the scores to")
        elif not self.in_place and not self.save:
            raise ValueError("give --save OUT for the pruned checkpoint, or --in-place to replace --load "
                             "(or --scores-only with --scores PATH)")
        if self.save_format is not None and self.save_format not in SAVE_FORMATS:
            raise ValueError(f"--save-format {self.save_format!r}: choose one of {', '.join(SAVE_FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"--tp and --pp (parallel.*) must be >= 1, got TP={self.tp} PP={self.pp}")
        c = self.calibration
        if c.num_samples < 1 or c.micro_batch_size < 1:
            raise ValueError("--num-samples and --micro-batch-size must be >= 1")
        self.importance.validate()
