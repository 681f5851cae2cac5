"""`minitron search` end to end on a tiny model: candidates pruned from one importance file, distilled a few
steps, ranked; a search stopped inside a candidate's distillation or between candidates resumes without
redoing finished work; the same search under torchrun at TP2 x PP2 gives the same numbers."""
import json
import os

import pytest
import torch
import yaml

from megatron_minitron import checkpoint
from megatron_minitron.cli import run_subcommand
from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig, dump_yaml
from megatron_minitron.data import cli as data_cli
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune import cli as prune_cli
from megatron_minitron.runtime.distributed import init_distributed
from megatron_minitron.search import SearchSpace
from megatron_minitron.search import cli as search_cli
from megatron_minitron.search.run import Search, SearchConfig, run_search
from megatron_minitron.train.loop import Trainer

SOURCE = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                   vocab_size=512, seq_length=32)
SPACE = SearchSpace(num_layers=[2, 4], num_attention_heads=[4], num_query_groups=[2], ffn_hidden_size=[64, 128],
                    hidden_size=[48])
STEPS = 8
# within 50% +- 40% of the non-embedding parameters: 4 x 18528 and 2 x 27744 (not 2 x 18528, 4 x 27744)
EXPECTED = ["L2-H48-F128-A4-G2", "L4-H48-F64-A4-G2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    init_distributed(1, 1)
    run_subcommand(data_cli.register, ["preprocess", "--corpus", "stdlib", "--corpus-bytes", "200000",
                                       "--train-tokenizer", "--vocab-size", "512", "--output-prefix",
                                       str(root / "stdlib")])
    data = Data(train_data=[str(root / "stdlib_train")], valid_data=[str(root / "stdlib_valid")],
                micro_batch_size=4, global_batch_size=8)
    teacher = str(root / "teacher")  # a briefly trained teacher: its predictions carry something to distill
    Trainer(TrainConfig(model=SOURCE, data=data, train=Train(train_iters=40, lr=3e-3, eval_interval=0,
                                                             save=teacher, progress_bar=False))).setup().run()
    return root, teacher


def config(root, teacher, output, steps=STEPS, **train):
    budget = int(0.5 * SOURCE.num_parameters(include_embeddings=False))
    return SearchConfig(
        parallel=Parallel(),
        data=Data(train_data=[str(root / "stdlib_train")], valid_data=[str(root / "stdlib_valid")],
                  micro_batch_size=2, global_batch_size=4),
        train=Train(**{"lr": 1e-3, "min_lr": 1e-4, "lr_warmup_iters": 1, "eval_interval": 0, "eval_iters": 1,
                       "progress_bar": False, **train}),
        search=Search(load=teacher, output=str(output), param_budget=budget, tolerance=0.4, count="non_embedding",
                      steps=steps, calib_samples=8, calib_micro_batch_size=2, space=SPACE))


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def search(setup, tmp_path_factory):
    """One TP1 search run three times: stopped inside the first candidate's distillation (train.exit_interval,
    as a SIGTERM would), stopped after the first candidate (an exception from the hook), then completed."""
    root, teacher = setup
    out = tmp_path_factory.mktemp("search_out")
    import megatron_minitron.distill.job as job
    runs = []  # (candidate, first iteration this run, last iteration) of every distillation
    real_run = job.run

    def recording_run(cfg):
        trainer, state = real_run(cfg)
        runs.append((os.path.basename(os.path.dirname(cfg.distill.student)), state.history[0]["iteration"],
                     state.iteration))
        return trainer, state

    def stop_after_first(result):
        raise Interrupt(result["name"])

    patch = pytest.MonkeyPatch()
    patch.setattr(job, "run", recording_run)
    try:
        stopped = run_search(config(root, teacher, out, exit_interval=STEPS // 2))
        results_after_stop = sorted(os.listdir(out / "results"))
        with pytest.raises(Interrupt):
            run_search(config(root, teacher, out), after_candidate=stop_after_first)
        results_after_interrupt = sorted(os.listdir(out / "results"))
        ranked = run_search(config(root, teacher, out))
    finally:
        patch.undo()
    return dict(out=out, ranked=ranked, runs=runs, stopped=stopped, results_after_stop=results_after_stop,
                results_after_interrupt=results_after_interrupt)


def test_search_resumes_without_redoing_work(search):
    first, second = search["runs"][0][0], search["runs"][2][0]
    assert search["stopped"] is None and search["results_after_stop"] == []
    assert search["runs"] == [(first, 1, STEPS // 2),  # stopped half way: its checkpoint is saved
                              (first, STEPS // 2 + 1, STEPS),  # resumed from that checkpoint
                              (second, 1, STEPS)]  # the finished candidate was not distilled again
    assert search["results_after_interrupt"] == [f"{first}.json"]
    assert sorted([first, second]) == EXPECTED


def test_search_ranks_candidates(search):
    out, ranked = search["out"], search["ranked"]
    assert sorted(r["name"] for r in ranked) == EXPECTED
    scores = [r["after"]["val_kd_loss"] for r in ranked]
    assert scores == sorted(scores)
    for r in ranked:  # the short distillation lowered each candidate's KD loss
        assert r["after"]["val_kd_loss"] < r["before"]["val_kd_loss"], r
        assert r["before"]["val_lm_loss"] > 0 and r["after"]["val_lm_loss"] > 0
        arch = ModelArch(**r["architecture"])
        assert r["non_embedding_parameters"] == arch.num_parameters(include_embeddings=False)
        assert r["parameters"] == arch.num_parameters()
        recorded = json.loads((out / "results" / f"{r['name']}.json").read_text())
        assert recorded == json.loads(json.dumps(r))
    table = (out / "ranking.md").read_text()
    assert "| 1 | " + ranked[0]["name"] in table and "| 2 | " + ranked[1]["name"] in table
    best = yaml.safe_load((out / "best_prune.yaml").read_text())
    assert best["targets"] == ranked[0]["targets"] and best["candidate"] == ranked[0]["name"]


def _weights(path):
    arch = checkpoint.read_arch(path)
    model = build_gpt(arch, Parallel())
    checkpoint.load_weights(path, [model])
    return arch, {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_best_prune_yaml_reproduces_the_winner_with_minitron_prune(search, setup, tmp_path):
    _, teacher = setup
    out = search["out"]
    run_subcommand(prune_cli.register, ["prune", "--load", teacher, "--scores", str(out / "importance.pt"),
                                        "--targets-file", str(out / "best_prune.yaml"),
                                        "--save", str(tmp_path / "best")])
    arch, weights = _weights(str(tmp_path / "best"))
    winner_arch, winner = _weights(str(out / "candidates" / search["ranked"][0]["name"] / "pruned"))
    assert arch == winner_arch
    assert weights.keys() == winner.keys()
    for key in weights:
        assert torch.equal(weights[key], winner[key]), key


def test_rerun_with_other_settings_is_refused(search, setup):
    root, teacher = setup
    with pytest.raises(ValueError, match=r"other settings \(steps: 8 -> 9; train.lr: 0.001 -> 0.002\)"):
        run_search(config(root, teacher, search["out"], steps=STEPS + 1, lr=2e-3))


def test_search_under_torchrun_tp2_pp2_matches_tp1(search, setup, tmp_path, run_distributed):
    """The CLI at TP2 x PP2 (4 ranks) from the TP1 run's importance file: the same candidates, the same
    losses before distillation (same pruned weights) and after it (up to float summation order)."""
    root, teacher = setup
    cfg = config(root, teacher, tmp_path / "unused")
    cfg.parallel = Parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    dump_yaml(cfg, str(tmp_path / "search.yaml"))
    out = tmp_path / "tp2pp2"
    log = run_distributed("-m", 4, "megatron_minitron.cli", "search", str(tmp_path / "search.yaml"),
                   "--output", str(out), "--scores", str(search["out"] / "importance.pt"))
    assert log.count("candidate(s) within") == 1  # printed by rank 0 only
    for name in EXPECTED:  # a candidate whose kept layers all sit in one of the source's two stages (layers
        # 0-1 | 2-3) cannot be trimmed stage by stage: that prune runs at PP=1
        kept = json.loads((search["out"] / "candidates" / name / "pruned" / "prune_plan.json").read_text())[
            "kept_layers"]
        one_stage_empty = not any(i < 2 for i in kept) or not any(i >= 2 for i in kept)
        assert (f"keeping layers {kept} empties a pipeline stage; pruning at PP=1" in log) == one_stage_empty
    tp1 = {r["name"]: r for r in search["ranked"]}
    tp4 = {name[:-len(".json")]: json.loads((out / "results" / name).read_text())
           for name in os.listdir(out / "results")}
    assert tp4.keys() == tp1.keys()
    for name, r in tp4.items():
        assert r["targets"] == tp1[name]["targets"]
        for when, tol in (("before", 1e-5), ("after", 1e-4)):
            for key in ("val_kd_loss", "val_lm_loss"):
                assert r[when][key] == pytest.approx(tp1[name][when][key], rel=tol), (name, when, key)
    best = min(tp4.values(), key=lambda r: r["after"]["val_kd_loss"])
    assert yaml.safe_load((out / "best_prune.yaml").read_text())["targets"] == best["targets"]
    assert not any(f.endswith(".tmp") for f in os.listdir(out / "results"))


def test_search_cli_validation(setup, tmp_path):
    root, teacher = setup
    with pytest.raises(ValueError, match="search.param_budget is required"):
        run_subcommand(search_cli.register, ["search", "--load", teacher, "--output", str(tmp_path)])
    with pytest.raises(ValueError, match="not smaller than the source model"):
        run_subcommand(search_cli.register, ["search", "--load", teacher, "--output", str(tmp_path),
                                             "--param-budget", "1e9", "--data", str(root / "stdlib_train")])
    with pytest.raises(ValueError, match="train.eval_iters >= 1"):
        run_subcommand(search_cli.register, ["search", "--load", teacher, "--output", str(tmp_path),
                                             "--param-budget", "1e5", "--data", str(root / "stdlib_train"),
                                             "train.eval_iters=0"])


def test_search_calibrates_and_distills_at_a_given_window(setup, tmp_path, monkeypatch):
    """search.seq_length (--seq-length) is the window of the calibration pass and of every candidate's
    distillation, not the source's maximum context; the pruned candidates keep that context; the window is
    one of the settings a rerun must match."""
    import megatron_minitron.distill.job as job
    import megatron_minitron.prune as prune_pkg
    from megatron_minitron.search import run as search_run

    root, teacher = setup
    seen = {"calibration": [], "distill": []}
    real_prune, real_distill = prune_pkg.run, job.run

    def prune_spy(cfg, *args, **kwargs):
        if cfg.scores_only:
            seen["calibration"].append(cfg.calibration.seq_length)
        return real_prune(cfg, *args, **kwargs)

    def distill_spy(cfg):
        out = real_distill(cfg)
        seen["distill"].append(cfg.model.seq_length)  # prepare() put the run's window there
        return out

    monkeypatch.setattr(prune_pkg, "run", prune_spy)
    monkeypatch.setattr(job, "run", distill_spy)

    def windowed(seq_length):
        cfg = config(root, teacher, tmp_path / "out", steps=2)
        cfg.search.max_candidates = 1
        cfg.search.seq_length = seq_length
        return cfg

    ranked = run_search(windowed(16))
    assert seen == {"calibration": [16], "distill": [16]} and SOURCE.seq_length == 32
    pruned = tmp_path / "out" / "candidates" / ranked[0]["name"] / "pruned"
    assert checkpoint.read_arch(str(pruned)).seq_length == SOURCE.seq_length
    with pytest.raises(ValueError, match=r"seq_length: 16 -> 24"):
        run_search(windowed(24))
    # the command line's --seq-length is search.seq_length
    captured = []
    monkeypatch.setattr(search_run, "run_search", lambda cfg: captured.append(cfg))
    run_subcommand(search_cli.register, ["search", "--load", teacher, "--output", str(tmp_path / "cli"),
                                         "--param-budget", "1e5", "--seq-length", "20"])
    assert captured[0].search.seq_length == 20 and config(root, teacher, tmp_path / "x").search.seq_length is None
