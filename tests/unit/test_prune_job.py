"""The prune job as a library (prune/config.py, prune/job.py): the Python example of docs/pruning.md, run as
written on a tiny checkpoint, gives the same plan, summary and weights as `minitron prune` on the same input;
`--config` + `key=value` overrides + flags resolve in that order; `PruneConfig.validate` names the fix; a
depth metric passed to the job ranks layers without being registered, and `--depth-task` equals the job
given eval's accuracy metric (and reads no task when the scores file has the scores); the pipeline split after pruning is
a pure function; no library module imports the CLI and pruning (its CLI aside) imports no eval code."""
import argparse
import ast
import json
import os
import re

import pytest
import torch

from megatron_minitron import checkpoint
from megatron_minitron.config import ModelArch, Parallel, load_config
from megatron_minitron.data import write_indexed_dataset
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune import (DEPTH_METRICS, Calibration, ImportanceScores, ImportanceSettings, PruneConfig,
                                     PrunePlan, PruneTargets, make_plan, pipeline_split_after_pruning, prepare)
from megatron_minitron.prune import cli as prune_cli
from megatron_minitron.prune import run as prune_run
from megatron_minitron.prune.summary import read_summary
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "megatron_minitron")
ARCH = ModelArch(num_layers=3, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=16)


def parse(argv):
    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers())
    return parser.parse_args(["prune", *argv])


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    base = tmp_path_factory.mktemp("prune_job")
    init_distributed(1, 1)
    set_seed(5)
    model = build_gpt(ARCH, Parallel())
    ckpt = checkpoint.save_checkpoint_to(str(base / "teacher"), [model], arch=ARCH)
    g = torch.Generator().manual_seed(0)
    write_indexed_dataset(str(base / "calib_train"), [torch.randint(1, 128, (40,), generator=g).tolist()
                                                      for _ in range(8)], eod=0, vocab_size=128)
    return {"base": base, "ckpt": ckpt, "calib": str(base / "calib_train"), "model": model}


def documented_block(language: str, after: str) -> str:
    """The first ```language block of docs/pruning.md after the line containing ``after``."""
    with open(os.path.join(ROOT, "docs", "pruning.md")) as f:
        text = f.read()
    start = text.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    return match.group(1)


def weights(path):
    arch = checkpoint.read_arch(path)
    model = build_gpt(arch, Parallel())
    checkpoint.load_weights(path, [model], arch=arch)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}


def comparable_summary(directory):
    summary = read_summary(directory)
    for key in ("seconds", "output"):
        summary.pop(key)
    summary["importance"].pop("scores_file")
    return summary


def swap_paths(text, src, tag):
    base = src["base"]
    return (text.replace("runs/teacher.scores.pt", str(base / f"{tag}.scores.pt"))
                .replace("runs/teacher", src["ckpt"]).replace("runs/pruned", str(base / f"{tag}_pruned"))
                .replace("data/calib_train", src["calib"]))


def test_documented_python_example_equals_the_cli(src, capsys):
    base = src["base"]
    code = swap_paths(documented_block("python", "this block is run by tests/unit/test_prune_job.py"), src, "api")
    scope = {}
    exec(compile(code, "docs/pruning.md", "exec"), scope)  # the example exactly as documented
    result = scope["result"]
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"{result.output} {result.plan.kept_layers} {result.summary['parameters']['after']['total']}"

    cli_out = str(base / "cli_pruned")
    assert prune_cli.run(parse(["--load", src["ckpt"], "--save", cli_out, "--scores", str(base / "cli.scores.pt"),
                                "--data", src["calib"], "--num-samples", "8", "--micro-batch-size", "2",
                                "--target", "hidden_size=24", "ffn_hidden_size=32", "num_attention_heads=2",
                                "num_layers=2"])) == 0
    with open(os.path.join(cli_out, "prune_plan.json")) as f:
        cli_plan = json.load(f)
    with open(os.path.join(result.output, "prune_plan.json")) as f:
        assert json.load(f) == cli_plan == result.plan.to_dict()
    assert comparable_summary(result.output) == comparable_summary(cli_out)
    api_scores, cli_scores = ImportanceScores.load(str(base / "api.scores.pt")), ImportanceScores.load(
        str(base / "cli.scores.pt"))
    for name in ("heads", "neurons", "hidden"):
        assert torch.equal(getattr(api_scores, name), getattr(cli_scores, name)), name
    # and the plan is what make_plan gives on those scores (the scores come from the calibration pass)
    expect = make_plan(cli_scores, ARCH, PruneTargets(hidden_size=24, ffn_hidden_size=32, num_attention_heads=2,
                                                      num_layers=2))
    assert PrunePlan.from_dict(cli_plan).to_dict() == expect.to_dict()
    a, b = weights(result.output), weights(cli_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_documented_yaml_config_with_overrides_and_flags(src, tmp_path):
    """--config FILE < key=value overrides < flags; the YAML of docs/pruning.md loads as documented."""
    base = src["base"]
    cfg_file = tmp_path / "prune.yaml"
    cfg_file.write_text(swap_paths(documented_block("yaml", "The same config as YAML"), src, "yaml"))
    loaded = load_config(PruneConfig, str(cfg_file), ["calibration.num_samples=4", "targets.num_layers=3"])
    assert loaded.calibration == Calibration(data=src["calib"], num_samples=4, micro_batch_size=2)
    assert loaded.targets == PruneTargets(hidden_size=24, ffn_hidden_size=32, num_attention_heads=2, num_layers=3)

    scores = str(base / "api.scores.pt")  # written by the documented example above, or computed now
    args = parse(["--config", str(cfg_file), f"scores={scores}", "save=" + str(tmp_path / "ignored"),
                  "--save", str(tmp_path / "flag_out"), "--target", "num_layers=3", "targets.hidden_size=16",
                  "--no-head-merge", "--tp", "1"])
    cfg = prune_cli.config_from_args(args)
    assert cfg.save == str(tmp_path / "flag_out")  # the flag beats the override
    assert cfg.scores == scores and cfg.head_merge is False and cfg.load == src["ckpt"]
    # --target entries beat the file; a dotted KEY=VALUE after --target is a config override
    assert cfg.targets == PruneTargets(hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_layers=3)
    assert cfg.calibration.num_samples == 8
    assert prune_cli.run(args) == 0
    plan = make_plan(ImportanceScores.load(scores), ARCH, cfg.targets, merge_heads=False)
    with open(tmp_path / "flag_out" / "prune_plan.json") as f:
        assert json.load(f) == plan.to_dict()
    assert not os.path.exists(tmp_path / "ignored")


def test_validate_names_the_fix_before_any_work(src, tmp_path, monkeypatch):
    import megatron_minitron.model.builder as builder

    monkeypatch.setattr(builder, "build_gpt", lambda *a, **k: pytest.fail("built a model before the checks"))
    out = str(tmp_path / "out")
    cases = [
        (PruneConfig(save=out), "give --load SRC"),
        (PruneConfig(load=src["ckpt"]), "give --save OUT"),
        (PruneConfig(load=src["ckpt"], scores_only=True), "needs --scores PATH"),
        (PruneConfig(load=src["ckpt"], save=out, scores_only=True, scores="s.pt"), "drop --save"),
        (PruneConfig(load=src["ckpt"], save=out, save_format="hf"), "--save-format 'hf'"),
        (PruneConfig(load=src["ckpt"], save=out, precision="fp16"), "--precision 'fp16'"),
        (PruneConfig(load=src["ckpt"], save=out, calibration=Calibration(data=src["calib"], num_samples=0)),
         "must be >= 1"),
        (PruneConfig(load=src["ckpt"], save=out, importance=ImportanceSettings(batch_aggregation="max")),
         "aggregation"),
    ]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            cfg.validate()
        with pytest.raises(ValueError, match=message):
            prune_run(cfg)
    # needs the data / metadata: prepare, still before any model
    with pytest.raises(ValueError, match="unknown depth metric 'nope'"):
        prepare(PruneConfig(load=src["ckpt"], save=out, calibration=Calibration(data=src["calib"], num_samples=8),
                            importance=ImportanceSettings(depth_metrics=["bi", "nope"])))
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(PruneConfig, None, ["calibration.num_sample=3"])
    assert os.listdir(tmp_path) == []


def test_passed_depth_metric_ranks_layers_without_registering(src, tmp_path):
    calls = []

    def later_is_less_important(ctx, layers):  # a removal metric: higher = more important
        calls.append(layers)
        return -float(layers[0])

    cfg = PruneConfig(load=src["ckpt"], save=str(tmp_path / "out"),
                      calibration=Calibration(data=src["calib"], num_samples=8, micro_batch_size=2),
                      targets=PruneTargets(num_layers=1, depth_metric="later"))
    result = prune_run(cfg, depth_metrics={"later": later_is_less_important})
    assert "later" not in DEPTH_METRICS and cfg.importance.depth_metrics == ["bi"]  # the caller's config kept
    assert calls == [(0,), (1,), (2,)]
    assert result.scores.layers["later"].tolist() == [0.0, -1.0, -2.0]
    assert result.plan.kept_layers == [0] and checkpoint.read_arch(result.output).num_layers == 1
    assert result.summary["kept"]["dropped_layers"] == [1, 2]


def test_pipeline_split_after_pruning_counts_kept_layers_per_stage():
    for source_split, kept in (([2, 2], [0, 2, 3]), ([3, 1], [1, 2, 3]), ([1, 2, 1], [0, 2, 3]), ([4], [1])):
        stage_of = [s for s, n in enumerate(source_split) for _ in range(n)]  # stage of every source layer
        expect = [sum(1 for i in kept if stage_of[i] == s) for s in range(len(source_split))]
        assert pipeline_split_after_pruning(kept, source_split) == expect
    with pytest.raises(ValueError, match="without layers"):
        pipeline_split_after_pruning([0, 1], [2, 2])


def _imports(path):
    """Absolute names of the megatron_minitron modules ``path`` imports (relative imports resolved)."""
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    package = rel[:-1]  # a module's package, and a package's own __init__ resolves against itself
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                stem = package[:len(package) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name.startswith("megatron_minitron")}


def test_no_library_module_imports_the_cli_and_pruning_imports_no_eval():
    offenders = []
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            imported = _imports(path)
            if module != "megatron_minitron.cli" and "megatron_minitron.cli" in imported:
                offenders.append(f"{module} imports megatron_minitron.cli")
            if module.startswith("megatron_minitron.prune.") and module != "megatron_minitron.prune.cli":
                offenders += [f"{module} imports {m}" for m in imported if m.startswith("megatron_minitron.eval")]
    assert not offenders, offenders


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A checkpoint, calibration data with a sentencepiece sidecar, and a multiple-choice task file: what the
    downstream-accuracy depth metric (--depth-task) needs."""
    from megatron_minitron.data import build_tokenizer, train_sentencepiece, write_tokenizer_sidecar

    base = tmp_path_factory.mktemp("prune_job_task")
    text = base / "text.txt"
    text.write_text(open(os.__file__).read())  # any varied text: the standard library's os.py
    tok = build_tokenizer("sentencepiece", train_sentencepiece([str(text)], str(base / "spm"), 384))
    arch = ModelArch(num_layers=3, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                     vocab_size=tok.vocab_size, seq_length=32)
    init_distributed(1, 1)
    set_seed(7)
    model = build_gpt(arch, Parallel()).eval()
    with torch.no_grad():  # layer 2 dominates the output, so skipping it changes the model's choices
        model.decoder.layers[2].mlp.linear_fc2.weight.mul_(30.0)
    ckpt = checkpoint.save_checkpoint_to(str(base / "src"), [model], arch=arch)
    lines = [line for line in text.read_text().splitlines() if len(line) > 20][:40]
    calib = str(base / "calib")
    write_indexed_dataset(calib, [tok.encode(line) for line in lines], eod=tok.eod, vocab_size=tok.vocab_size)
    write_tokenizer_sidecar(calib, tok)
    # answers = the full model's own choices: its accuracy is 1, so skipping a layer that matters loses some
    from megatron_minitron.eval import MCItem, Task, evaluate_task

    words = ["path", "file", "name", "mode", "error", "list", "self", "return"]
    letters = [c for c in "bcdeghijklmpqruvwxyz" if len(tok.encode(" " + c)) == len(tok.encode(" b"))]
    # choices of one length (in tokens), so the model's choice depends on the context, not the length
    items = [MCItem(f"the {words[i % 8]} of {words[(3 * i) % 8]} is", [letters[(i + k) % len(letters)]
                                                                          for k in range(4)], 0) for i in range(32)]
    predicted = evaluate_task([model], Task("t", "t.jsonl", "native", items), tok)["items"]
    task = base / "task.jsonl"
    task.write_text("".join(json.dumps({"context": item.context, "choices": item.choices, "answer": r["pred"]})
                            + "\n" for item, r in zip(items, predicted)))
    return {"base": base, "ckpt": ckpt, "calib": calib, "task": str(task), "arch": arch}


def test_depth_task_cli_equals_the_job_with_the_accuracy_metric_passed_in(with_tokenizer, tmp_path):
    from megatron_minitron.eval.depth import accuracy_depth_metric

    t = with_tokenizer
    cli_scores = str(tmp_path / "cli.pt")
    assert prune_cli.run(parse(["--load", t["ckpt"], "--save", str(tmp_path / "cli"), "--data", t["calib"],
                                "--num-samples", "4", "--micro-batch-size", "2", "--scores", cli_scores,
                                "--depth-task", t["task"], "--target", "num_layers=2", "depth_metric=accuracy"])) == 0
    assert "accuracy" not in DEPTH_METRICS  # passed to the job, not registered
    fn = accuracy_depth_metric(t["task"], data=t["calib"], load=t["ckpt"], seq_length=t["arch"].seq_length)
    result = prune_run(PruneConfig(load=t["ckpt"], save=str(tmp_path / "api"), scores=str(tmp_path / "api.pt"),
                                   calibration=Calibration(data=t["calib"], num_samples=4, micro_batch_size=2),
                                   targets=PruneTargets(num_layers=2, depth_metric="accuracy")),
                       depth_metrics={"accuracy": fn})
    scores = ImportanceScores.load(cli_scores)
    assert scores.settings.depth_metrics == ["bi", "accuracy"]
    assert torch.equal(scores.layers["accuracy"], result.scores.layers["accuracy"])
    with open(tmp_path / "cli" / "prune_plan.json") as f:
        assert json.load(f) == result.plan.to_dict()
    dropped = [i for i in range(3) if i not in result.plan.kept_layers]
    accuracy = scores.layers["accuracy"].tolist()
    assert len(set(accuracy)) > 1, accuracy  # the layers are told apart
    assert dropped == [min(range(3), key=lambda i: (accuracy[i], i))]  # the lowest score (ties: lower id)

    # a scores file holding the accuracy scores needs no task: --depth-task is not read (here: not even JSON)
    (tmp_path / "broken.jsonl").write_text("not json\n")
    assert prune_cli.run(parse(["--load", t["ckpt"], "--save", str(tmp_path / "again"), "--scores", cli_scores,
                                "--depth-task", str(tmp_path / "broken.jsonl"), "--target", "num_layers=2",
                                "depth_metric=accuracy"])) == 0
    with open(tmp_path / "again" / "prune_plan.json") as f:
        assert json.load(f) == result.plan.to_dict()
