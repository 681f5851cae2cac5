"""What a search leaves behind: the ranked table (ranking.md) and the winner's prune targets (best_prune.yaml,
read by `minitron prune --targets-file`). Pure formatting plus rank-0 file writes."""
from __future__ import annotations

import os

import yaml

from ..runtime.files import write_file_durably

RANKING_FILE = "ranking.md"
BEST_FILE = "best_prune.yaml"


def rank_results(results: list, score_by: str) -> list:
    """Best (lowest ``after[score_by]``) first; the candidate name breaks ties so the order is reproducible."""
    return sorted(results, key=lambda r: (r["after"][score_by], r["name"]))


def _loss(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.4f}"


def ranking_table(ranked: list, score_by: str) -> str:
    """Markdown table: parameters, non-embedding parameters, validation losses before/after distillation."""
    rows = [("rank", "candidate", "params", "non-emb params", "val_kd_loss before", "val_kd_loss after",
             "val_lm_loss before", "val_lm_loss after")]
    for i, r in enumerate(ranked, 1):
        rows.append((str(i), r["name"], f"{r['parameters']:,}", f"{r['non_embedding_parameters']:,}",
                     _loss(r["before"], "val_kd_loss"), _loss(r["after"], "val_kd_loss"),
                     _loss(r["before"], "val_lm_loss"), _loss(r["after"], "val_lm_loss")))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return f"ranked by {score_by} after the short distillation (lower is better)\n\n" + "\n".join(lines)


def best_prune_yaml(ranked: list, score_by: str, source: str, scores: str) -> str:
    """The winner as a `minitron prune --targets-file` input (the targets under `targets:`, context beside)."""
    best = ranked[0]
    header = (f"# best of {len(ranked)} candidate(s) by {score_by}; prune the source to it with\n"
              f"#   minitron prune --load {source} --scores {scores} --targets-file THIS_FILE --save OUT\n")
    body = {"targets": best["targets"], "candidate": best["name"], "parameters": best["parameters"],
            "non_embedding_parameters": best["non_embedding_parameters"], "steps": best["steps"],
            "score": {score_by: best["after"][score_by]}}
    return header + yaml.safe_dump(body, sort_keys=False)


def write_report(output: str, ranked: list, score_by: str, steps: int, source: str, scores: str) -> None:
    """Rank 0 only: print the table and write ranking.md and best_prune.yaml."""
    table = ranking_table(ranked, score_by)
    print(f"\nsearch: {len(ranked)} candidate(s), {steps} distillation steps each\n\n{table}\n", flush=True)
    write_file_durably(os.path.join(output, RANKING_FILE), table + "\n")
    best_path = os.path.join(output, BEST_FILE)
    write_file_durably(best_path, best_prune_yaml(ranked, score_by, source, scores))
    print(f"best: {ranked[0]['name']} -> {best_path}", flush=True)
