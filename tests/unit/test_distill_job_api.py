"""docs/distillation.md's Python example: ``distill.job.run(cfg)`` as documented trains the student exactly as
`minitron distill` does with the same settings (per-iteration losses and the saved weights equal)."""
import json
import os
import re

import numpy as np
import torch

from megatron_minitron import checkpoint
from megatron_minitron.cli import run_subcommand
from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.data import write_indexed_dataset, write_tokenizer_sidecar
from megatron_minitron.data.tokenizer import HuggingFaceTokenizer
from megatron_minitron.distill import cli as distill_cli
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    vocab_size=128, seq_length=32)
STUDENT = ModelArch(**{**TEACHER.__dict__, "num_layers": 1, "ffn_hidden_size": 32})


def documented_block() -> str:
    with open(os.path.join(ROOT, "docs", "distillation.md")) as f:
        text = f.read()
    marker = "this block is run by tests/unit/test_distill_job_api.py"
    return re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S).group(1)


def make_inputs(base):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, TEACHER.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(base / "tok")
    tok.save(str(base / "tok" / "tokenizer.json"))
    rng = np.random.RandomState(0)
    docs = [rng.randint(1, TEACHER.vocab_size, size=int(rng.randint(40, 90))).tolist() for _ in range(40)]
    prefix = str(base / "data" / "mix_train")
    _, _, largest = write_indexed_dataset(prefix, docs, eod=0, vocab_size=TEACHER.vocab_size)
    write_tokenizer_sidecar(prefix, HuggingFaceTokenizer(str(base / "tok" / "tokenizer.json")), largest)
    init_distributed(1, 1)
    for name, arch, seed in (("teacher", TEACHER, 1), ("pruned", STUDENT, 2)):
        set_seed(seed)
        checkpoint.save_checkpoint_to(str(base / "runs" / name), [build_gpt(arch, Parallel())], arch=arch)


def test_documented_distill_example_equals_the_cli(tmp_path, capsys, monkeypatch):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # the example's relative paths
    scope = {}
    exec(compile(documented_block(), "docs/distillation.md", "exec"), scope)  # as documented
    trainer, state = scope["trainer"], scope["state"]
    assert trainer.exit_code == 0 and state.iteration == 2
    api_kd = [m["kd_loss"] for m in state.history]
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"2 {[round(v, 4) for v in api_kd]}"

    overrides = [o.replace("train.save=runs/student", "train.save=runs/cli_student")
                 for o in _overrides(documented_block())]
    assert run_subcommand(distill_cli.register, ["distill", *overrides]) == 0
    with open(tmp_path / "runs" / "cli_student" / "metrics.jsonl") as f:
        cli = [json.loads(line) for line in f if '"kd_loss"' in line]
    assert [r["kd_loss"] for r in cli] == api_kd and all(v > 0 for v in api_kd)
    api_w = checkpoint.describe_checkpoint(str(tmp_path / "runs" / "student"))
    cli_w = checkpoint.describe_checkpoint(str(tmp_path / "runs" / "cli_student"))
    assert (api_w.iteration, api_w.arch) == (cli_w.iteration, cli_w.arch) == (2, STUDENT)
    loaded = []
    for path in (api_w.directory, cli_w.directory):
        model = build_gpt(STUDENT, Parallel())
        checkpoint.load_weights(path, [model], arch=STUDENT)
        loaded.append(model.state_dict())
    assert loaded[0].keys() == loaded[1].keys()
    assert all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[0] if loaded[0][k] is not None)


def _overrides(code: str) -> list:
    """The key=value strings of the example's load_config call."""
    return re.findall(r'"([a-z_.]+=[^"]*)"', code)
