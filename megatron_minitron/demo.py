"""`minitron demo`: the whole Minitron recipe, small, on data every Python installation has.

    standard-library source -> sentencepiece tokenizer -> indexed dataset
    -> train a teacher -> activation importance -> prune to about half (width + depth)
    -> distill the pruned student from the teacher
    -> compare: teacher | pruned, before distillation | pruned + KD | same size, random init + KD | pruned + LM loss

It ends with a table of validation LM loss / perplexity and a PNG of the validation curves. Each step is
one of the project's own jobs (preprocess, ``Trainer``, ``prune.run``, ``distill.job.run``) called in-process,
so the demo doubles as an end-to-end check. It runs on a CPU in minutes (``--size tiny``) and at a larger
size on a GPU (``--size small``, the default there). An exit signal (SIGTERM / SIGUSR1) during a training
stage saves that stage's checkpoint and stops the demo (exit 0); the same command resumes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

SIZES = {
    # teacher architecture, target architecture, iterations: (teacher, each student run)
    "tiny": dict(teacher=dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                              num_query_groups=2, seq_length=128),
                 target=dict(num_layers=3, hidden_size=96, ffn_hidden_size=192, num_attention_heads=4,
                             num_query_groups=2),
                 vocab=1024, corpus_bytes=3_000_000, teacher_iters=400, student_iters=200, batch=16),
    "small": dict(teacher=dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
                               num_query_groups=4, seq_length=512),
                  target=dict(num_layers=9, hidden_size=512, ffn_hidden_size=1024, num_attention_heads=12,
                              num_query_groups=4),
                  vocab=8192, corpus_bytes=40_000_000, teacher_iters=2000, student_iters=600, batch=32),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end-to-end prune + distill on the embedded corpus",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo", help="working directory (default runs/demo)")
    p.add_argument("--size", choices=["auto", *SIZES], default="auto", help="auto: small on GPU, tiny on CPU")
    p.add_argument("--teacher-iters", type=int, help="override the preset's teacher iterations")
    p.add_argument("--student-iters", type=int, help="override the preset's iterations per student run")
    p.add_argument("--corpus-bytes", type=int, help="override the preset's corpus size")
    p.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from . import checkpoint
    from .config import Data, ModelArch, Parallel, Train, TrainConfig
    from .data import build_stdlib_corpus, preprocess
    from .distill.config import Distill, DistillConfig
    from .distill.job import run as distill_run
    from .model.builder import build_gpt
    from .prune import Calibration, ImportanceSettings, PruneConfig, PruneTargets
    from .prune import run as prune
    from .runtime.distributed import init_distributed, rank0_print, set_seed
    from .train.loop import Trainer

    size = args.size if args.size != "auto" else ("small" if torch.cuda.is_available() else "tiny")
    preset = dict(SIZES[size])
    teacher_iters = args.teacher_iters or preset["teacher_iters"]
    student_iters = args.student_iters or preset["student_iters"]
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    started = time.time()
    rt = init_distributed(1, 1)

    def step(title):
        rank0_print(f"\n=== [{time.time() - started:6.0f}s] {title}")

    # 1. data: the standard library's source, a tokenizer trained on it, indexed datasets
    step("data: standard-library corpus -> sentencepiece tokenizer -> indexed dataset")
    prefix = os.path.join(out, "data", "stdlib")
    if not os.path.exists(prefix + "_valid.idx"):
        if rt.is_rank0:
            corpus = build_stdlib_corpus(prefix + "_corpus", args.corpus_bytes or preset["corpus_bytes"], 5.0)
            train = preprocess([corpus.train], prefix + "_train", None, train_vocab_size=preset["vocab"])
            preprocess([corpus.valid], prefix + "_valid", train.tokenizer)
        torch.distributed.barrier()
    data = Data(train_data=[prefix + "_train"], valid_data=[prefix + "_valid"], micro_batch_size=4,
                global_batch_size=preset["batch"])
    teacher_arch = ModelArch(vocab_size=preset["vocab"], **preset["teacher"])

    def train_cfg(iters, save, load=None, lr=2e-3, cls=TrainConfig, **extra):
        return cls(model=teacher_arch, parallel=Parallel(), data=dataclasses.replace(data),
                   train=Train(train_iters=iters, lr=lr, min_lr=lr / 10, lr_warmup_iters=max(iters // 20, 1),
                               eval_interval=max(iters // 8, 1), eval_iters=4, save=save, load=load,
                               log_interval=max(iters // 10, 1)), **extra)

    curves = {}

    def finished(state, iters, what) -> bool:
        """False, saying so, when a stage stopped early: an exit signal (SIGTERM / SIGUSR1) made it save and
        return, so the demo stops too instead of building on a half-trained model; a rerun resumes it."""
        if state.iteration >= iters:
            return True
        rank0_print(f"\ndemo: the {what} stopped at iteration {state.iteration} of {iters} (exit signal; its "
                    f"checkpoint is saved); rerun the same command to resume")
        return False

    def record(name, state, start=None):
        curves[name] = ([(0, start)] if start is not None else []) + [
            (h["iteration"], h["val_lm_loss"]) for h in state.history if "val_lm_loss" in h]

    # 2. the teacher
    step(f"teacher: {teacher_arch.num_parameters():,} parameters, {teacher_iters} iterations")
    teacher_dir = os.path.join(out, "teacher")
    trainer = Trainer(train_cfg(teacher_iters, teacher_dir)).setup()
    state = trainer.run()
    if not finished(state, teacher_iters, "teacher's training"):
        return 0
    record("teacher", state)
    results = {"teacher": trainer.evaluate()["val_lm_loss"]}

    # 3. importance + prune to about half (width and depth at once)
    target = preset["target"]
    step(f"prune: importance on 64 calibration samples, then {target}")
    pruned_dir = os.path.join(out, "pruned")
    prune(PruneConfig(load=teacher_dir, save=pruned_dir, scores=os.path.join(out, "importance.pt"),
                      calibration=Calibration(data=prefix + "_train", num_samples=64, micro_batch_size=4),
                      importance=ImportanceSettings(depth_metrics=["bi", "lm_loss"]),
                      targets=PruneTargets(**target)))
    student_arch = checkpoint.read_arch(pruned_dir)
    kd = dict(distill=Distill(teacher=teacher_dir, student=pruned_dir))

    # 4. the pruned student before any training, then distilled
    step(f"student: {student_arch.num_parameters():,} parameters "
         f"({student_arch.num_parameters() / teacher_arch.num_parameters():.0%} of the teacher)")
    before = Trainer(dataclasses.replace(train_cfg(0, None, load=pruned_dir), model=student_arch)).setup()
    results["pruned, before distillation"] = before.evaluate()["val_lm_loss"]
    del before
    step(f"distill the pruned student for {student_iters} iterations (logit KD, forward KL)")
    # the model section is the student's (a distillation refuses one that differs from distill.student)
    cfg = dataclasses.replace(train_cfg(student_iters, os.path.join(out, "pruned_kd"), lr=1e-3, cls=DistillConfig,
                                        **kd), model=student_arch)
    trainer, state = distill_run(cfg)
    if not finished(state, student_iters, "distillation of the pruned student"):
        return 0
    record("pruned + KD", state, results["pruned, before distillation"])
    results["pruned + KD"] = trainer.evaluate()["val_lm_loss"]

    # 5. baselines: a random-init student of the same size + KD; the pruned student + plain LM loss
    step("baseline: same architecture, random init, same distillation")
    random_dir = os.path.join(out, "random_init")
    set_seed(4321)
    checkpoint.save_checkpoint_to(random_dir, [build_gpt(student_arch, Parallel(), device=rt.device)],
                                  arch=student_arch, provenance={"random_init": True})
    cfg = dataclasses.replace(train_cfg(student_iters, os.path.join(out, "random_kd"), lr=1e-3, cls=DistillConfig,
                                        distill=Distill(teacher=teacher_dir, student=random_dir)),
                              model=student_arch)
    trainer, state = distill_run(cfg)
    if not finished(state, student_iters, "distillation of the random-init baseline"):
        return 0
    record("random init + KD", state)
    results["random init + KD"] = trainer.evaluate()["val_lm_loss"]
    step("baseline: the pruned student trained with the plain LM loss instead of KD")
    cfg = dataclasses.replace(train_cfg(student_iters, os.path.join(out, "pruned_lm"), load=pruned_dir, lr=1e-3),
                              model=student_arch)
    trainer = Trainer(cfg).setup()
    state = trainer.run()
    if not finished(state, student_iters, "LM-loss training of the pruned student"):
        return 0
    record("pruned + LM loss", state, results["pruned, before distillation"])
    results["pruned + LM loss"] = trainer.evaluate()["val_lm_loss"]

    if rt.is_rank0:
        iterations = {name: (teacher_iters if name == "teacher" else 0 if name.startswith("pruned, before")
                             else student_iters) for name in results}
        settings = {"size": size, "target": target, "vocab_size": preset["vocab"], "global_batch_size":
                    preset["batch"], "calibration_samples": 64, "depth_metrics": "bi,lm_loss"}
        _report(out, results, curves, time.time() - started, teacher_arch, student_arch, iterations, settings)
    return 0


def markdown_table(header: list, rows: list) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned), readable as plain text too."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header] + rows]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) for i in range(len(header))]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(row, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def _report(out, results, curves, seconds, teacher_arch, student_arch, iterations: dict, settings: dict) -> None:
    from .config import to_dict

    params = {name: (teacher_arch if name == "teacher" else student_arch).num_parameters() for name in results}
    rows = [[name, f"{params[name]:,}", iterations.get(name, 0), f"{loss:.4f}", f"{math.exp(loss):.2f}"]
            for name, loss in results.items()]
    table = markdown_table(["model", "params", "iterations", "val LM loss", "val ppl"], rows)
    print(f"\nminitron demo finished in {seconds / 60:.1f} min\n\n{table}\n", flush=True)
    summary = {"val_lm_loss": results, "parameters": params, "iterations": iterations, "curves": curves,
               "seconds": seconds, "settings": settings,
               "architecture": {"teacher": to_dict(teacher_arch), "student": to_dict(student_arch)}}
    from .runtime.files import write_file_durably
    write_file_durably(os.path.join(out, "results.json"), json.dumps(summary, indent=1) + "\n")
    write_file_durably(os.path.join(out, "results.md"), table + "\n")
    plot = _plot(out, curves)
    print(f"results: {out}/results.md, results.json" + (f", {plot}" if plot else
          " (pip install matplotlib for the PNG plot)"), flush=True)


def _plot(out, curves):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation LM loss")
    ax.set_title("Minitron demo: prune + distill vs baselines")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out, "validation_curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
