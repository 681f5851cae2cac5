"""Megatron-LM checkpoints without torch.distributed: args <-> ModelArch both ways, unsupported features,
the tracker file and iteration directories, the RNG layout, and the errors for directories of neither format.
Directories are fabricated (empty files stand in for common.pt / metadata.json / .metadata where only their
presence matters; real dist checkpoints are in tests/distributed/test_checkpoint_megatron_lm_distributed.py)."""
import argparse
import dataclasses
import os

import numpy as np
import pytest
import torch

from megatron_minitron import checkpoint
from megatron_minitron.checkpoint import layout
from megatron_minitron.checkpoint import megatron_lm as mlm
from megatron_minitron.config import ModelArch, Parallel

BASE = ModelArch(num_layers=3, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8, vocab_size=1000,
                 seq_length=256)
# every supported field away from its default at least once
VARIANTS = {
    "base": BASE,
    "gqa_headdim": dataclasses.replace(BASE, num_query_groups=2, kv_channels=16),
    "layernorm_1p_gelu_bias": dataclasses.replace(BASE, normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                                                  norm_epsilon=1e-6, activation="gelu", add_bias_linear=True),
    "squared_relu_learned_tied": dataclasses.replace(BASE, activation="squared_relu",
                                                     position_embedding="learned_absolute", tie_embeddings=True),
    "no_position_qkv_bias": dataclasses.replace(BASE, position_embedding="none", add_qkv_bias=True),
    "qk_layernorm": dataclasses.replace(BASE, qk_layernorm=True, num_query_groups=4, kv_channels=16),
    "nope_layers": dataclasses.replace(BASE, position_embedding="rope", no_rope_freq=[0, 1, 0]),
    "rope_scaled": dataclasses.replace(BASE, rotary_base=500000.0, rotary_percent=0.5, rope_scaling=True,
                                       rope_scaling_factor=32.0),
    "dropout_std": dataclasses.replace(BASE, init_method_std=0.01, hidden_dropout=0.1, attention_dropout=0.05),
    "vocab_divisor": dataclasses.replace(BASE, vocab_size=50257, make_vocab_size_divisible_by=64),
}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_arch_round_trips_through_args(tp):
    for name, arch in VARIANTS.items():
        args = mlm.args_from_arch(arch, Parallel(tensor_model_parallel_size=tp))
        assert mlm.arch_from_args(args) == arch, name
        # what Megatron-LM itself reads, computed here independently of ModelArch
        multiple = arch.make_vocab_size_divisible_by * tp
        assert args.padded_vocab_size == -(-arch.vocab_size // multiple) * multiple, name
        assert args.padded_vocab_size % (128 if arch.make_vocab_size_divisible_by == 128 else 64) == 0
        assert args.tensor_model_parallel_size == tp and args.ckpt_format == "torch_dist"
        assert args.kv_channels == (arch.kv_channels or arch.hidden_size // arch.num_attention_heads)
        assert args.group_query_attention == (arch.num_query_groups is not None)
        assert args.num_query_groups == (arch.num_query_groups or arch.num_attention_heads)
        assert args.swiglu == (arch.activation == "swiglu")
        assert args.untie_embeddings_and_output_weights == (not arch.tie_embeddings)
        assert args.max_position_embeddings == arch.seq_length == args.seq_length
        assert args.apply_layernorm_1p == args.layernorm_zero_centered_gamma == arch.layernorm_zero_centered_gamma
        assert args.norm_epsilon == args.layernorm_epsilon == arch.norm_epsilon


def test_args_carry_what_megatron_lm_load_reads():
    args = mlm.args_from_arch(BASE, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                     "data_parallel_size": 3, "world_size": 12, "model_chunks": 2},
                              iteration=7, consumed_train_samples=96)
    # check_checkpoint_args reads these without a default (a missing one is an AttributeError there)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                 "make_vocab_size_divisible_by", "tokenizer_type", "data_parallel_random_init", "global_batch_size",
                 "phase_transition_iterations", "padded_vocab_size", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size"):
        assert hasattr(args, name), name
    assert (args.world_size, args.data_parallel_size, args.virtual_pipeline_model_parallel_size) == (12, 3, 2)
    assert (args.iteration, args.consumed_train_samples) == (7, 96)
    assert isinstance(args, argparse.Namespace) and args.rotary_base == 10000 and isinstance(args.rotary_base, int)
    # megatron-core's TransformerConfig fields come along at their argparse defaults
    assert args.num_moe_experts is None and args.qk_layernorm is False and args.multi_latent_attention is False


def megatron_lm_style_args(**over):
    """args as an older Megatron-LM run writes them (legacy names, derived values, no --vocab-size)."""
    values = dict(num_layers=2, hidden_size=96, num_attention_heads=6, ffn_hidden_size=None, kv_channels=16,
                  group_query_attention=False, num_query_groups=1, normalization="RMSNorm", norm_epsilon=1e-5,
                  apply_layernorm_1p=False, swiglu=True, squared_relu=False, position_embedding_type="rope",
                  rotary_base=10000, rotary_percent=1.0, use_rope_scaling=False, rope_scaling_factor=8.0,
                  untie_embeddings_and_output_weights=True, disable_bias_linear=True, add_qkv_bias=False,
                  seq_length=512, max_position_embeddings=512, padded_vocab_size=32256, vocab_size=None,
                  make_vocab_size_divisible_by=128, tensor_model_parallel_size=2, init_method_std=0.02,
                  hidden_dropout=0.0, attention_dropout=0.0)
    values.update(over)
    return argparse.Namespace(**values)


def test_arch_from_megatron_lm_written_args():
    arch = mlm.arch_from_args(megatron_lm_style_args())
    assert arch.num_query_groups is None and arch.kv_channels is None  # MHA, default head dim
    assert arch.ffn_hidden_size == int((4 * 96 * 2 / 3) / 64) * 64  # what validate_args derives for swiglu
    assert arch.add_bias_linear is False and arch.tie_embeddings is False
    assert arch.padded_vocab_size(2) == 32256 and arch.vocab_size == 32256
    # the tokenizer's size when recorded and consistent; else the padded rows
    assert mlm.arch_from_args(megatron_lm_style_args(vocab_size=32100)).vocab_size == 32100
    assert mlm.arch_from_args(megatron_lm_style_args(vocab_size=32000)).vocab_size == 32256  # 32000 pads to itself
    odd = mlm.arch_from_args(megatron_lm_style_args(padded_vocab_size=1000, make_vocab_size_divisible_by=128))
    assert odd.padded_vocab_size(2) == 1000 and odd.make_vocab_size_divisible_by == 1
    gqa = mlm.arch_from_args(megatron_lm_style_args(group_query_attention=True, num_query_groups=2))
    assert gqa.num_query_groups == 2
    assert mlm.arch_from_args(megatron_lm_style_args(position_embedding_type="learned_absolute",
                                                     add_position_embedding=False)).position_embedding == "none"
    assert mlm.arch_from_args(megatron_lm_style_args(position_embedding_type="learned_absolute",
                                                     use_rotary_position_embeddings=True)).position_embedding == "rope"
    assert mlm.arch_from_args(megatron_lm_style_args(disable_bias_linear=False)).add_bias_linear is True
    qk = mlm.arch_from_args(megatron_lm_style_args(qk_layernorm=True))  # --qk-layernorm (Qwen3 recipes)
    assert qk.qk_layernorm is True and arch.qk_layernorm is False
    assert mlm.args_from_arch(qk, Parallel()).qk_layernorm is True
    ln = mlm.arch_from_args(megatron_lm_style_args(normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                                                   layernorm_epsilon=1e-6, swiglu=False, ffn_hidden_size=None))
    assert (ln.layernorm_zero_centered_gamma, ln.norm_epsilon, ln.activation, ln.ffn_hidden_size) == \
        (True, 1e-6, "gelu", 4 * 96)


@pytest.mark.parametrize("name,value", [
    ("num_experts", 8), ("multi_latent_attention", True), ("mtp_num_layers", 1),
    ("qk_l2_norm", True), ("attention_output_gate", True), ("experimental_attention_variant", "dsa"),
    ("heterogeneous_layers_config_path", "x.json"), ("is_hybrid_model", True), ("hybrid_override_pattern", "M*"),
    ("spec", ["my.module", "spec"]), ("use_legacy_models", True), ("window_size", (128, 0)),
    ("rotary_interleaved", True), ("rotary_seq_len_interpolation_factor", 2),
    ("apply_residual_connection_post_layernorm", True), ("openai_gelu", True), ("quick_geglu", True),
    ("softmax_type", "learnable"), ("yaml_cfg", "model.yaml"), ("position_embedding_type", "mrope"),
    ("normalization", "L2Norm"), ("decoder_num_layers", 5),
])
def test_unsupported_features_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        mlm.arch_from_args(megatron_lm_style_args(**{name: value}))
    # and the defaults Megatron-LM writes for the same arguments are accepted
    mlm.arch_from_args(mlm.args_from_arch(BASE, Parallel()))


def test_swiglu_and_squared_relu_together_is_an_error():
    with pytest.raises(ValueError, match="swiglu and args.squared_relu"):
        mlm.arch_from_args(megatron_lm_style_args(squared_relu=True))


def test_tokenizer_from_args_when_its_files_exist(tmp_path):
    spm = tmp_path / "tok.model"
    spm.write_bytes(b"x")
    args = megatron_lm_style_args(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(spm))
    assert mlm.tokenizer_from_args(args) == {"type": "sentencepiece", "path": str(spm)}
    args.tokenizer_model = str(tmp_path / "gone.model")
    assert mlm.tokenizer_from_args(args) is None
    hf = tmp_path / "hf"
    hf.mkdir()
    assert mlm.tokenizer_from_args(megatron_lm_style_args(tokenizer_type="HuggingFaceTokenizer",
                                                          tokenizer_model=str(hf)))["type"] == "huggingface"
    assert mlm.tokenizer_from_args(megatron_lm_style_args(tokenizer_type="GPT2BPETokenizer")) is None
    # and back: our record names Megatron-LM's tokenizer type and file
    assert mlm.tokenizer_args({"type": "sentencepiece", "path": str(spm)}) == \
        {"tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": str(spm)}
    assert mlm.tokenizer_args(None) == {}


# ------------------------------------------------------------------------------------------ RNG layout
def test_rng_state_converts_to_megatron_lm_list_and_back():
    ours = {"random": ("r",), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None,
            "tracker": {"model-parallel-rng": torch.arange(3)}}
    states = mlm.to_megatron_rng(ours)
    assert isinstance(states, list) and len(states) == 1
    assert set(states[0]) == {"random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
                              "rng_tracker_states"}
    cuda = states[0]["cuda_rng_state"]  # made up from the seed where no GPU is: 8 bytes seed + 8 offset
    assert cuda.dtype == torch.uint8 and cuda.numel() == 16
    assert int.from_bytes(bytes(cuda[:8].tolist()), "little") == torch.initial_seed()
    back = mlm.from_megatron_rng(states)
    assert back["random"] == ours["random"] and torch.equal(back["torch"], ours["torch"])
    assert torch.equal(back["tracker"]["model-parallel-rng"], torch.arange(3))


def test_content_metadata_says_how_the_optimizer_is_sharded():
    assert mlm.content_metadata("fully_reshardable")["distrib_optim_sharding_type"] == "fully_reshardable"
    assert mlm.content_metadata("dp_reshardable")["distrib_optim_sharding_type"] == "dp_reshardable"
    for none in (None, "per_parameter"):
        assert "distrib_optim_sharding_type" not in mlm.content_metadata(none)
    assert mlm.output_dir_name(12, has_optimizer=True) == "iter_0000012"
    assert mlm.output_dir_name(12, has_optimizer=False) == "release"


# ------------------------------------------------------------------------------------------ tracker
def fake_megatron_lm_dir(directory, complete=True):
    os.makedirs(directory, exist_ok=True)
    names = (layout.COMMON_FILE, layout.DIST_CONFIG_FILE, layout.DCP_METADATA_FILE)
    for name in names if complete else names[:1]:
        open(os.path.join(directory, name), "w").close()
    return str(directory)


def test_tracker_resolves_iteration_and_release_dirs(tmp_path):
    it = fake_megatron_lm_dir(tmp_path / "iter_0000100")
    (tmp_path / layout.TRACKER_FILE).write_text("100\n")
    assert checkpoint.resolve_checkpoint_dir(str(tmp_path)) == it
    assert checkpoint.latest_iteration(str(tmp_path)) == 100
    assert checkpoint.resolve_checkpoint_dir(it) == it  # the iteration directory itself
    release = fake_megatron_lm_dir(tmp_path / "release")
    layout.write_tracker(str(tmp_path), "release")
    assert (tmp_path / layout.TRACKER_FILE).read_text() == "release"
    assert checkpoint.resolve_checkpoint_dir(str(tmp_path)) == release
    assert checkpoint.latest_iteration(str(tmp_path)) is None  # weights to start from, not a run to resume
    layout.write_tracker(str(tmp_path), "iter_0000100")
    assert (tmp_path / layout.TRACKER_FILE).read_text() == "100"
    assert layout.committed_iterations(str(tmp_path)) == [100]


def test_tracker_errors_name_the_fix(tmp_path):
    (tmp_path / layout.TRACKER_FILE).write_text("last one")
    with pytest.raises(ValueError, match="corrupt.*echo 100"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path))
    (tmp_path / layout.TRACKER_FILE).write_text("200")
    fake_megatron_lm_dir(tmp_path / "iter_0000100")
    fake_megatron_lm_dir(tmp_path / "iter_0000200", complete=False)  # a save that died
    with pytest.raises(ValueError, match=r"names iter_0000200.*did not finish.*\['iter_0000100'\]"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path))
    with pytest.raises(ValueError, match=r"lacks \['metadata.json', '.metadata'\]"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path / "iter_0000200"))
    os.remove(tmp_path / layout.TRACKER_FILE)
    with pytest.raises(FileNotFoundError, match=r"no `latest` file.*iter_0000100"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path))


def test_directory_of_neither_format_gets_one_error_naming_what_was_looked_for(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        checkpoint.read_metadata(str(tmp_path))
    for looked_for in ("COMMIT", "minitron.yaml", "`latest`", "latest_checkpointed_iteration.txt", "common.pt",
                       "metadata.json"):
        assert looked_for in str(e.value), looked_for
    assert "did not finish" not in str(e.value)
    ours = tmp_path / "ours"  # a save of ours that died before COMMIT: that message, and only for it
    ours.mkdir()
    (ours / checkpoint.METADATA_FILE).write_text("iteration: 1\n")
    fake_megatron_lm_dir(ours)
    with pytest.raises(ValueError, match="megatron-minitron save that wrote it did not finish"):
        checkpoint.resolve_checkpoint_dir(str(ours))


def test_dist_checkpoint_without_args_is_explained(tmp_path, monkeypatch):
    directory = fake_megatron_lm_dir(tmp_path / "weights")  # e.g. a NeMo 2 checkpoint's weights/
    monkeypatch.setattr(mlm, "read_common", lambda d: {"sharded_state_dict_metadata": {}})
    with pytest.raises(ValueError, match="holds no `args`.*NeMo 2"):
        checkpoint.read_metadata(directory)


def test_metadata_of_a_megatron_lm_directory(tmp_path, monkeypatch):
    arch = VARIANTS["gqa_headdim"]
    args = mlm.args_from_arch(arch, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                                     "data_parallel_size": 2, "world_size": 4}, bf16=True,
                              params_dtype=torch.bfloat16, use_distributed_optimizer=True)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 100, "opt_param_scheduler": {},
              "content_metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}
    monkeypatch.setattr(mlm, "read_common", lambda d: common)
    monkeypatch.setattr(mlm, "has_sharded_key", lambda d, key: key in ("optimizer", "rng_state"))
    it = fake_megatron_lm_dir(tmp_path / "iter_0000100")
    (tmp_path / layout.TRACKER_FILE).write_text("100")
    meta = checkpoint.read_metadata(str(tmp_path))
    assert meta["format"] == "megatron-lm" and checkpoint.checkpoint_format(meta) == "megatron-lm"
    assert meta["checkpoint_dir"] == it and meta["iteration"] == 100
    assert checkpoint.arch_from_metadata(meta) == arch
    assert meta["parallel"]["tensor_model_parallel_size"] == 2 and meta["parallel"]["layers_per_stage"] == [[3]]
    assert meta["contents"]["optimizer_sharding"] == "dp_reshardable" and meta["contents"]["scheduler"]
    assert meta["contents"]["rng"] and meta["contents"]["params_dtype"] == "bfloat16"
    assert not meta["contents"]["release"]


def test_save_refuses_mixing_layouts_in_one_root(tmp_path):
    (tmp_path / "latest").write_text("iter_0000001")
    with pytest.raises(ValueError, match="megatron-minitron-format checkpoints"):
        checkpoint.save_checkpoint(str(tmp_path), 2, [object()], arch=BASE, format="megatron-lm")
    other = tmp_path / "mlm"
    other.mkdir()
    (other / layout.TRACKER_FILE).write_text("1")
    with pytest.raises(ValueError, match="Megatron-LM-format checkpoints"):
        checkpoint.save_checkpoint(str(other), 2, [object()], arch=BASE)
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a Megatron-LM checkpoint root"):
        checkpoint.save_checkpoint_to(str(data), [object()], arch=BASE, format="megatron-lm")
    with pytest.raises(ValueError, match="format 'megatron'"):
        checkpoint.save_checkpoint_to(str(tmp_path / "new"), [object()], arch=BASE, format="megatron")


# ------------------------------------------------------------------------------------------ CLI format flags
def test_prune_output_format_defaults_to_the_input_and_in_place_keeps_it(tmp_path):
    from megatron_minitron.prune import cli as prune_cli
    from megatron_minitron.prune import job as prune_job

    def save_format(args, metadata):
        return prune_job._save_format(prune_cli.config_from_args(args), checkpoint.checkpoint_format(metadata))

    def check_output(args, metadata, fmt):
        return prune_job._check_output(prune_cli.config_from_args(args), metadata["checkpoint_dir"], fmt)

    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers())

    def parse(*argv):
        return parser.parse_args(["prune", "--load", "SRC", *argv])

    ours, theirs = {"format": "megatron-minitron-checkpoint"}, {"format": "megatron-lm"}
    assert save_format(parse("--save", "OUT"), ours) == "minitron"
    assert save_format(parse("--save", "OUT"), theirs) == "megatron-lm"
    assert save_format(parse("--save", "OUT", "--save-format", "megatron-lm"), ours) == "megatron-lm"
    assert save_format(parse("--in-place"), theirs) == "megatron-lm"
    with pytest.raises(ValueError, match="--in-place keeps the input's format"):
        save_format(parse("--in-place", "--save-format", "minitron"), theirs)
    with pytest.raises(SystemExit):  # argparse: not a format
        parse("--save", "OUT", "--save-format", "nemo")
    # a Megatron-LM-format --save must be new, empty or a Megatron-LM root
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    meta = {"checkpoint_dir": str(tmp_path / "src")}
    with pytest.raises(ValueError, match="not a Megatron-LM checkpoint root"):
        check_output(parse("--save", str(busy)), meta, "megatron-lm")
    (busy / layout.TRACKER_FILE).write_text("release")
    assert check_output(parse("--save", str(busy)), meta, "megatron-lm") == str(busy)


def test_convert_and_train_take_the_format():
    from megatron_minitron.config import Train
    from megatron_minitron.hf import cli as hf_cli

    parser = argparse.ArgumentParser()
    hf_cli.register(parser.add_subparsers())
    args = parser.parse_args(["convert", "hf-to-mcore", "--input", "HF", "--output", "OUT", "--format",
                              "megatron-lm"])
    assert args.format == "megatron-lm"
    assert parser.parse_args(["convert", "hf-to-mcore", "--input", "HF", "--output", "OUT"]).format == "minitron"
    Train(save_format="megatron-lm").validate()
    with pytest.raises(ValueError, match="train.save_format='nemo'"):
        Train(save_format="nemo").validate()


def test_scheduler_state_in_megatron_lm_units():
    from megatron_minitron.config import Data, Train, TrainConfig

    cfg = TrainConfig(data=Data(global_batch_size=32, micro_batch_size=4),
                      train=Train(train_iters=50, lr_warmup_iters=5, lr_decay_iters=40))
    fields = mlm.training_args(cfg)
    assert (fields["global_batch_size"], fields["train_iters"], fields["lr_decay_iters"]) == (32, 50, 40)
    ours = {"max_lr": 3e-4, "min_lr": 3e-5, "lr_warmup_steps": 5, "num_steps": 12, "lr_decay_style": "cosine",
            "lr_decay_steps": 40, "start_wd": 0.01, "end_wd": 0.01, "wd_incr_style": "constant", "wd_incr_steps": 40}
    saved = mlm.scheduler_to_megatron_lm(ours, 32)
    # Megatron-LM's own values for this run: iterations x global batch size (training.py get_optimizer_param_scheduler)
    assert (saved["lr_warmup_steps"], saved["lr_decay_steps"], saved["num_steps"]) == (5 * 32, 40 * 32, 12 * 32)
    assert saved["max_lr"] == 3e-4 and saved["lr_decay_style"] == "cosine"
    assert mlm.scheduler_from_megatron_lm(saved, argparse.Namespace(global_batch_size=32)) == ours
    assert mlm.scheduler_to_megatron_lm(ours, None) == ours  # batch size unknown: left as is


def test_convert_takes_prunes_name_for_the_format_too():
    from megatron_minitron.hf import cli as hf_cli

    parser = argparse.ArgumentParser()
    hf_cli.register(parser.add_subparsers())
    base = ["convert", "hf-to-mcore", "--input", "HF", "--output", "OUT"]
    assert parser.parse_args(base + ["--save-format", "megatron-lm"]).format == "megatron-lm"
    assert parser.parse_args(base + ["--format", "megatron-lm"]).format == "megatron-lm"


def test_a_qk_layernorm_save_tells_how_megatron_lm_must_load_it(tmp_path):
    """Megatron-LM's --use-checkpoint-args does not restore qk_layernorm (it then builds the model without the
    q/k norms, silently): a Megatron-LM-format save of such a model says to pass --qk-layernorm; others don't."""
    import warnings

    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1)
    qk = dataclasses.replace(VARIANTS["qk_layernorm"], num_layers=1)
    for arch in (qk, dataclasses.replace(qk, qk_layernorm=False)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = checkpoint.save_checkpoint_to(str(tmp_path / str(arch.qk_layernorm)), [build_gpt(arch, Parallel())],
                                                arch=arch, format="megatron-lm")
        hints = [w for w in seen if "--qk-layernorm" in str(w.message)]
        assert len(hints) == int(arch.qk_layernorm), [str(w.message) for w in seen]
        assert checkpoint.read_arch(out).qk_layernorm is arch.qk_layernorm


def test_a_yarn_model_is_refused_in_megatron_lm_format_before_anything_is_written(tmp_path, monkeypatch):
    """Megatron-LM's GPT builds no YaRN rope (its --position-embedding-type has none): a Megatron-LM-format
    save would write a checkpoint Megatron-LM loads as plain rope, with other logits. The save refuses it
    before it creates anything; the minitron format keeps every YaRN field."""
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1)
    arch = ModelArch(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=64,
                     seq_length=32, position_embedding="yarn", yarn_rotary_scaling_factor=4.0,
                     yarn_original_max_position_embeddings=8, yarn_beta_fast=16.0)
    with pytest.raises(ValueError, match="YaRN.*Megatron-LM's GPT model does not build"):
        mlm.args_from_arch(arch)
    longrope = dataclasses.replace(arch, position_embedding="longrope", longrope_short_factor=[1.0] * 4,
                                   longrope_long_factor=[2.0] * 4, **{f.name: f.default for f in
                                                                      dataclasses.fields(ModelArch)
                                                                      if f.name.startswith("yarn_")})
    with pytest.raises(ValueError, match="LongRoPE.*Megatron-LM's GPT model does not build"):
        mlm.args_from_arch(longrope)
    model = build_gpt(arch, Parallel())
    with pytest.raises(ValueError, match="save it in megatron-minitron's format"):
        checkpoint.save_checkpoint_to(str(tmp_path / "mlm"), [model], arch=arch, format="megatron-lm")
    assert not (tmp_path / "mlm").exists() or not os.listdir(tmp_path / "mlm")
    out = checkpoint.save_checkpoint_to(str(tmp_path / "ours"), [model], arch=arch)
    assert checkpoint.read_arch(out) == arch
    # prune and train say so before they build a model: not after calibration, nor at a run's first save
    import megatron_minitron.model.builder as builder
    import megatron_minitron.train.loop as loop
    from megatron_minitron.config import TrainConfig
    from megatron_minitron.prune import cli as prune_cli

    def no_build(*a, **k):
        raise AssertionError("a model was built before the format was checked")

    for module in (builder, loop):
        monkeypatch.setattr(module, "build_gpt", no_build)
    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers())
    argv = ["prune", "--load", out, "--save", str(tmp_path / "pruned"), "--save-format", "megatron-lm",
            "--data", str(tmp_path / "nodata"), "--target", "ffn_hidden_size=32"]
    with pytest.raises(ValueError, match="--save-format megatron-lm: .*YaRN"):
        prune_cli.run(parser.parse_args(argv))
    cfg = TrainConfig(model=arch)
    cfg.train.load, cfg.train.save_format = out, "megatron-lm"
    with pytest.raises(ValueError, match="train.save_format=megatron-lm: the model uses YaRN"):
        loop.Trainer(cfg, datasets=(None, None)).setup()
    assert not (tmp_path / "pruned").exists()


def test_no_rope_freq_reads_as_megatron_core_expands_it():
    """--no-rope-freq N (every N-th layer skips RoPE) or a per-layer list, as TransformerConfig.__post_init__
    expands it; the model built from the arch gets the same per-layer list."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    for value in (2, [1, 0, 0, 1]):
        arch = mlm.arch_from_args(megatron_lm_style_args(num_layers=4, no_rope_freq=value))
        reference = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=8, no_rope_freq=value)
        assert arch.no_rope_freq == reference.no_rope_freq, value
        assert mlm.args_from_arch(arch, Parallel()).no_rope_freq == reference.no_rope_freq
    assert mlm.arch_from_args(megatron_lm_style_args(num_layers=3, no_rope_freq=[0, 0, 0])).no_rope_freq is None
    assert mlm.arch_from_args(megatron_lm_style_args(num_layers=3, no_rope_freq=0)).no_rope_freq is None
    with pytest.raises(ValueError, match="no_rope_freq=2 does not divide num_layers=3"):
        mlm.arch_from_args(megatron_lm_style_args(num_layers=3, no_rope_freq=2))


def test_hf_to_mcore_in_megatron_lm_format_refuses_yarn_before_reading_weights(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from megatron_minitron.hf import cli as hf_cli
    from megatron_minitron.hf import io as hf_io
    from tests.hf_tiny_models import build_hf_model

    build_hf_model("qwen3_yarn").save_pretrained(str(tmp_path / "hf"))

    def no_read(*a, **k):
        raise AssertionError("the weights were opened before the format was checked")

    monkeypatch.setattr(hf_io, "SafetensorsReader", no_read)
    with pytest.raises(ValueError, match="--format megatron-lm: .* uses YaRN"):
        hf_cli.hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "out"), format="megatron-lm")
    assert not (tmp_path / "out").exists()


def test_a_save_names_the_flags_megatron_lm_does_not_restore(tmp_path):
    """Megatron-LM's --use-checkpoint-args leaves out qk_layernorm, Llama-3.1 rope scaling, the norm epsilon and
    no_rope_freq (it then builds another model, silently): a Megatron-LM-format save names the arguments, as
    Megatron-LM's parser takes them (--no-rope-freq N for a period, else a Python list)."""
    import shlex
    import warnings

    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import init_distributed

    plain = dataclasses.replace(BASE, num_layers=4)
    assert mlm.load_flags(plain) == [] and mlm.load_hint(plain) is None
    assert mlm.load_flags(dataclasses.replace(plain, no_rope_freq=[0, 1, 0, 1])) == ["--no-rope-freq", "2"]
    assert mlm.load_flags(dataclasses.replace(plain, no_rope_freq=[1, 0, 0, 0])) == ["--no-rope-freq", "[1,0,0,0]"]
    assert mlm.load_flags(dataclasses.replace(plain, no_rope_freq=[0, 0, 0, 1])) == ["--no-rope-freq", "4"]
    every = dataclasses.replace(plain, qk_layernorm=True, rope_scaling=True, rope_scaling_factor=32.0,
                                norm_epsilon=1e-6, no_rope_freq=[0, 0, 1, 1])
    assert mlm.load_flags(every) == ["--qk-layernorm", "--use-rope-scaling", "--rope-scaling-factor", "32.0",
                                     "--norm-epsilon", "1e-06", "--no-rope-freq", "[0,0,1,1]"]
    assert mlm.load_hint(every).endswith(shlex.join(mlm.load_flags(every)))
    init_distributed(1, 1)
    arch = dataclasses.replace(BASE, num_layers=2, no_rope_freq=[0, 1])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = checkpoint.save_checkpoint_to(str(tmp_path / "nope"), [build_gpt(arch, Parallel())], arch=arch,
                                            format="megatron-lm")
    assert [str(w.message) for w in seen if "--use-checkpoint-args" in str(w.message)] == [mlm.load_hint(arch)]
    assert checkpoint.read_arch(out).no_rope_freq == [0, 1]
