"""HF directories: lazy reading, clear errors for broken checkpoints, export read back by transformers."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_minitron.hf import (SafetensorsReader, arch_from_hf_config, check_hf_names,  # noqa: E402
                                  export_hf_weights, hf_config_from_arch, load_hf_weights,
                                  read_hf_config, write_hf_config)
from megatron_minitron.runtime.distributed import init_distributed  # noqa: E402
from tests.hf_tiny_models import (build_hf_model, convert_in_memory, hf_logits,  # noqa: E402
                                  sample_tokens)


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    init_distributed(1, 1)
    yield


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """A tiny Llama saved by transformers in several safetensors shards with an index."""
    path = tmp_path_factory.mktemp("hf_llama")
    model = build_hf_model("llama")
    model.save_pretrained(path, max_shard_size="40KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    return path, model


def _copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_lazy_slices_equal_the_tensors(sharded_llama):
    path, model = sharded_llama
    reader = SafetensorsReader(str(path))
    state = model.state_dict()
    check_hf_names(reader.names(), arch_from_hf_config(read_hf_config(str(path)))[0], str(path))
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(reader.read(name), state[name])
    assert torch.equal(reader.read(name, rows=slice(8, 24)), state[name][8:24])
    assert torch.equal(reader.read(name, cols=slice(16, 32)), state[name][:, 16:32])


def test_missing_shard_file_is_named(sharded_llama, tmp_path):
    broken = _copy_dir(sharded_llama[0], tmp_path / "m")
    with open(broken / "model.safetensors.index.json") as f:
        victim = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(broken / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        SafetensorsReader(str(broken))


def test_truncated_shard_gives_a_clear_error(sharded_llama, tmp_path):
    broken = _copy_dir(sharded_llama[0], tmp_path / "m")
    with open(broken / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    victim = weight_map["model.layers.0.mlp.down_proj.weight"]
    size = os.path.getsize(broken / victim)
    with open(broken / victim, "r+b") as f:
        f.truncate(size // 2)
    reader = SafetensorsReader(str(broken))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        reader.read("model.layers.0.mlp.down_proj.weight")


def test_garbage_shard_gives_a_clear_error(sharded_llama, tmp_path):
    broken = _copy_dir(sharded_llama[0], tmp_path / "m")
    with open(broken / "model.safetensors.index.json") as f:
        victim = json.load(f)["weight_map"]["model.norm.weight"]
    (broken / victim).write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        SafetensorsReader(str(broken)).read("model.norm.weight")


def test_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hf_config(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        SafetensorsReader(str(tmp_path))


def test_weights_that_do_not_fit_the_config_are_rejected(sharded_llama):
    path, model = sharded_llama
    config = read_hf_config(str(path))
    config["num_hidden_layers"] = 3
    arch, _ = arch_from_hf_config(config)
    with pytest.raises(ValueError, match="missing"):
        check_hf_names(SafetensorsReader(str(path)).names(), arch, str(path))


@pytest.mark.parametrize("case,shard_bytes", [("llama", 1 << 30), ("nemotron", 20_000)])
def test_export_is_read_back_by_transformers(case, shard_bytes, tmp_path):
    """megatron (loaded from the HF files) -> export -> transformers.from_pretrained: same tensors, logits."""
    src = tmp_path / "src"
    hf = build_hf_model(case)
    hf.save_pretrained(src)
    arch, family = arch_from_hf_config(read_hf_config(str(src)))
    from megatron_minitron.config import Parallel
    from megatron_minitron.model.builder import build_gpt
    model = build_gpt(arch, Parallel(), attention_backend="sdpa").eval()
    load_hf_weights(model, arch, SafetensorsReader(str(src)).read)

    out = tmp_path / "out"
    export_hf_weights(model, arch, str(out), max_shard_bytes=shard_bytes)
    write_hf_config(hf_config_from_arch(arch, family, base=read_hf_config(str(src))), str(out))
    assert os.path.exists(out / "model.safetensors.index.json") == (shard_bytes < 1 << 20)
    assert not [f for f in os.listdir(out) if f.startswith(".part")]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    back_state, state = back.state_dict(), hf.state_dict()
    assert sorted(back_state) == sorted(state)
    for name in state:
        assert torch.equal(back_state[name], state[name]), name
    tokens = sample_tokens()
    assert torch.equal(hf_logits(back, tokens), hf_logits(hf, tokens))


def test_tied_export_omits_lm_head(tmp_path):
    hf = build_hf_model("llama_tied")
    arch, family, model = convert_in_memory(hf)
    export_hf_weights(model, arch, str(tmp_path))
    names = SafetensorsReader(str(tmp_path)).names()
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_missing_fused_tensors_are_named_as_the_files_name_them(tmp_path):
    """A Phi-3 directory without one layer's qkv_proj: the error names qkv_proj (what its files hold), not the
    q/k/v parts the mapping reads from it."""
    from megatron_minitron.hf import FusedView

    model = build_hf_model("phi3")
    state = {k: v for k, v in model.state_dict().items() if k != "model.layers.1.self_attn.qkv_proj.weight"}
    arch, family = arch_from_hf_config(model.config.to_dict())
    view = FusedView(None, list(state), arch, family)
    with pytest.raises(ValueError, match=r"1 missing.*\['model\.layers\.1\.self_attn\.qkv_proj\.weight'\]"):
        check_hf_names(view.names(), arch, str(tmp_path), view.file_name)
