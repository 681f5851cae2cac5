"""Lightweight architecture search (2407.14679 Sec. 2.3, Fig. 9): every candidate within the parameter budget
is pruned from one importance file, scored, distilled briefly (rankings settle after ~300 steps), scored again;
the best becomes a `minitron prune` target file.

Each candidate's result is written (atomically) as soon as it is known, so a search that stops resumes with
the next unfinished candidate; a candidate whose distillation was cut short (SIGTERM/SIGUSR1, or
train.exit_interval) stops the search after its checkpoint is saved and resumes from that checkpoint. A rerun
with settings that change the numbers (OPERATIONAL lists those that do not) is refused, so one ranking never
mixes results of different settings. Works under torchrun: every rank walks the same candidates, rank 0
writes the files, barriers order them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..config import ModelArch, from_dict, given_fields, to_dict
from ..distill.config import DistillConfig
from ..runtime.files import write_json_durably
from .report import rank_results, write_report
from .space import SearchSpace, candidate_name, enumerate_candidates, parameter_count, prune_targets

SCORES = ("val_kd_loss", "val_lm_loss")
SETTINGS_FILE = "search_settings.json"
# Settings that do not change a candidate's numbers (where and how often things are written, speed knobs);
# every other data/train/distill setting must match the recorded one for a rerun to reuse results.
OPERATIONAL = {
    "data": {"num_workers", "cache_dir"},
    "train": {"train_iters", "save", "load", "save_interval", "keep_last", "exit_interval", "eval_interval",
              "log_interval", "wandb", "wandb_project", "wandb_mode", "progress_bar", "recompute"},
    "distill": {"teacher", "student"},
}


@dataclass
class Search:
    load: Optional[str] = None  # the source (teacher) checkpoint
    output: Optional[str] = None  # search directory: candidates/, results/, ranking.md, best_prune.yaml
    param_budget: Optional[int] = None
    tolerance: float = 0.05
    count: str = "total"  # total | non_embedding parameters
    steps: int = 400  # short distillation per candidate (paper: ~400; rankings settle by ~300)
    max_candidates: Optional[int] = None  # the closest to the budget first
    scores: Optional[str] = None  # importance file (default OUTPUT/importance.pt; computed when missing)
    calib_samples: int = 1024
    calib_micro_batch_size: int = 1
    # the window of the calibration pass and of every candidate's distillation; None: the source checkpoint's
    # seq_length, its maximum context (131072 for an HF Llama-3.1 import: set this)
    seq_length: Optional[int] = None
    score_by: str = "val_kd_loss"
    space: SearchSpace = field(default_factory=SearchSpace)

    def validate(self) -> None:
        for name in ("load", "output", "param_budget"):
            if getattr(self, name) is None:
                raise ValueError(f"search.{name} is required (e.g. --{name.replace('_', '-')} ...)")
        if self.score_by not in SCORES:
            raise ValueError(f"search.score_by={self.score_by!r}: one of {SCORES}")
        if self.steps < 1:
            raise ValueError("search.steps must be >= 1")


@dataclass
class SearchConfig(DistillConfig):
    search: Search = field(default_factory=Search)


def comparable_settings(cfg: SearchConfig, scores: str) -> dict:
    """What every candidate's result depends on besides its architecture (JSON-normalised)."""
    s = cfg.search
    out = {"load": os.path.abspath(s.load), "scores": os.path.abspath(scores), "steps": s.steps,
           "seq_length": s.seq_length}
    for section, skip in OPERATIONAL.items():
        out[section] = {k: v for k, v in to_dict(getattr(cfg, section)).items() if k not in skip}
    return json.loads(json.dumps(out))


def settings_differences(recorded: dict, current: dict, prefix: str = "") -> list:
    """Dotted keys whose values differ, as 'key: recorded -> current' lines."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += settings_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return lines


def _check_or_record_settings(output: str, settings: dict, is_rank0: bool) -> None:
    from ..runtime.distributed import barrier

    path = os.path.join(output, SETTINGS_FILE)
    if os.path.exists(path):  # every rank reads (the same file) before rank 0 may write below
        with open(path) as f:
            diffs = settings_differences(json.load(f), settings)
        if diffs:
            raise ValueError(f"{output} holds results of a search with other settings ({'; '.join(diffs)}); "
                             "rerun with the recorded settings to resume it, or choose a new --output")
    barrier()
    if is_rank0:
        os.makedirs(os.path.join(output, "results"), exist_ok=True)
        if not os.path.exists(path):
            write_json_durably(path, settings, indent=1)
    barrier()


def run_search(cfg: SearchConfig, after_candidate: Optional[Callable[[dict], None]] = None) -> Optional[list]:
    """Returns the ranked results (best first), or None when a candidate's distillation was stopped (a
    signal or train.exit_interval; its checkpoint is saved: rerun to resume). ``after_candidate(result)`` is
    called as each candidate finishes in this run."""
    from .. import checkpoint
    from ..prune import Calibration, PruneConfig, PruneParallel
    from ..prune import run as prune
    from ..runtime.distributed import barrier, init_distributed, rank0_print

    s, par = cfg.search, cfg.parallel
    s.validate()
    if cfg.train.eval_iters < 1:
        raise ValueError("the search ranks candidates by validation loss: set train.eval_iters >= 1")
    from ..job_arch import check_seq_length

    defaults = ModelArch()  # a dumped config repeats the defaults: harmless, only other values are dropped
    ignored = sorted(n for n in given_fields(cfg.model) if getattr(cfg.model, n) != getattr(defaults, n))
    if ignored:  # never silently dropped (job_arch.py): candidates take their architecture from s.load
        raise ValueError(f"the search does not use the model section ({', '.join('model.' + n for n in ignored)}"
                         f" given): every candidate's architecture is pruned from search.load; drop them (the "
                         f"window of its calibration and distillations is search.seq_length, --seq-length)")
    source = checkpoint.read_arch(s.load)
    window = s.seq_length
    window_notes = [] if window is None else check_seq_length(window, source, "search.seq_length",
                                                              f"the source checkpoint {s.load}")
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    candidates = enumerate_candidates(source, s.space, s.param_budget, s.tolerance, tp, pp, s.count)
    candidates = candidates[:s.max_candidates] if s.max_candidates else candidates
    calib = next((p for p in cfg.data.train_data if isinstance(p, str)), None)
    scores = s.scores or os.path.join(s.output, "importance.pt")
    if not os.path.exists(scores) and calib is None:
        raise ValueError("the search needs calibration data for the importance scores: data.train_data "
                         "(--data PREFIX), or an existing importance file (--scores FILE)")
    rt = init_distributed(tp, pp)
    _check_or_record_settings(s.output, comparable_settings(cfg, scores), rt.is_rank0)
    for note in window_notes:
        rank0_print(f"warning: {note}")
    rank0_print(f"search: {len(candidates)} candidate(s) within {s.param_budget:,} +- {s.tolerance:.0%} "
                f"{s.count} parameters: " + ", ".join(candidate_name(a) for a in candidates))
    if not os.path.exists(scores):
        prune(PruneConfig(load=s.load, scores=scores, scores_only=True,
                          calibration=Calibration(data=calib, num_samples=s.calib_samples,
                                                  micro_batch_size=s.calib_micro_batch_size, seq_length=window),
                          parallel=PruneParallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)))
    results = []
    for arch in candidates:
        name = candidate_name(arch)
        done = os.path.join(s.output, "results", f"{name}.json")
        if os.path.exists(done):
            with open(done) as f:
                results.append(json.load(f))
            rank0_print(f"search: {name} already done")
            continue
        result = _run_candidate(cfg, arch, name, scores)
        if result is None:
            rank0_print(f"search: stopped during the distillation of {name} (its checkpoint is saved); rerun "
                        "the same command to resume")
            return None
        if rt.is_rank0:
            write_json_durably(done, result, indent=1)
        barrier()
        results.append(result)
        if after_candidate is not None:
            after_candidate(result)
    ranked = rank_results(results, s.score_by)
    if rt.is_rank0:
        write_report(s.output, ranked, s.score_by, s.steps, s.load, scores)
    barrier()
    return ranked


def _run_candidate(cfg: SearchConfig, arch, name, scores) -> Optional[dict]:
    from .. import checkpoint
    from ..distill.job import run as run_distillation
    from ..prune import PruneConfig, PruneParallel, PruneTargets
    from ..prune import run as prune
    from ..runtime.distributed import rank0_print

    s, par = cfg.search, cfg.parallel
    workdir = os.path.join(s.output, "candidates", name)
    pruned = os.path.join(workdir, "pruned")
    rank0_print(f"search: {name}: {parameter_count(arch):,} parameters")
    if not os.path.exists(os.path.join(pruned, checkpoint.METADATA_FILE)):  # saves are atomic
        pp = _prune_pipeline_size(cfg, arch, scores)
        prune(PruneConfig(load=s.load, save=pruned, scores=scores, targets=PruneTargets(**prune_targets(arch)),
                          parallel=PruneParallel(tensor_model_parallel_size=par.tensor_model_parallel_size,
                                                 pipeline_model_parallel_size=pp)))

    def distill_cfg(steps, save):  # the student's window, when the search has one (else its checkpoint's)
        model = ModelArch() if s.seq_length is None else from_dict(ModelArch, {"seq_length": s.seq_length})
        return DistillConfig(model=model, parallel=cfg.parallel, data=cfg.data,
                             train=dataclasses.replace(cfg.train, train_iters=steps, save=save, load=None),
                             distill=dataclasses.replace(cfg.distill, teacher=s.load, student=pruned))

    before = _evaluate(distill_cfg(0, None))  # the pruned model (train.load), never the resumed one
    if s.score_by not in before:
        raise ValueError(f"no validation data to compute {s.score_by}: give data.valid_data (--valid-data) or a "
                         "data.split with a validation part")
    trainer, state = run_distillation(distill_cfg(s.steps, os.path.join(workdir, "kd")))
    if state.iteration < s.steps:
        return None
    after = trainer.evaluate()
    return {"name": name, "targets": prune_targets(arch), "parameters": parameter_count(arch, "total"),
            "non_embedding_parameters": parameter_count(arch, "non_embedding"), "steps": s.steps,
            "before": before, "after": after,
            "architecture": to_dict(checkpoint.read_arch(pruned))}  # the pruned model's own (its no_rope_freq too)


def _prune_pipeline_size(cfg: SearchConfig, arch, scores: str) -> int:
    """The run's PP, unless the depth cut would leave one of its stages without layers: then PP=1 (the
    pruned checkpoint loads at any layout, so distillation still runs at the run's PP)."""
    from .. import checkpoint
    from ..prune import ImportanceScores, PruneTargets, make_plan
    from ..runtime.distributed import rank0_print

    par = cfg.parallel
    if par.pipeline_model_parallel_size == 1:
        return 1
    source = checkpoint.read_arch(cfg.search.load)
    plan = make_plan(ImportanceScores.load(scores), source, PruneTargets(**prune_targets(arch)),
                     tp=par.tensor_model_parallel_size)
    try:
        plan.target_pipeline_split(par.layers_per_stage(source.num_layers))
    except ValueError:
        rank0_print(f"search: keeping layers {plan.kept_layers} empties a pipeline stage; pruning at PP=1")
        return 1
    return par.pipeline_model_parallel_size


def _evaluate(cfg: DistillConfig) -> dict:
    from ..distill.job import prepare
    from ..distill.objective import KDObjective
    from ..train.loop import Trainer

    teacher_arch = prepare(cfg)
    trainer = Trainer(cfg, objective=KDObjective(cfg.distill, teacher_arch, cfg.distill.teacher)).setup()
    return trainer.evaluate()
