"""A prune run as a library job: ``run(PruneConfig(...))`` (works under torchrun; `minitron prune` is a thin
front end, prune/cli.py).

``prepare(cfg)`` checks everything before a model is built or a file written: the config, the source's
metadata, the targets against it, the scores file (a plan is made up front when it holds what the targets
need) or the calibration data. ``run`` then loads the source, computes importance (a calibration pass, or
the ``scores`` file when it exists), plans, trims each rank's shards and saves the pruned model (loadable
at any layout) with the source's tokenizer, ``prune_plan.json`` (kept indices) and ``prune_summary.yaml``.
``in_place`` replaces the source crash-safely (prune/rewrite.py). See docs/pruning.md.

Removal metrics that live elsewhere (downstream accuracy: ``eval.depth.accuracy_depth_metric``) are passed
in as ``depth_metrics={name: fn}``; library pruning imports no evaluation code.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, List, Mapping, Optional

from ..checkpoint.description import DTYPE_NAMES, CheckpointInfo
from ..config import ModelArch, Parallel
from .config import PruneConfig
from .depth import DepthMetric, known_depth_metrics, unknown_depth_metric_message
from .plan import PrunePlan, PruneTargets, ResolvedTargets
from .scores import ImportanceScores, ImportanceSettings

if TYPE_CHECKING:
    from ..checkpoint.layout import SavePaths


@dataclass
class PreparedPrune:
    """What ``run`` needs, checked before any model is built or any file written."""

    arch: ModelArch  # the source's
    source: CheckpointInfo  # the source checkpoint's description
    targets: PruneTargets
    resolved: ResolvedTargets  # target sizes after defaults
    settings: ImportanceSettings  # of the calibration pass (with what the targets and depth_metrics add)
    scores: Optional[ImportanceScores]  # loaded when the scores file exists and holds what the plan needs
    plan: Optional[PrunePlan]  # made up front when the scores are known
    parallel: Parallel  # the layout of this run
    rewrite: Optional[SavePaths]  # in_place: final / staged / aside names
    save: Optional[str]  # absolute output directory (None: in_place or scores_only)
    notes: List[str]  # printed at the start of the run
    seq_length: int  # the calibration window (calibration.seq_length, else the checkpoint's seq_length)
    save_format: str  # "minitron" | "megatron-lm"


@dataclass
class PruneResult:
    output: Optional[str]  # the pruned checkpoint's directory; None for scores_only
    plan: Optional[PrunePlan]  # None for scores_only
    summary: Optional[dict]  # what prune_summary.yaml holds; None for scores_only
    scores: ImportanceScores  # the scores the plan was made from (computed or read)


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _save_format(cfg: PruneConfig, source: str) -> str:
    """The output's format: the one asked for, else the source's (``source``: "minitron" | "megatron-lm")."""
    wanted = cfg.save_format
    if cfg.in_place and wanted is not None and wanted != source:
        raise ValueError(f"--in-place keeps the input's format ({source}); drop --save-format {wanted}, or "
                         f"write the {wanted} copy to a new directory with --save")
    return wanted or source


def _check_output(cfg: PruneConfig, source_dir: str, save_format: str) -> Optional[str]:
    """The output directory (absolute), None for in_place / scores_only; refuses to overwrite the source or
    a directory that is not a checkpoint of the format written."""
    from ..checkpoint import layout

    if cfg.scores_only:
        return None
    if cfg.in_place:
        if cfg.save and not _same_path(cfg.save, cfg.load):
            raise ValueError("--in-place rewrites --load itself; drop --save (or drop --in-place to write "
                             "the pruned checkpoint to --save)")
        return None
    if _same_path(cfg.save, cfg.load) or _same_path(cfg.save, source_dir):
        raise ValueError(f"--save {cfg.save} is the source checkpoint; pass --in-place to replace it "
                         "(crash-safe), or choose another --save directory")
    out = os.path.abspath(cfg.save)
    if save_format == "megatron-lm":
        if os.path.exists(out) and (not os.path.isdir(out) or (
                os.listdir(out) and not layout.is_megatron_lm_root(out))):
            raise ValueError(f"--save {out} exists and is not a Megatron-LM checkpoint root (no "
                             f"{layout.TRACKER_FILE}); choose a new directory or remove it first")
        return out
    if os.path.exists(out) and (not os.path.isdir(out)
                                or (os.listdir(out) and not layout.looks_like_checkpoint(out))):
        raise ValueError(f"--save {out} exists and is not a megatron-minitron checkpoint; refusing to "
                         "overwrite it. Choose a new directory or remove it first")
    return out


def _check_data(prefix: str, num_samples: int, seq: int) -> None:
    """The calibration set holds at least ``num_samples`` windows of ``seq`` (+1) tokens (one epoch, as
    ``data.calibration_batches`` cuts it); read from the .idx alone."""
    for ext in (".bin", ".idx"):
        if not os.path.exists(prefix + ext):
            raise FileNotFoundError(f"calibration data {prefix}{ext} not found; pass the prefix of a dataset "
                                    "built by `minitron preprocess` (without .bin/.idx)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix)  # keep it alive: its mmap closes when it is collected
    tokens = int(index.sequence_lengths.sum())
    del index
    available = max(tokens - 1, 0) // seq
    if available < num_samples:
        raise ValueError(f"{prefix} holds {tokens} tokens = {available} sequences of {seq} (+1) tokens, fewer "
                         f"than --num-samples {num_samples}; lower --num-samples or --seq-length, or give "
                         "more data")


def _add_passed_metrics(settings: ImportanceSettings, extra_metrics: Collection[str], notes: list) -> None:
    """Metrics passed to the job are computed by its calibration pass."""
    for name in extra_metrics:
        if name not in settings.depth_metrics:
            settings.depth_metrics.append(name)
            notes.append(f"depth metric {name!r} added (passed to the prune job)")


def _depth_needs(arch: ModelArch, targets: PruneTargets, resolved: ResolvedTargets,
                 settings: ImportanceSettings, notes: list) -> None:
    """When a metric picks the layers, make the calibration pass compute exactly what the plan reads."""
    if resolved.drop is not None or resolved.num_layers == arch.num_layers:
        return
    metric = targets.depth_metric
    if metric not in settings.depth_metrics:
        settings.depth_metrics.append(metric)
        notes.append(f"depth metric {metric!r} added (the num_layers target ranks layers by it)")
    k = arch.num_layers - resolved.num_layers
    if targets.contiguous and k > 1 and k not in settings.block_sizes:
        settings.block_sizes.append(k)
        notes.append(f"block size {k} added (a contiguous block of {k} layers is dropped)")


def _depth_what(metric: str, size: int) -> str:
    return f"{metric!r} scores for {'single layers' if size == 1 else f'blocks of {size} layers'}"


def _lacking_depth_message(path: str, scores: ImportanceScores, arch: ModelArch, targets: PruneTargets,
                           lacking: tuple) -> str:
    metric, size = lacking
    flags = f"--depth-metrics {metric}" + (f" --block-sizes {size}" if size > 1 else "")
    contiguous = " contiguous=true" if targets.contiguous else ""
    return (f"--scores {path} has no {_depth_what(metric, size)} (it has {scores.depth_inventory()}), which "
            f"--target num_layers={targets.num_layers}{contiguous} ranks the {arch.num_layers} layers by. Give "
            f"--data PREFIX (calibration data) to compute them - the file is rewritten with them - or recompute "
            f"the file with `minitron prune --load ... --data PREFIX --scores {path} --scores-only {flags}`")


def _extend_settings(saved: ImportanceSettings, wanted: ImportanceSettings,
                     extra_metrics: Collection[str]) -> ImportanceSettings:
    """The settings a file was computed with, plus the depth metrics / block sizes asked for now (the new file
    keeps what the old one held, except a metric that is not known now, e.g. 'accuracy' when no accuracy
    metric is passed in)."""
    known = set(known_depth_metrics()) | set(extra_metrics)
    old = [m for m in saved.depth_metrics if m == "bi" or m in known]
    return dataclasses.replace(saved, depth_metrics=list(dict.fromkeys([*old, *wanted.depth_metrics])),
                               block_sizes=sorted({*map(int, saved.block_sizes), *wanted.block_sizes}))


def _own_settings(settings: ImportanceSettings) -> ImportanceSettings:
    """A copy whose lists prepare may extend without changing the caller's config."""
    return dataclasses.replace(settings, depth_metrics=list(settings.depth_metrics),
                               block_sizes=[int(k) for k in settings.block_sizes])


def prepare(cfg: PruneConfig, extra_metrics: Collection[str] = ()) -> PreparedPrune:
    """Validate the whole run; reads the source description (and the scores file / the data index), writes nothing.
    ``extra_metrics``: names of the removal metrics the caller passes to ``run`` (``depth_metrics``)."""
    from .. import checkpoint
    from ..job_arch import check_seq_length
    from .plan import depth_scores_needed, make_plan, pipeline_split_after_pruning, validate_targets

    cfg.validate()
    targets = cfg.targets
    info = checkpoint.describe_checkpoint(cfg.load)  # FileNotFoundError / ValueError when not a checkpoint
    arch = info.arch
    if cfg.in_place and info.contents.backend != "torch_dist":
        raise ValueError(f"--in-place rewrites {cfg.load} in its own format, but it is a Megatron-LM "
                         f"--ckpt-format {info.contents.backend} checkpoint, which megatron-minitron reads and does "
                         f"not write; use --save OUT (Megatron-LM's torch_dist, which its --load reads, by default)")
    save_format = _save_format(cfg, info.format)
    save = _check_output(cfg, info.directory, save_format)
    if save_format == "megatron-lm" and not cfg.scores_only:
        from ..checkpoint.megatron_lm import check_representable
        check_representable(arch, f"--save-format megatron-lm: {cfg.load}")
    calib = cfg.calibration
    seq_length = arch.seq_length if calib.seq_length is None else calib.seq_length
    notes = [f"warning: {w}" for w in check_seq_length(seq_length, arch, "--seq-length",
                                                       f"the checkpoint {cfg.load}")]
    par = Parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp)
    par.validate(arch)
    resolved = validate_targets(arch, targets, tp=cfg.tp)
    settings = _own_settings(cfg.importance)
    settings.validate(arch.num_layers)
    scores = plan = None
    if cfg.scores and os.path.exists(cfg.scores):
        scores = ImportanceScores.load(cfg.scores)
        lacking = depth_scores_needed(arch, targets)
        if lacking is not None and not scores.has_depth(*lacking):
            if not calib.data:
                raise ValueError(_lacking_depth_message(cfg.scores, scores, arch, targets, lacking))
            # one calibration pass computes them; the file is rewritten with everything it held plus them
            notes.append(f"{cfg.scores} has no {_depth_what(*lacking)}: computing importance again on "
                         f"{calib.data} (its settings, with the depth scores added) and rewriting it")
            settings = _extend_settings(scores.settings, settings, extra_metrics)
            scores = None
        elif not cfg.scores_only:
            plan = make_plan(scores, arch, targets, tp=cfg.tp, merge_heads=cfg.head_merge)
    if scores is None:
        if not calib.data:
            raise ValueError("give --data PREFIX (calibration data) or an existing --scores file")
        _add_passed_metrics(settings, extra_metrics, notes)
        _depth_needs(arch, targets, resolved, settings, notes)
        settings.validate(arch.num_layers)
        known = set(known_depth_metrics()) | set(extra_metrics)
        for metric in settings.depth_metrics:
            if metric != "bi" and metric not in known:
                raise ValueError(unknown_depth_metric_message(metric, known))
        _check_data(calib.data, calib.num_samples, seq_length)
        from ..data import check_token_ids
        check_token_ids([calib.data], arch.vocab_size, "--data (calibration)")
    if cfg.pp > 1 and not cfg.scores_only:
        kept = (plan.kept_layers if plan is not None else
                None if resolved.drop is None else [i for i in range(arch.num_layers) if i not in resolved.drop])
        if kept is not None:  # a stage left without layers fails now rather than after calibration
            pipeline_split_after_pruning(kept, par.layers_per_stage(arch.num_layers))
    rewrite = None
    if cfg.in_place:
        from .rewrite import rewrite_paths
        rewrite = rewrite_paths(cfg.load, save_format)
    return PreparedPrune(arch=arch, source=info, targets=targets, resolved=resolved, settings=settings,
                         scores=scores, plan=plan, parallel=par, rewrite=rewrite, save=save, notes=notes,
                         seq_length=seq_length, save_format=save_format)


def _dtype(precision: str, info: CheckpointInfo):
    from ..model.builder import resolve_dtype

    if precision == "auto" and info.params_dtype in DTYPE_NAMES:
        return info.torch_dtype()
    return resolve_dtype(precision)


def _tokenizer_for(info: CheckpointInfo, final_dir: str):
    """The source's tokenizer record; a path pointing into the source checkpoint now points into ours."""
    tok = info.tokenizer
    if tok is not None and tok.get("path") and _same_path(tok["path"], info.directory):
        return {**tok, "path": final_dir}
    return tok


def _write_text(path: str, text: str) -> None:
    from ..runtime.files import write_file_durably

    write_file_durably(path, text)


def run(cfg: PruneConfig, depth_metrics: Optional[Mapping[str, DepthMetric]] = None) -> PruneResult:
    """Prune as ``cfg`` says (collective under torchrun: every rank calls it). ``depth_metrics``: removal
    metrics of this run (name -> ``fn(ctx, layers) -> float``, see prune/depth.py); a calibration pass
    computes each of them, and ``targets.depth_metric`` may name one."""
    from megatron.core import parallel_state as ps

    from .. import checkpoint
    from ..checkpoint.lock import lock_output_on_rank0
    from ..hf.io import copy_tokenizer_files
    from ..model.builder import build_gpt
    from ..runtime.distributed import barrier, init_distributed, rank0_print
    from .importance import estimate_importance
    from .plan import make_plan
    from .rewrite import on_rank0, recover_interrupted_rewrite, save_and_swap
    from .summary import PLAN_FILE, PhaseTimer, build_summary, format_summary, importance_record, write_summary
    from .trim import prune_model_state

    depth_metrics = dict(depth_metrics or {})
    timer = PhaseTimer()
    with timer("validate"):
        job = prepare(cfg, extra_metrics=tuple(depth_metrics))
    rt = init_distributed(cfg.tp, cfg.pp)
    output_lock = None  # held until return: one writer per output, a second prune into it fails at once
    if job.rewrite is not None:
        output_lock = lock_output_on_rank0(job.rewrite.root or job.rewrite.final, job.rewrite.root is not None,
                                           "--in-place checkpoint")
    elif job.save:  # --scores-only writes no checkpoint
        output_lock = lock_output_on_rank0(job.save, False, "--save directory")
    where = f"in place ({job.rewrite.final})" if job.rewrite is not None else f"-> {job.save}"
    calib = cfg.calibration
    source = "--scores file" if job.scores is not None else (
        f"{calib.num_samples} calibration samples x {job.seq_length} tokens from {calib.data}")
    rank0_print(f"[prune] {cfg.load}: {job.arch.num_parameters():,} parameters, {job.arch.num_layers} layers, "
                f"hidden {job.arch.hidden_size}, ffn {job.arch.ffn_hidden_size}, {job.arch.num_attention_heads} "
                f"heads / {job.arch.query_groups} groups; TP{rt.tp} PP{rt.pp}; importance from {source}; {where}")
    for note in job.notes:
        rank0_print(f"[prune] {note}")
    if job.rewrite is not None:
        on_rank0(lambda: recover_interrupted_rewrite(job.rewrite), "settling an interrupted --in-place run")
        if job.rewrite.retire is not None:  # a Megatron-LM root: the pruned weights become ROOT/release
            rank0_print(f"[prune] --in-place on {job.rewrite.root}: {job.rewrite.retire} (the iteration its "
                        f"tracker names) is replaced by {job.rewrite.final}, which the tracker then names")
        elif job.rewrite.root is not None:
            rank0_print(f"[prune] --in-place on {job.rewrite.root}: rewriting {job.rewrite.final} (the "
                        "iteration `latest` names); other iterations keep the source architecture")
    arch, par, source = job.arch, job.parallel, job.source
    dtype = _dtype(cfg.precision, source)
    with timer("load"):
        model = build_gpt(arch, par, dtype, device=rt.device, initialize=False)  # every tensor is loaded
        checkpoint.load_weights(cfg.load, [model], arch=arch)
    source_dir = source.directory

    scores = job.scores
    with timer("calibration"):
        if scores is not None:
            rank0_print(f"[prune] importance scores from {cfg.scores}")
        else:
            from ..data import calibration_batches

            batches = calibration_batches(calib.data, calib.num_samples, job.seq_length, calib.micro_batch_size,
                                          ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                                          seed=calib.seed)
            scores = estimate_importance([model], batches, job.settings, depth_metrics=depth_metrics)
            if cfg.scores:
                on_rank0(lambda: scores.save(cfg.scores), f"writing {cfg.scores}")
            rank0_print(f"[prune] importance from {scores.num_samples} samples" +
                        (f", written to {cfg.scores}" if cfg.scores else ""))
    if cfg.scores_only:
        del output_lock
        return PruneResult(output=None, plan=None, summary=None, scores=scores)

    with timer("plan"):
        plan = job.plan or make_plan(scores, arch, job.targets, tp=cfg.tp, merge_heads=cfg.head_merge)
        if cfg.plan_out:
            on_rank0(lambda: _write_text(cfg.plan_out, plan.to_json()), f"writing {cfg.plan_out}")
    with timer("trim"):
        state = prune_model_state(model, plan)
        split = plan.target_pipeline_split(par.layers_per_stage(arch.num_layers)) if cfg.pp > 1 else None
        target_par = dataclasses.replace(par, pipeline_split=split)
        del model
        pruned = build_gpt(plan.target, target_par, dtype, device=rt.device, initialize=False)
        pruned.load_state_dict(state, strict=True)
        del state

    final = job.rewrite.final if job.rewrite is not None else job.save
    if job.rewrite is None and job.save_format == "megatron-lm":
        final = os.path.join(job.save, checkpoint.RELEASE_DIR)  # where the weights and files go in that root
    tokenizer = _tokenizer_for(source, final)
    provenance = {"pruned_from": source_dir, "source_architecture": dataclasses.asdict(arch),
                  "targets": dataclasses.asdict(job.targets), "importance": dataclasses.asdict(scores.settings),
                  "head_merge": bool(cfg.head_merge), "kept_layers": plan.kept_layers,
                  "in_place": bool(cfg.in_place), **source.hf_lineage}

    def add_files(directory: str) -> None:
        copy_tokenizer_files(source_dir, directory)
        _write_text(os.path.join(directory, PLAN_FILE), plan.to_json())

    if job.rewrite is not None:
        out = save_and_swap(job.rewrite, pruned, arch=plan.target, parallel=target_par, device=rt.device,
                            iteration=source.iteration, provenance=provenance, tokenizer=tokenizer,
                            add_files=add_files, timer=timer, format=job.save_format)
    else:
        with timer("save"):
            # the source's iteration, as --in-place keeps it (a weights-only checkpoint: a run started from
            # it counts from 0 all the same)
            out = checkpoint.save_checkpoint_to(job.save, [pruned], arch=plan.target, parallel=target_par,
                                                iteration=source.iteration, provenance=provenance,
                                                tokenizer=tokenizer, format=job.save_format)
            on_rank0(lambda: add_files(out), f"adding the tokenizer files and plan to {out}")
    summary = build_summary(plan, importance=importance_record(scores.settings, scores.num_samples),
                            seconds=timer.seconds, source=source_dir, output=out, in_place=bool(cfg.in_place),
                            head_merge=bool(cfg.head_merge), scores_file=cfg.scores, tokenizer=tokenizer)
    on_rank0(lambda: write_summary(out, summary), f"writing the summary into {out}")
    barrier()
    rank0_print("[prune] " + format_summary(summary).replace("\n", "\n[prune] "))
    del output_lock
    return PruneResult(output=out, plan=plan, summary=summary, scores=scores)
