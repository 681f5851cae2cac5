"""`prune` subcommand in one process: checkpoint + calibration prefix -> pruned checkpoint whose weights equal
trimming in-process with the same (saved) scores; a second run reuses the scores file; bad targets fail."""
import argparse

import pytest
import torch

from megatron_minitron import checkpoint
from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.data import write_indexed_dataset
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune import ImportanceScores, PruneTargets, make_plan, prune_model_state
from megatron_minitron.prune import cli as prune_cli
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=16)


def parse(argv):
    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers())
    return parser.parse_args(["prune", *argv])


def test_prune_cli_end_to_end(tmp_path, capsys):
    init_distributed(1, 1)
    set_seed(2)
    model = build_gpt(ARCH, Parallel())
    src = checkpoint.save_checkpoint_to(str(tmp_path / "src"), [model], arch=ARCH)
    g = torch.Generator().manual_seed(0)
    write_indexed_dataset(str(tmp_path / "calib"), [torch.randint(1, 128, (40,), generator=g).tolist()
                                                    for _ in range(8)], eod=0, vocab_size=128)
    scores_path = str(tmp_path / "scores.pt")
    targets = ["hidden_size=24", "ffn_hidden_size=32", "num_attention_heads=2", "num_layers=1"]
    common = ["--load", src, "--scores", scores_path, "--target", *targets]
    assert prune_cli.run(parse([*common, "--save", str(tmp_path / "out"), "--data", str(tmp_path / "calib"),
                                "--num-samples", "8", "--micro-batch-size", "2"])) == 0
    started = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"[prune] {src}:")]
    assert started == [f"[prune] {src}: {ARCH.num_parameters():,} parameters, {ARCH.num_layers} layers, hidden "
                       f"{ARCH.hidden_size}, ffn {ARCH.ffn_hidden_size}, {ARCH.num_attention_heads} heads / "
                       f"{ARCH.query_groups} groups; TP1 PP1; importance from 8 calibration samples x "
                       f"{ARCH.seq_length} tokens from {tmp_path / 'calib'}; -> {tmp_path / 'out'}"], started
    out_arch = checkpoint.read_arch(str(tmp_path / "out"))
    assert (out_arch.num_layers, out_arch.hidden_size, out_arch.ffn_hidden_size,
            out_arch.num_attention_heads) == (1, 24, 32, 2)
    loaded = build_gpt(out_arch, Parallel())
    checkpoint.load_weights(str(tmp_path / "out"), [loaded], arch=out_arch)
    scores = ImportanceScores.load(scores_path)
    assert scores.num_samples == 8
    plan = make_plan(scores, ARCH, PruneTargets(hidden_size=24, ffn_hidden_size=32, num_attention_heads=2,
                                                num_layers=1))
    expect = prune_model_state(model, plan)
    for k, v in loaded.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, expect[k]), k
    # reuse of the scores file: no --data needed
    assert prune_cli.run(parse([*common, "--save", str(tmp_path / "out2"), "--no-head-merge"])) == 0
    with pytest.raises(ValueError, match="between 1 and"):
        prune_cli.run(parse(["--load", src, "--scores", scores_path, "--save", str(tmp_path / "o3"),
                             "--target", "hidden_size=64"]))
    with pytest.raises(ValueError, match="unknown config key"):
        prune_cli.parse_targets(["hiden_size=3"])
