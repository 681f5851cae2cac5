"""eval as a library job: EvalConfig holds every `minitron eval` option and loads from YAML + key=value
overrides (flags win); validate() rejects user mistakes before any model is built; the Python API example
of docs/eval.md, run as written on a tiny checkpoint, returns exactly what `minitron eval --output` writes
for the same options."""
import argparse
import dataclasses
import json
import os
import re

import numpy as np
import pytest

from megatron_minitron import checkpoint
from megatron_minitron.config import ModelArch, Parallel, from_dict, load_config
from megatron_minitron.data import write_indexed_dataset
from megatron_minitron.eval import EvalConfig, bundled_task_dir, run_eval
from megatron_minitron.eval import cli
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 vocab_size=512, seq_length=64)
TASKS = [os.path.join(bundled_task_dir(), f) for f in ("arc.jsonl", "winogrande.jsonl")]


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["eval", *map(str, argv)])


def save_tiny_checkpoint(path, arch, tokenizer, seed=3):
    set_seed(seed)
    checkpoint.save_checkpoint_to(str(path), [build_gpt(arch, Parallel())], arch=arch, tokenizer=str(tokenizer))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained on the task files, 30 documents of random ids, and a
    checkpoint that records the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    work = tmp_path_factory.mktemp("eval_job")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(TASKS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(work / "tokenizer.json"))
    rng = np.random.RandomState(0)
    docs = [rng.randint(1, 320, size=int(rng.randint(60, 200))).tolist() for _ in range(30)]
    write_indexed_dataset(str(work / "docs"), docs, eod=0, vocab_size=512)
    init_distributed(1, 1)
    save_tiny_checkpoint(work / "ckpt", ARCH, work / "tokenizer.json")
    return work


def docs_block(heading: str) -> str:
    """The first python code block after ``heading`` in docs/eval.md."""
    with open(os.path.join(ROOT, "docs", "eval.md")) as f:
        text = f.read()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_python_api_gives_what_the_cli_writes(tiny, tmp_path, monkeypatch):
    code = docs_block("## Python API")
    assert "/ckpt/pruned" in code and "/data/corpus" in code
    code = code.replace("/ckpt/pruned", str(tiny / "ckpt")).replace("/data/corpus", str(tiny / "docs"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.yaml").write_text(f"load: {tiny / 'ckpt'}\ntasks: [{TASKS[0]}]\nlimit: 3\n")
    namespace = {}
    exec(compile(code, "docs/eval.md", "exec"), namespace)  # noqa: S102 - our own documentation
    results = namespace["results"]

    out = tmp_path / "cli.json"
    assert cli.run(parse("--load", tiny / "ckpt", "--data", tiny / "docs", "--split", "949,50,1",
                         "--micro-batch-size", 2, "--tasks", *TASKS, "--num-fewshot", 1, "--limit", 10,
                         "--log-samples", "--output", out)) == 0
    written = json.loads(out.read_text())
    assert json.loads(json.dumps(results)) == written
    assert written["lm"]["tokens"] > 0 and written["lm"]["split"] == "949,50,1"
    assert {name: r["n"] for name, r in written["tasks"].items()} == {"arc": 10, "winogrande": 10}
    assert all(len(r["items"]) == 10 for r in written["tasks"].values())
    assert namespace["from_yaml"] == EvalConfig(load=str(tiny / "ckpt"), tasks=[TASKS[0]], limit=10)


def test_output_is_written_durably_and_equals_the_returned_results(tiny, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    out = tmp_path / "new_dir" / "results.json"
    results = run_eval(EvalConfig(load=str(tiny / "ckpt"), tasks=[TASKS[1]], limit=4, output=str(out)))
    assert synced, "the results file was not fsync'd"
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert "items" not in results["tasks"]["winogrande"]  # without log_samples
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary file left


def test_config_file_then_overrides_then_flags(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("load: /from/yaml\ntasks: [a.jsonl]\nnum_fewshot: 3\nlimit: 2\nseed: 5\n")
    cfg = cli.config_from_args(parse("--config", path, "num_fewshot=1", "limit=7", "--limit", 4,
                                     "--tasks", "x.jsonl", "y.jsonl", "seed=9"))
    # the file < overrides < flags; `seed=9` after --tasks FILE ... is an override, not a task file
    assert (cfg.load, cfg.num_fewshot, cfg.limit, cfg.tasks, cfg.seed) == (
        "/from/yaml", 1, 4, ["x.jsonl", "y.jsonl"], 9)
    assert cfg == load_config(EvalConfig, str(path), ["num_fewshot=1", "limit=4", "tasks=[x.jsonl,y.jsonl]",
                                                      "seed=9"])


def test_every_flag_is_a_config_field_with_the_same_default():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.register(sub)
    eval_parser = sub.choices["eval"]
    dests = {a.dest for a in eval_parser._actions} - {"help", "config", "overrides"}
    assert dests == set(cli.FIELDS)
    assert cli.config_from_args(parse("--load", "c")) == EvalConfig(load="c")
    assert "--config FILE" in eval_parser.format_help() and "KEY=VALUE" in eval_parser.format_help()


@pytest.mark.parametrize("values, error, message", [
    ({"tasks": ["t.jsonl"]}, ValueError, "give --load CKPT"),
    ({"load": "c", "tasks": ["t.jsonl"], "precision": "fp16"}, ValueError, "--precision 'fp16': choose one of"),
    ({"load": "c", "tasks": ["t.jsonl"], "split_name": "dev"}, ValueError, "--split-name 'dev'"),
    ({"load": "c", "tasks": ["t.jsonl"], "num_fewshot": -1}, ValueError, "--num-fewshot -1 must be >= 0"),
    ({"load": "c", "tasks": ["t.jsonl"], "limit": 0}, ValueError, "--limit 0 must be >= 1"),
    ({"load": "c", "data": "d", "micro_batch_size": 0}, ValueError, "--micro-batch-size 0 must be >= 1"),
    ({"load": "c", "tasks": [os.path.join("nowhere", "t.jsonl")]}, FileNotFoundError, "task file"),
])
def test_option_mistakes_fail_before_the_checkpoint_is_read(values, error, message):
    with pytest.raises(error, match=re.escape(message)):
        from_dict(EvalConfig, values).validate()  # "c" is no checkpoint: these fail before reading it


def test_unknown_key_names_the_closest():
    with pytest.raises(ValueError, match="num_fewshots -> num_fewshot"):
        load_config(EvalConfig, None, ["num_fewshots=5"])


def test_duplicate_task_names(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "t.jsonl").write_text(json.dumps({"context": "c", "choices": ["x", "y"], "answer": 0}))
    with pytest.raises(ValueError, match="two task files share a name"):
        EvalConfig(load=str(tmp_path / "none"), tasks=[str(tmp_path / d / "t.jsonl") for d in "ab"]).validate()


def test_validate_reads_the_inputs_and_refuses_mismatches_before_building(tiny, tmp_path, monkeypatch):
    import megatron_minitron.model.builder as builder

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the checks")

    inputs = EvalConfig(load=str(tiny / "ckpt"), data=str(tiny / "docs"), tasks=TASKS).validate()
    assert [t.name for t in inputs.tasks] == ["arc", "winogrande"]
    assert inputs.arch == checkpoint.arch_from_metadata(checkpoint.read_metadata(str(tiny / "ckpt")))
    assert inputs.seq_length == ARCH.seq_length and inputs.warnings == ()
    assert inputs.tokenizer.vocab_size == 320  # found through the checkpoint's record
    longer = EvalConfig(load=str(tiny / "ckpt"), tasks=TASKS, seq_length=128).validate()
    assert longer.seq_length == 128 and "longer than the context" in longer.warnings[0]  # rope: a warning

    monkeypatch.setattr(builder, "build_gpt", no_model)
    with pytest.raises(ValueError, match="must be a positive integer"):
        run_eval(EvalConfig(load=str(tiny / "ckpt"), data=str(tiny / "docs"), seq_length=0))
    small = dataclasses.replace(ARCH, vocab_size=128)  # padded 128 < the tokenizer's 320
    save_tiny_checkpoint(tmp_path / "small", small, tiny / "tokenizer.json")  # our own import: not patched
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        run_eval(EvalConfig(load=str(tmp_path / "small"), tasks=TASKS))
    with pytest.raises(ValueError, match="holds token id"):
        run_eval(EvalConfig(load=str(tmp_path / "small"), data=str(tiny / "docs")))
    with pytest.raises(ValueError, match="not divisible by pipeline_model_parallel_size=3"):
        run_eval(EvalConfig(load=str(tiny / "ckpt"), tasks=TASKS, pp=3))
    # a choice longer than the window: named with its task before any model is built (and any LM pass)
    with pytest.raises(ValueError, match=r"task arc \(.*arc.jsonl\): a continuation of \d+ tokens does not fit "
                                         r"the sequence length 2"):
        run_eval(EvalConfig(load=str(tiny / "ckpt"), data=str(tiny / "docs"), tasks=TASKS, seq_length=2))
    # what validate tokenised is what the run scores: the same requests as the task's own tokenisation
    from megatron_minitron.eval import task_requests
    arc = inputs.tasks[0]
    assert inputs.requests["arc"] == task_requests(arc.items, inputs.tokenizer, 0, 1234)
