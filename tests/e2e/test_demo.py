"""`minitron demo` end to end at a few iterations: corpus -> teacher -> prune -> distill -> baselines.

Distilling the pruned student must lower its KD loss and its validation LM loss (from the pruned model's)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_prunes_and_distills(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "megatron_minitron.cli", "demo", "--output", str(tmp_path),
                           "--size", "tiny", "--teacher-iters", "60", "--student-iters", "30",
                           "--corpus-bytes", "400000"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["val_lm_loss"]
    assert set(results) == {"teacher", "pruned, before distillation", "pruned + KD", "random init + KD",
                            "pruned + LM loss"}
    assert results["pruned + KD"] < results["pruned, before distillation"] - 0.05
    assert results["pruned + KD"] < results["random init + KD"]  # pruning kept what the teacher learned
    kd = [json.loads(line)["kd_loss"] for line in (tmp_path / "pruned_kd" / "metrics.jsonl").read_text().split("\n")
          if line.strip() and "kd_loss" in json.loads(line)]
    assert len(kd) == 30 and sum(kd[-5:]) / 5 < sum(kd[:5]) / 5
    assert "pruned + KD" in proc.stdout
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["iterations"] == {"teacher": 60, "pruned, before distillation": 0, "pruned + KD": 30,
                                     "random init + KD": 30, "pruned + LM loss": 30}
    assert summary["parameters"]["pruned + KD"] < summary["parameters"]["teacher"]
    # results.md is a valid Markdown table holding the same numbers
    lines = (tmp_path / "results.md").read_text().strip().split("\n")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert len({len(r) for r in rows}) == 1 and all(set(c) <= set("-:") and c for c in rows[1])
    table = {r[0]: r for r in rows[2:]}
    assert set(table) == set(results)
    for name, loss in results.items():
        assert abs(float(table[name][rows[0].index("val LM loss")]) - loss) < 1e-4
        assert int(table[name][rows[0].index("params")].replace(",", "")) == summary["parameters"][name]


def _run_until_training_starts_then_sigterm(command, env) -> str:
    """Start ``command``, send SIGTERM once a training stage prints its start line; its whole output."""
    import signal

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "tokens per step" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=300) == 0, out[-3000:]
    return out


def test_demo_stops_at_an_exit_signal_and_resumes(tmp_path):
    """SIGTERM during the teacher's training: the teacher saves, the demo stops there (exit 0) instead of
    pruning a half-trained teacher, and the same command resumes the teacher from its checkpoint."""
    from megatron_minitron import checkpoint

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "megatron_minitron.cli", "demo", "--output", str(tmp_path), "--size", "tiny",
               "--teacher-iters", "5000", "--student-iters", "2", "--corpus-bytes", "200000"]
    out = _run_until_training_starts_then_sigterm(command, env)
    assert "the teacher's training stopped at iteration" in out, out[-3000:]
    saved = checkpoint.latest_iteration(str(tmp_path / "teacher"))
    assert saved is not None and 0 < saved < 5000, out[-3000:]
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "results.json").exists()
    # the same command again: the teacher resumes where it stopped (stopped again here, to keep it short)
    out = _run_until_training_starts_then_sigterm(command, env)
    assert f"resumed from {tmp_path / 'teacher'} at iteration {saved}" in out, out[-3000:]
    assert checkpoint.latest_iteration(str(tmp_path / "teacher")) > saved
