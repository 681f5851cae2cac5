"""A distillation run: resolve teacher and student from their checkpoints, check them against each other
before any work, then train the student with ``KDObjective`` on the shared training loop."""
from __future__ import annotations

from typing import Optional

from ..config import ModelArch, to_dict
from ..job_arch import JobArch, check_seq_length, show_warnings
from .config import DistillConfig


def prepare(cfg: DistillConfig) -> ModelArch:
    """Fill the student architecture from its checkpoint and validate everything; returns the teacher arch."""
    from .. import checkpoint
    from ..config import given_fields
    from ..job_arch import resolve_job_arch

    cfg.distill.validate()
    student_path = cfg.distill.student or cfg.train.load
    if not student_path:
        raise ValueError("distill.student (or train.load) is required: the student checkpoint, e.g. the "
                         "output of `minitron prune`")
    teacher_info = checkpoint.describe_checkpoint(cfg.distill.teacher)
    student_info = checkpoint.describe_checkpoint(student_path)
    teacher_arch = teacher_info.arch
    # the student's architecture is its checkpoint's; a given model.seq_length is the run's window (job_arch.py)
    student = resolve_job_arch(cfg.model, given_fields(cfg.model), student_info.arch,
                               f"the student checkpoint {student_path}")
    show_warnings(student)
    cfg.model = student.window_arch
    cfg.train.load = student_path
    check_compatible(cfg, teacher_arch, teacher_info, student_info)
    return teacher_arch


def check_compatible(cfg: DistillConfig, teacher: ModelArch, teacher_checkpoint=None,
                     student_checkpoint=None) -> None:
    """Teacher and student fit one distillation run (vocabulary, tokenizer, data, layout, windows). The
    checkpoints are CheckpointInfo descriptions (or raw metadata records); None skips the tokenizer check."""
    student, par, d = cfg.model, cfg.parallel, cfg.distill
    tp = par.tensor_model_parallel_size
    if teacher.vocab_size != student.vocab_size or teacher.padded_vocab_size(tp) != student.padded_vocab_size(tp):
        raise ValueError(f"teacher vocabulary ({teacher.vocab_size}, padded {teacher.padded_vocab_size(tp)}) "
                         f"and student vocabulary ({student.vocab_size}, padded "
                         f"{student.padded_vocab_size(tp)}) differ: logit distillation needs the same tokenizer")
    from ..checkpoint.description import recorded_tokenizer
    from ..data.tokenizer import same_tokenizer  # by vocabulary, not by path: prune copies the files

    t_tok, s_tok = recorded_tokenizer(teacher_checkpoint), recorded_tokenizer(student_checkpoint)
    if same_tokenizer(t_tok, s_tok) is False:
        raise ValueError(f"teacher tokenizer {t_tok} differs from student tokenizer {s_tok} (another "
                         "vocabulary); distill with the teacher's tokenizer (prune the student from this teacher)")
    data_tok = _data_tokenizer_record(cfg)
    if same_tokenizer(t_tok, data_tok) is False:
        raise ValueError(f"the training data was tokenized with {data_tok.get('path')} (vocabulary "
                         f"{data_tok.get('fingerprint')}), not with the teacher's tokenizer {t_tok}: the "
                         f"teacher would read other tokens than the text holds. Preprocess the data with the "
                         f"teacher's tokenizer (`minitron preprocess --tokenizer-model ...`)")
    if par.pipeline_split is not None:
        raise ValueError("parallel.pipeline_split is not supported for distillation yet: teacher and student "
                         "stages are split evenly (PP must divide both depths)")
    try:
        par.validate(teacher)
    except ValueError as e:
        raise ValueError(f"teacher: {e}") from None
    par.validate(student)
    # the teacher runs on the student's windows: beyond its learned positions is an error, beyond its rope
    # context a warning
    teacher_warnings = check_seq_length(student.seq_length, teacher, "model.seq_length", "the teacher")
    show_warnings(JobArch(teacher, student.seq_length, tuple(teacher_warnings)))
    for s_layer, t_layer in d.intermediate_pairs:
        if not 0 <= s_layer < student.num_layers:
            raise ValueError(f"distill.intermediate_pairs: student layer {s_layer} out of range "
                             f"0..{student.num_layers - 1}")
        if not 0 <= t_layer < teacher.num_layers:
            raise ValueError(f"distill.intermediate_pairs: teacher layer {t_layer} out of range "
                             f"0..{teacher.num_layers - 1}")
    if d.intermediate_pairs and par.pipeline_model_parallel_size > 1:
        s_first = student.num_layers - par.layers_per_stage(student.num_layers)[-1]
        t_first = teacher.num_layers - teacher.num_layers // par.pipeline_model_parallel_size
        for s_layer, t_layer in d.intermediate_pairs:
            if s_layer < s_first or t_layer < t_first:
                raise ValueError(
                    f"distill.intermediate_pairs [{s_layer}, {t_layer}]: with pipeline parallelism both layers "
                    f"must be on the last stage (student layers >= {s_first}, teacher layers >= {t_first}), "
                    "where the logit loss is; choose later layers or PP=1")


def _data_tokenizer_record(cfg: DistillConfig) -> Optional[dict]:
    """The record of the tokenizer the training data was written with (its sidecar), if known."""
    from ..data import load_tokenizer_sidecar, parse_blend

    if cfg.data.tokenizer_path:
        return None  # the user named the tokenizer; the data's sidecar is not consulted
    blend = parse_blend(cfg.data.train_data)
    tok = load_tokenizer_sidecar(blend[0][0]) if blend else None
    return tok.describe() if tok is not None else None


def run(cfg: DistillConfig):
    from ..train.loop import Trainer
    from .objective import KDObjective

    teacher_arch = prepare(cfg)
    provenance = {"distilled_from": cfg.distill.teacher, "student_init": cfg.train.load,
                  "distill": to_dict(cfg.distill)}
    trainer = Trainer(cfg, objective=KDObjective(cfg.distill, teacher_arch, cfg.distill.teacher),
                      provenance=provenance).setup()
    if trainer.rt.is_rank0 and cfg.train.save:  # the resolved run config beside metrics.jsonl, as train does
        import os

        from ..config import dump_yaml
        os.makedirs(cfg.train.save, exist_ok=True)
        dump_yaml(cfg, os.path.join(cfg.train.save, "config.yaml"))
    state = trainer.run()
    return trainer, state
