"""The table of examples/smollm2/run.sh: validation LM loss of every model, task accuracy from `minitron
eval` and lm-evaluation-harness (with the largest per-choice log-likelihood difference between the two),
and the wall time of every step. Reads what run.sh wrote under --out; writes OUT/results.md and
OUT/results.json.

    python examples/smollm2/report.py --out runs/smollm2
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

MODELS = [  # (eval name, row label)
    ("teacher", "teacher: SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"),
    ("width", "width-pruned (hidden 360, ffn 1024), before distillation"),
    ("width_kd", "width-pruned + KD"),
    ("width_lm", "width-pruned + plain LM loss"),
    ("random_init", "same size as width-pruned, random init"),
    ("random_kd", "same size, random init + KD"),
    ("depth", "depth-pruned (12 of 30 layers), before distillation"),
    ("depth_kd", "depth-pruned + KD"),
]
STEPS_OF = {"width_kd": "kd_width", "width_lm": "lm_width", "random_kd": "kd_random", "depth_kd": "kd_depth"}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def training_records(out, name):
    path = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def lm_eval_results(out, name):
    """(results dict, {task: {doc_id: [loglikelihood per choice]}}) of lm-eval's run on export NAME."""
    found = sorted(glob.glob(os.path.join(out, "lm_eval", name, "**", "results_*.json"), recursive=True))
    if not found:
        return None, {}
    results = read_json(found[-1])["results"]
    samples = {}
    for path in glob.glob(os.path.join(os.path.dirname(found[-1]), "samples_*.jsonl")):
        task = os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        samples[task] = {r["doc_id"]: [float(resp[0]) for resp in r["filtered_resps"]] for r in rows}
    return results, samples


def task_rows(out):
    rows = []
    for ckpt, export in (("teacher", "hf"), ("width_kd", "width_kd_hf")):
        path = os.path.join(out, "eval", f"tasks_{ckpt}.json")
        if not os.path.exists(path):
            continue
        ours = read_json(path)["tasks"]
        theirs, samples = lm_eval_results(out, export)
        for task, r in ours.items():
            row = {"model": ckpt, "task": task, "n": r["n"], "acc": r["acc"], "acc_norm": r["acc_norm"]}
            key = f"minitron_{task}"
            if theirs and key in theirs:
                row["lm_eval_acc"] = theirs[key].get("acc,none")
                row["lm_eval_acc_norm"] = theirs[key].get("acc_norm,none")
                diffs = [abs(a - b) for i, item in enumerate(r.get("items", []))
                         for a, b in zip(item["loglikelihoods"], samples.get(key, {}).get(i, []))]
                row["max_loglik_diff"] = max(diffs) if diffs else None
            rows.append(row)
    return rows


def fmt(value, digits=4):
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = args.out
    sys.path.insert(0, os.getcwd())
    from megatron_minitron import checkpoint

    times = {}
    if os.path.exists(os.path.join(out, "timings.tsv")):
        with open(os.path.join(out, "timings.tsv")) as f:
            times = {k: int(v) for k, v in (line.rstrip("\n").split("\t") for line in f if line.strip())}
    teacher_params = checkpoint.read_arch(os.path.join(out, "teacher")).num_parameters()
    models = []
    for name, label in MODELS:
        path = os.path.join(out, "eval", f"{name}.json")
        if not os.path.exists(path):
            continue
        lm = read_json(path)["lm"]
        params = checkpoint.read_arch(os.path.join(out, name)).num_parameters()
        step = STEPS_OF.get(name)
        records = training_records(out, name)
        models.append({"name": name, "model": label, "params": params, "share": params / teacher_params,
                       "iterations": max((r.get("iteration", 0) for r in records), default=0),
                       "val_lm_loss": lm["loss"], "tokens": lm["tokens"],
                       "command_seconds": times.get(step) if step else None,
                       "median_tokens_per_s": median([r["tokens_per_s"] for r in records if "tokens_per_s" in r])})
    tasks = task_rows(out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"models": models, "tasks": tasks, "timings_s": times}, f, indent=2)

    lines = ["| model | params | iterations | val LM loss | training tokens/s (median) | command wall time |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in models:
        speed = "" if m["median_tokens_per_s"] is None else f"{m['median_tokens_per_s']:.1f}"
        wall = "" if m["command_seconds"] is None else f"{m['command_seconds']} s"
        lines.append(f"| {m['model']} | {m['params']:,} ({m['share']:.0%}) | {m['iterations']} | "
                     f"{m['val_lm_loss']:.4f} | {speed} | {wall} |")
    if models:
        lines.append(f"\nval LM loss: {models[0]['tokens']:,} held-out tokens, the same windows for every model.")
    if tasks:
        lines += ["", "| model | task | n | acc (minitron eval) | acc_norm | acc (lm-eval) | acc_norm (lm-eval) "
                      "| max abs loglik diff |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for t in tasks:
            lines.append(f"| {t['model']} | {t['task']} | {t['n']} | {fmt(t['acc'])} | {fmt(t['acc_norm'])} | "
                         f"{fmt(t.get('lm_eval_acc'))} | {fmt(t.get('lm_eval_acc_norm'))} | "
                         f"{fmt(t.get('max_loglik_diff'), 6)} |")
    if times:
        lines += ["", "| step | wall time (s) |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in times.items()]
        lines.append("| sum of the steps (more than the wall time when steps ran side by side) | "
                     f"{sum(times.values())} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
