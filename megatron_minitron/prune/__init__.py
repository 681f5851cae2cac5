"""Minitron pruning: activation-based importance, ranking into a plan, trimming sharded weights.

    scores = estimate_importance([model], batches, ImportanceSettings())      # every rank, forward only
    plan = make_plan(scores, arch, PruneTargets(hidden_size=..., ...), tp=TP)  # pure, same on every rank
    state = prune_model_state(model, plan)   # this rank's shard of the pruned model (same TP, same stage)
    # build the pruned model at plan.target with pipeline_split=plan.target_pipeline_split(...), load state

or the whole job (what `minitron prune` runs): ``run(PruneConfig(load=..., save=..., targets=PruneTargets(...),
calibration=Calibration(data=...)))``. See docs/pruning.md for the exact definitions.
"""
from .config import Calibration, PruneConfig, PruneParallel
from .job import PreparedPrune, PruneResult, prepare, run
from .aggregate import AGGREGATIONS, RunningAggregate, aggregate, aggregate_sequence
from .depth import (DEPTH_METRICS, DepthContext, register_depth_metric, run_forward, skip_layers,
                    transformer_layers)
from .importance import estimate_importance
from .plan import (PrunePlan, PruneTargets, ResolvedTargets, make_plan, pipeline_split_after_pruning, top_k,
                   validate_targets)
from .scores import ImportanceScores, ImportanceSettings, group_scores
from .trim import assemble, prune_model_state, select_local, trim_state_dict

__all__ = [
    "Calibration", "PruneConfig", "PruneParallel", "PreparedPrune", "PruneResult", "prepare", "run",
    "pipeline_split_after_pruning",
    "AGGREGATIONS", "RunningAggregate", "aggregate", "aggregate_sequence",
    "DEPTH_METRICS", "DepthContext", "register_depth_metric", "run_forward", "skip_layers",
    "transformer_layers", "estimate_importance", "PrunePlan", "PruneTargets", "ResolvedTargets", "make_plan", "top_k", "validate_targets",
    "ImportanceScores", "ImportanceSettings", "group_scores", "assemble", "prune_model_state",
    "select_local", "trim_state_dict",
]
