"""An evaluation run: validate the config (before any model is built), build the model at the run's
TP x PP from the checkpoint's architecture, load the weights, measure LM loss and task accuracy, and write
the results (rank 0, durably) when ``cfg.output`` is set. Works in one process or under torchrun; every rank
returns the same results."""
from __future__ import annotations

from .config import EvalConfig, EvalInputs


def run(cfg: EvalConfig) -> dict:
    """The results dict (the one ``minitron eval --output`` writes; layout in docs/eval.md)."""
    from .. import checkpoint
    from ..config import Parallel
    from ..model.builder import build_gpt, resolve_dtype
    from ..runtime.distributed import barrier, init_distributed, rank0_print
    from ..runtime.files import write_json_durably

    inputs = cfg.validate()
    for warning in inputs.warnings:
        rank0_print(f"[eval] warning: {warning}")
    rt = init_distributed(cfg.tp, cfg.pp)
    par = Parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp)
    model = build_gpt(inputs.arch, par, resolve_dtype(cfg.precision), device=rt.device, initialize=False)
    checkpoint.load_weights(cfg.load, [model], arch=inputs.arch)

    results = {"checkpoint": inputs.checkpoint.directory, "iteration": inputs.checkpoint.iteration,
               "parallel": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp}, "seq_length": inputs.seq_length}
    results.update(evaluate([model], cfg, inputs))
    if cfg.output and rt.is_rank0:
        write_json_durably(cfg.output, results, make_parents=True)
    barrier()  # the file exists before any rank returns
    return results


def evaluate(model_chunks, cfg: EvalConfig, inputs: EvalInputs) -> dict:
    """``{"lm": ..., "tasks": {...}}`` (each only when asked for) of an already loaded model (collective)."""
    from .inputs import eval_dataset
    from .runner import eval_batches, evaluate_task, lm_loss

    out = {}
    if cfg.data:
        dataset = eval_dataset(cfg.data, inputs.seq_length, cfg.seed, cfg.split, cfg.split_name)
        lm = lm_loss(model_chunks, eval_batches(dataset, cfg.num_samples, cfg.micro_batch_size))
        out["lm"] = {"data": cfg.data, "split": cfg.split, "split_name": cfg.split_name,
                     "seq_length": inputs.seq_length, **lm}
    if inputs.tasks:
        out["tasks"] = {}
        for task in inputs.tasks:
            r = evaluate_task(model_chunks, task, inputs.tokenizer, cfg.num_fewshot, cfg.limit, cfg.batch_size,
                              inputs.seq_length, cfg.seed, requests=inputs.requests.get(task.name))
            if not cfg.log_samples:
                r.pop("items")
            out["tasks"][task.name] = r
    return out
