"""describe_checkpoint on real saves in one process (gloo, world 1): a minitron checkpoint compared with what
was saved and with its minitron.yaml read as plain YAML, and a Megatron-LM-format save described once from its
minitron.yaml and once, with our files removed as in a checkpoint Megatron-LM wrote, from the args in its
common.pt. The docs' example runs against a real checkpoint too. (A checkpoint written by Megatron-LM itself:
tests/megatron_lm/test_megatron_lm_checkpoints.py.)"""
import dataclasses
import io
import os
from contextlib import redirect_stdout

import pytest
import torch
import yaml

from megatron_minitron import checkpoint
from megatron_minitron.checkpoint import layout
from megatron_minitron.checkpoint.integrity import MANIFEST_FILE
from megatron_minitron.config import ModelArch, Parallel

ARCH = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=16, hidden_dropout=0.0, attention_dropout=0.0)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model():
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import init_distributed

    runtime = init_distributed(1, 1, force_cpu=True)
    torch.manual_seed(0)
    return build_gpt(ARCH, Parallel(), dtype=torch.bfloat16, device=runtime.device)


@pytest.fixture
def tokenizer_file(tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(b"not read: the description only records where the tokenizer is")
    return str(path)


def test_minitron_checkpoint_description_matches_what_was_saved(model, tmp_path, tokenizer_file):
    root = str(tmp_path / "run")
    tokenizer = {"type": "sentencepiece", "path": tokenizer_file, "add_bos": True}
    provenance = {"pruned_from": "/ckpt/teacher", "targets": {"hidden_size": 32}}
    saved = checkpoint.save_checkpoint(root, 7, [model], arch=ARCH, extra={"consumed_samples": 56},
                                       provenance=provenance, tokenizer=tokenizer, save_rng=True)
    info = checkpoint.describe_checkpoint(root)
    assert info.directory == saved == os.path.join(root, "iter_0000007")
    assert (info.format, info.iteration, info.arch) == ("minitron", 7, ARCH)
    assert info.layout == checkpoint.SavedLayout(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                                 data_parallel_size=1, world_size=1, model_chunks=1,
                                                 layers_per_stage=((2,),))
    assert info.contents == checkpoint.Contents(model=True, optimizer=False, scheduler=False, rng=True,
                                                extra_keys=("consumed_samples",), params_dtype="bfloat16")
    assert info.params_dtype == "bfloat16" and info.torch_dtype() is torch.bfloat16
    assert not info.weights_only  # it holds RNG state
    assert (info.tokenizer, info.tokenizer_path, info.provenance) == (tokenizer, tokenizer_file, provenance)
    from megatron.core.package_info import __version__ as core_version  # the core that wrote it

    assert info.megatron_core == core_version and info.hf_family is None
    assert checkpoint.describe_directory(saved) == info == checkpoint.describe_checkpoint(saved)
    assert checkpoint.read_arch(root) == ARCH

    # the same facts read straight from the file, as YAML
    with open(os.path.join(saved, checkpoint.METADATA_FILE)) as f:
        raw = yaml.safe_load(f)
    assert raw["iteration"] == info.iteration and raw["architecture"]["num_query_groups"] == 2
    assert raw["parallel"] == info.layout.as_record()
    assert raw["contents"]["params_dtype"] == info.params_dtype and raw["contents"]["rng"] is True
    assert info.metadata["checkpoint_dir"] == saved and info.metadata["created"] == info.created == raw["created"]

    # weights only (prune, HF import): exactly there, nothing else recorded
    out = checkpoint.save_checkpoint_to(str(tmp_path / "weights"), [model], arch=ARCH)
    weights = checkpoint.describe_checkpoint(out)
    assert weights.weights_only and weights.iteration == 0 and weights.tokenizer is None
    assert weights.contents.extra_keys == () and weights.provenance == {}


def test_megatron_lm_save_is_described_alike_from_its_args(model, tmp_path, tokenizer_file):
    root = str(tmp_path / "mlm")
    tokenizer = {"type": "sentencepiece", "path": tokenizer_file}
    release = checkpoint.save_checkpoint_to(root, [model], arch=ARCH, iteration=3, tokenizer=tokenizer,
                                            format="megatron-lm")
    assert release == os.path.join(root, layout.RELEASE_DIR)
    ours = checkpoint.describe_checkpoint(root)  # from the minitron.yaml our save writes beside the args
    assert (ours.format, ours.directory, ours.iteration, ours.arch) == ("megatron-lm", release, 3, ARCH)
    assert ours.contents.release and ours.weights_only and ours.params_dtype == "bfloat16"

    # what Megatron-LM itself would leave: no minitron.yaml, COMMIT or manifest; only common.pt's args
    for name in (checkpoint.METADATA_FILE, checkpoint.COMMIT_FILE, MANIFEST_FILE):
        os.remove(os.path.join(release, name))
    theirs = checkpoint.describe_checkpoint(root)
    assert theirs.metadata["provenance"]["written_by"] == "Megatron-LM"  # it did come from the args
    for name in ("directory", "format", "iteration", "arch", "layout", "contents", "tokenizer"):
        assert getattr(theirs, name) == getattr(ours, name), name
    assert theirs.torch_dtype() is torch.bfloat16 and theirs.tokenizer_path == tokenizer_file
    assert theirs.megatron_core is None and theirs.provenance["checkpoint_version"] == 3.0


def test_check_arch_takes_the_description(model, tmp_path):
    saved = checkpoint.save_checkpoint_to(str(tmp_path / "w"), [model], arch=ARCH)
    info = checkpoint.describe_checkpoint(saved)
    checkpoint.check_arch(dataclasses.replace(ARCH, hidden_dropout=0.1), info)  # runtime-only: not a mismatch
    with pytest.raises(ValueError, match=rf"mismatch between {saved} .*\n  num_query_groups: checkpoint 2, "
                                         rf"given 4"):
        checkpoint.check_arch(dataclasses.replace(ARCH, num_query_groups=4), info)
    assert checkpoint.arch_differences(dataclasses.replace(ARCH, num_layers=3), info) == \
        checkpoint.arch_differences(dataclasses.replace(ARCH, num_layers=3), info.metadata) == [("num_layers", 2, 3)]


def test_docs_example_runs(model, tmp_path, monkeypatch):
    """docs/checkpoints.md's example, run against a real checkpoint root at the path it names."""
    monkeypatch.chdir(tmp_path)
    checkpoint.save_checkpoint("checkpoints/tiny", 5, [model], arch=ARCH, extra={"consumed_samples": 40})
    with open(os.path.join(REPO, "docs", "checkpoints.md")) as f:
        docs = f.read()
    example = docs.split("### Describing a checkpoint", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(example, "docs/checkpoints.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert lines[0] == f"minitron 5 {tmp_path / 'checkpoints' / 'tiny' / 'iter_0000005'}"
    assert lines[1:5] == ["2 32 2", "1 1", "False None bfloat16", "False ('consumed_samples',)"]
