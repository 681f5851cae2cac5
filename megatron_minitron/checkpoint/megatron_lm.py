"""Megatron-LM's own ``torch_dist`` checkpoints (``pretrain_gpt.py --ckpt-format torch_dist``), read and written.

    ROOT/latest_checkpointed_iteration.txt   "100" (-> ROOT/iter_0000100) or "release" (-> ROOT/release)
    ROOT/iter_0000100/                       common.pt, metadata.json, .metadata, __*_*.distcp
      common.pt: args (argparse.Namespace), checkpoint_version 3.0, iteration,
                 num_floating_point_operations_so_far, content_metadata (how the optimizer state is sharded)
      sharded:   model (model0, model1, ... with virtual pipeline), optimizer (+ its param groups and the
                 opt_param_scheduler in common.pt), rng_state (ShardedObject over the (PP, TP) grid holding a
                 list of one dict per DP rank)

The same GPTModel names as ours (megatron-core's sharded_state_dict), so the weights load at any TP x PP
through dist_checkpointing; this module maps Megatron-LM's ``args`` to our ModelArch and back, reads the
tracker, and builds the parts of the state dict that differ from our own layout. See docs/checkpoints.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional

from ..config import ModelArch, Parallel, to_dict
from .layout import (COMMON_FILE, RELEASE_DIR, TRACKER_FILE, is_megatron_lm_dir, read_tracker,  # noqa: F401
                     tracker_path, write_tracker)

FORMAT = "megatron-lm"
CHECKPOINT_VERSION = 3.0
SCHEDULER_KEY = "opt_param_scheduler"
RNG_KEY = "rng_state"

# Megatron-LM's tokenizer types and ours (the file the type needs is args.tokenizer_model).
_TOKENIZER_TYPES = {"HuggingFaceTokenizer": "huggingface", "SentencePieceTokenizer": "sentencepiece",
                    "GPTSentencePieceTokenizer": "sentencepiece", "Llama2Tokenizer": "sentencepiece"}
_TOKENIZER_TYPE_OUT = {"huggingface": "HuggingFaceTokenizer", "sentencepiece": "GPTSentencePieceTokenizer"}


def read_common(directory: str) -> dict:
    """The common state of a dist checkpoint: common.pt, or the shards' ``common_state`` as megatron-core
    >= 0.19 writes it (megatron-core registers argparse.Namespace as a safe global)."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    from .layout import check_readable_by_installed_core

    check_readable_by_installed_core(directory)
    try:
        common = load_common_state_dict(directory)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"{os.path.join(directory, COMMON_FILE)} cannot be read ({type(e).__name__}: "
                         f"{str(e)[:300]}); the checkpoint is incomplete or not a megatron-core one") from None
    if not isinstance(common, dict):
        raise ValueError(f"{os.path.join(directory, COMMON_FILE)} holds a {type(common).__name__}, not a dict")
    return common


# ------------------------------------------------------------------------------------------ args -> arch
def _get(args, *names, default=None):
    """The first of ``names`` that ``args`` carries with a value other than None."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


# Megatron-LM's --use-checkpoint-args (checkpointing.load_args_from_checkpoint) restores only a fixed list of
# args: of those we write, these are not among them. Loaded without the flags, Megatron-LM silently builds
# another model (no q/k norms, plain RoPE, every layer rotating, its default epsilon): wrong logits, no error
# (each seen against Megatron-LM itself, tests/megatron_lm)
MEGATRON_LM_NORM_EPSILON = 1e-5  # TransformerConfig.layernorm_epsilon's default, what --norm-epsilon sets


def _no_rope_value(flags: list) -> str:
    period = flags.index(1) + 1  # --no-rope-freq N: every N-th layer skips RoPE
    if len(flags) % period == 0 and flags == ([0] * (period - 1) + [1]) * (len(flags) // period):
        return str(period)
    return "[" + ",".join(str(int(x)) for x in flags) + "]"  # else the Python list Megatron-LM evaluates


def load_flags(arch: ModelArch) -> list:
    """The Megatron-LM arguments (argv tokens) a load of this model needs on top of --use-checkpoint-args."""
    flags = []
    if arch.qk_layernorm:
        flags.append("--qk-layernorm")
    if arch.rope_scaling:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(float(arch.rope_scaling_factor))]
    if float(arch.norm_epsilon) != MEGATRON_LM_NORM_EPSILON:
        flags += ["--norm-epsilon", repr(float(arch.norm_epsilon))]
    if arch.no_rope_freq and any(arch.no_rope_freq):
        flags += ["--no-rope-freq", _no_rope_value(list(arch.no_rope_freq))]
    return flags


def load_hint(arch: ModelArch) -> Optional[str]:
    """What a Megatron-LM-format save says (None when Megatron-LM's --use-checkpoint-args restores it all)."""
    import shlex

    flags = load_flags(arch)
    if not flags:
        return None
    return ("Megatron-LM's --use-checkpoint-args does not restore all of this checkpoint's architecture: without "
            "these flags it silently builds a different model (wrong logits, no error). Load it in Megatron-LM "
            f"with: {shlex.join(flags)}")


# (argument, test of an unsupported value, what it is): checked before anything else is read.
_UNSUPPORTED = (
    ("num_experts", lambda v: bool(v), "mixture of experts"),
    ("multi_latent_attention", bool, "multi-latent attention"),
    ("mtp_num_layers", lambda v: bool(v), "multi-token prediction layers"),
    ("qk_l2_norm", bool, "query/key L2 norm"),
    ("attention_output_gate", bool, "gated attention output"),
    ("experimental_attention_variant", lambda v: v is not None, "an experimental attention variant"),
    ("heterogeneous_layers_config_path", lambda v: v is not None, "heterogeneous layers"),
    ("heterogeneous_layers_config_encoded_json", lambda v: v is not None, "heterogeneous layers"),
    ("is_hybrid_model", bool, "a hybrid (Mamba) model"),
    ("hybrid_override_pattern", lambda v: v is not None, "a hybrid (Mamba) model"),
    ("spec", lambda v: bool(v), "a custom layer spec"),
    ("use_legacy_models", bool, "legacy (non-megatron-core) models"),
    ("window_size", lambda v: v is not None, "sliding-window attention"),
    ("rotary_interleaved", bool, "interleaved rotary embeddings"),
    ("rotary_seq_len_interpolation_factor", lambda v: v is not None, "rotary sequence-length interpolation"),
    ("apply_residual_connection_post_layernorm", bool, "residual connections after the layer norm"),
    ("openai_gelu", bool, "the tanh-approximated (OpenAI) GeLU"),
    ("quick_geglu", bool, "the quick GeGLU activation"),
    ("softmax_type", lambda v: v not in (None, "vanilla"), "a non-standard attention softmax"),
    ("yaml_cfg", lambda v: v is not None, "a YAML model config"),
)


def arch_from_args(args) -> ModelArch:
    """Our ModelArch for a Megatron-LM checkpoint's ``args``; ValueError naming the argument of any feature
    this project does not build (MoE, MLA, MTP, ...)."""
    for name, unsupported, what in _UNSUPPORTED:
        value = getattr(args, name, None)
        if value is not None and unsupported(value):
            raise ValueError(f"the Megatron-LM checkpoint uses {what} (args.{name}={value!r}), which "
                             f"megatron-minitron does not build; only dense GPT models (megatron-core's "
                             f"GPTModel with the standard layer) can be read")
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if _get(args, n) is None]
    if missing:
        raise ValueError(f"the checkpoint's args lack {missing}; it is not a Megatron-LM GPT checkpoint")
    hidden, heads = int(args.hidden_size), int(args.num_attention_heads)
    decoder_layers = _get(args, "decoder_num_layers")
    if decoder_layers is not None and int(decoder_layers) != int(args.num_layers):
        raise ValueError(f"args.decoder_num_layers={decoder_layers} differs from args.num_layers="
                         f"{args.num_layers}: encoder-decoder checkpoints are not supported")

    swiglu, squared_relu = bool(_get(args, "swiglu", default=False)), bool(_get(args, "squared_relu", default=False))
    if swiglu and squared_relu:
        raise ValueError("args.swiglu and args.squared_relu are both set; Megatron-LM refuses that too")
    activation = "swiglu" if swiglu else "squared_relu" if squared_relu else "gelu"

    position = _get(args, "position_embedding_type", default="learned_absolute")
    if _get(args, "use_rotary_position_embeddings", default=False):
        position = "rope"  # the deprecated flag of older Megatron-LM
    if position == "learned_absolute" and _get(args, "add_position_embedding", default=True) is False:
        position = "none"
    if position not in ("rope", "learned_absolute", "none"):
        raise ValueError(f"args.position_embedding_type={position!r} is not supported (rope, learned_absolute "
                         f"or none)")
    normalization = _get(args, "normalization", default="LayerNorm")
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"args.normalization={normalization!r} is not supported (LayerNorm or RMSNorm)")

    query_groups = None
    if _get(args, "group_query_attention", default=False):
        query_groups = int(_get(args, "num_query_groups", default=1))
        if query_groups == heads:
            query_groups = None
    kv_channels = _get(args, "kv_channels")
    if kv_channels is not None and hidden % heads == 0 and int(kv_channels) == hidden // heads:
        kv_channels = None
    ffn = _get(args, "ffn_hidden_size")
    if ffn is None:  # what Megatron-LM's validate_args derives
        ffn = int((4 * hidden * 2 / 3) / 64) * 64 if swiglu else 4 * hidden

    add_bias_linear = _get(args, "add_bias_linear")
    if add_bias_linear is None:
        disable = _get(args, "disable_bias_linear")
        add_bias_linear = True if disable is None else not disable  # megatron-core's default: biases on
    zero_centred = _get(args, "layernorm_zero_centered_gamma", "apply_layernorm_1p", default=False)
    epsilon = _get(args, "layernorm_epsilon", "norm_epsilon", default=1e-5)

    seq_length = _get(args, "max_position_embeddings", "seq_length", "encoder_seq_length")
    if seq_length is None:
        raise ValueError("the checkpoint's args give neither max_position_embeddings nor seq_length")
    vocab_size, divisible_by = _vocab_from_args(args)
    rotary_base = _get(args, "rotary_base", default=10000)

    arch = ModelArch(
        num_layers=int(args.num_layers), hidden_size=hidden, ffn_hidden_size=int(ffn), num_attention_heads=heads,
        num_query_groups=query_groups, kv_channels=None if kv_channels is None else int(kv_channels),
        vocab_size=vocab_size, make_vocab_size_divisible_by=divisible_by, seq_length=int(seq_length),
        normalization=normalization, norm_epsilon=float(epsilon), layernorm_zero_centered_gamma=bool(zero_centred),
        activation=activation, position_embedding=position, rotary_base=float(rotary_base),
        rotary_percent=float(_get(args, "rotary_percent", default=1.0)),
        rope_scaling=bool(_get(args, "use_rope_scaling", default=False)),
        rope_scaling_factor=float(_get(args, "rope_scaling_factor", default=8.0)),
        tie_embeddings=not bool(_get(args, "untie_embeddings_and_output_weights", default=False)),
        add_bias_linear=bool(add_bias_linear), add_qkv_bias=bool(_get(args, "add_qkv_bias", default=False)),
        qk_layernorm=bool(_get(args, "qk_layernorm", default=False)),  # --qk-layernorm (Qwen3 recipes)
        no_rope_freq=_no_rope_layers(_get(args, "no_rope_freq"), int(args.num_layers)),
        init_method_std=float(_get(args, "init_method_std", default=0.02)),
        hidden_dropout=float(_get(args, "hidden_dropout", default=0.1)),
        attention_dropout=float(_get(args, "attention_dropout", default=0.1)),
    )
    arch.validate()
    return arch


def _no_rope_layers(value, num_layers: int) -> Optional[list]:
    """--no-rope-freq as megatron-core expands it (TransformerConfig.__post_init__): N = every N-th layer skips
    RoPE, a list = one 0 / 1 per layer; None when no layer skips it."""
    if not value:  # None, or 0: megatron-core's "no layer skips it" too (`if self.no_rope_freq:`)
        return None
    if isinstance(value, int):
        if value <= 0 or num_layers % value:
            raise ValueError(f"args.no_rope_freq={value} does not divide num_layers={num_layers}")
        value = ([0] * (value - 1) + [1]) * (num_layers // value)
    flags = [int(x) for x in value]
    return flags if any(flags) else None


def _vocab_from_args(args) -> tuple:
    """(vocab_size, make_vocab_size_divisible_by) such that ModelArch.padded_vocab_size(TP of the checkpoint)
    is exactly args.padded_vocab_size, the embedding's row count."""
    padded = _get(args, "padded_vocab_size")
    if padded is None:
        raise ValueError("the checkpoint's args have no padded_vocab_size (the embedding's row count)")
    padded = int(padded)
    tp = int(_get(args, "tensor_model_parallel_size", default=1))
    divisible_by = int(_get(args, "make_vocab_size_divisible_by", default=128))
    vocab = _get(args, "vocab_size")
    if vocab is not None and str(_get(args, "tokenizer_type", default="")) == "NullTokenizer":
        vocab = int(vocab) + 1  # Megatron-LM's NullTokenizer appends its EOD as id vocab_size: one more entry

    def pads_to(v: int, d: int) -> bool:
        return ((v + d * tp - 1) // (d * tp)) * (d * tp) == padded

    if vocab is not None and 0 < int(vocab) <= padded and pads_to(int(vocab), divisible_by):
        return int(vocab), divisible_by
    # The tokenizer's own size is not recorded (e.g. a HuggingFaceTokenizer run): the padded rows are the
    # vocabulary. Keep Megatron-LM's multiple when the rows are a multiple of it, so that a re-save pads alike.
    return padded, divisible_by if pads_to(padded, divisible_by) else 1


def tokenizer_from_args(args) -> Optional[dict]:
    """Our tokenizer record ({"type", "path"}) for the checkpoint's tokenizer when its files exist here."""
    kind = _TOKENIZER_TYPES.get(str(_get(args, "tokenizer_type", default="")))
    path = _get(args, "tokenizer_model")
    if kind is None or not path or not os.path.exists(str(path)):
        return None
    return {"type": kind, "path": os.path.abspath(str(path))}


# ------------------------------------------------------------------------------------------ arch -> args
def _config_defaults() -> dict:
    """The argparse defaults Megatron-LM derives from megatron-core's TransformerConfig (its arguments.py
    builds one command-line flag per config field; a field's ``argparse_meta`` default wins), plain values only."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    defaults = {}
    for f in dataclasses.fields(TransformerConfig):
        meta = (f.metadata or {}).get("argparse_meta", {})
        if "default" in meta:
            value = meta["default"]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            try:
                value = f.default_factory()
            except Exception:
                continue
        else:
            continue
        if _is_plain(value):
            defaults[f.name] = value
    return defaults


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return False


def _parallel_sizes(parallel) -> dict:
    """TP, PP, DP, world size and virtual chunks from a config.Parallel or a state.current_layout() dict."""
    if parallel is None:
        parallel = Parallel()
    if isinstance(parallel, Parallel):
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        return {"tp": tp, "pp": pp, "dp": 1, "world": tp * pp, "chunks": 1,
                "sequence_parallel": parallel.sequence_parallel,
                "distributed_optimizer": parallel.use_distributed_optimizer}
    tp = int(parallel.get("tensor_model_parallel_size", 1))
    pp = int(parallel.get("pipeline_model_parallel_size", 1))
    dp = int(parallel.get("data_parallel_size", 1))
    return {"tp": tp, "pp": pp, "dp": dp, "world": int(parallel.get("world_size", tp * pp * dp)),
            "chunks": int(parallel.get("model_chunks", 1)),
            "sequence_parallel": bool(parallel.get("sequence_parallel", False)),
            "distributed_optimizer": bool(parallel.get("use_distributed_optimizer", False))}


def check_representable(arch: ModelArch, what: str = "this model") -> None:
    """ValueError when Megatron-LM could not build ``arch`` from the args a Megatron-LM-format save writes."""
    if arch.position_embedding in ("yarn", "longrope"):
        # its --position-embedding-type has neither (only multi-latent attention models take YaRN)
        name = {"yarn": "YaRN", "longrope": "LongRoPE"}[arch.position_embedding]
        raise ValueError(f"{what} uses {name} rope (position_embedding={arch.position_embedding}), which "
                         f"Megatron-LM's GPT model does not build: save it in megatron-minitron's format (drop "
                         f"save_format=megatron-lm / --save-format megatron-lm) or export it to Hugging Face "
                         f"(minitron convert mcore-to-hf)")


def args_from_arch(arch: ModelArch, parallel=None, **extra) -> argparse.Namespace:
    """A Megatron-LM ``args`` Namespace describing ``arch`` as saved at ``parallel`` (a config.Parallel or a
    layout dict): the fields Megatron-LM's load_checkpoint, check_checkpoint_args, load_args_from_checkpoint
    (--use-checkpoint-args) and its GPT model builder read, everything else at Megatron-LM's defaults.
    ``extra`` overrides or adds any field (e.g. iteration=100, consumed_train_samples=...)."""
    import torch

    check_representable(arch)
    sizes = _parallel_sizes(parallel)
    values: dict = _config_defaults()
    values.update({
        # network size (Megatron-LM's own flags, and its names for TransformerConfig fields)
        "num_layers": arch.num_layers, "encoder_num_layers": None, "decoder_num_layers": None,
        "hidden_size": arch.hidden_size, "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "group_query_attention": arch.num_query_groups is not None,
        "num_query_groups": arch.query_groups, "kv_channels": arch.head_dim,
        "seq_length": arch.seq_length, "encoder_seq_length": arch.seq_length,
        "max_position_embeddings": arch.seq_length,
        "position_embedding_type": arch.position_embedding, "use_rotary_position_embeddings": False,
        "add_position_embedding": True,
        "rotary_base": int(arch.rotary_base) if float(arch.rotary_base).is_integer() else arch.rotary_base,
        "rotary_percent": arch.rotary_percent, "rotary_interleaved": False,
        "rotary_seq_len_interpolation_factor": None, "rope_type": None,
        "no_rope_freq": list(arch.no_rope_freq) if arch.no_rope_freq and any(arch.no_rope_freq) else None,
        "use_rope_scaling": arch.rope_scaling, "rope_scaling_factor": arch.rope_scaling_factor,
        "normalization": arch.normalization, "layernorm_epsilon": arch.norm_epsilon,
        "norm_epsilon": arch.norm_epsilon,  # the name before megatron-core 0.16
        "layernorm_zero_centered_gamma": arch.layernorm_zero_centered_gamma,
        "apply_layernorm_1p": arch.layernorm_zero_centered_gamma,  # the name before 0.16
        "swiglu": arch.activation == "swiglu", "squared_relu": arch.activation == "squared_relu",
        "gated_linear_unit": arch.activation == "swiglu", "openai_gelu": False, "quick_geglu": False,
        "untie_embeddings_and_output_weights": not arch.tie_embeddings,
        "add_bias_linear": arch.add_bias_linear, "add_qkv_bias": arch.add_qkv_bias,
        "init_method_std": arch.init_method_std, "hidden_dropout": arch.hidden_dropout,
        "attention_dropout": arch.attention_dropout, "apply_query_key_layer_scaling": False,
        "window_size": None, "window_attn_skip_freq": None, "onnx_safe": None, "bert_binary_head": True,
        # features we do not build, at their (off) defaults
        "num_experts": None, "moe_layer_freq": 1, "moe_ffn_hidden_size": None, "moe_latent_size": None,
        "multi_latent_attention": False, "mtp_num_layers": None, "qk_layernorm": arch.qk_layernorm, "qk_l2_norm": False,
        "experimental_attention_variant": None, "heterogeneous_layers_config_path": None,
        "heterogeneous_layers_config_encoded_json": None, "is_hybrid_model": False,
        "hybrid_override_pattern": None, "hybrid_attention_ratio": 0.0, "hybrid_mlp_ratio": 0.0,
        "spec": None, "yaml_cfg": None, "use_legacy_models": False, "transformer_impl": "local",
        # vocabulary
        "vocab_size": arch.vocab_size, "padded_vocab_size": arch.padded_vocab_size(sizes["tp"]),
        "make_vocab_size_divisible_by": arch.make_vocab_size_divisible_by,
        "tokenizer_type": "NullTokenizer", "tokenizer_model": None, "vocab_file": None, "merge_file": None,
        "tiktoken_pattern": None,
        # parallel layout when saved
        "tensor_model_parallel_size": sizes["tp"], "pipeline_model_parallel_size": sizes["pp"],
        "virtual_pipeline_model_parallel_size": sizes["chunks"] if sizes["chunks"] > 1 else None,
        "num_layers_per_virtual_pipeline_stage": None, "expert_model_parallel_size": 1,
        "expert_tensor_parallel_size": sizes["tp"], "context_parallel_size": 1,
        "data_parallel_size": sizes["dp"], "world_size": sizes["world"], "rank": 0,
        "sequence_parallel": sizes["sequence_parallel"],
        "use_distributed_optimizer": sizes["distributed_optimizer"],
        "decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None,
        # checkpointing
        "ckpt_format": "torch_dist", "use_dist_ckpt": True, "auto_detect_ckpt_format": False,
        "ckpt_fully_parallel_save": True, "dist_ckpt_optim_fully_reshardable": False,
        "distrib_optim_fully_reshardable_mem_efficient": False, "no_save_optim": None, "no_save_rng": None,
        "data_parallel_random_init": False, "save": None, "load": None,
        # training progress and precision
        "iteration": 0, "consumed_train_samples": 0, "skipped_train_samples": 0, "consumed_valid_samples": 0,
        "train_iters": None, "train_samples": None, "global_batch_size": None, "micro_batch_size": None,
        "phase_transition_iterations": None, "seed": 1234, "fp16": False, "bf16": False,
        "params_dtype": torch.float32, "fp16_lm_cross_entropy": False,
    })
    values.update(extra)
    if values.get("tokenizer_type") == "NullTokenizer" and "vocab_size" not in extra:
        values["vocab_size"] = arch.vocab_size - 1  # its tokenizer adds the EOD as id vocab_size (see _vocab_from_args)
    return argparse.Namespace(**values)


def tokenizer_args(tokenizer) -> dict:
    """args fields naming our tokenizer record's files to Megatron-LM ({} when there is none)."""
    if isinstance(tokenizer, str):
        tokenizer = {"path": tokenizer}
    if not isinstance(tokenizer, dict) or not tokenizer.get("path"):
        return {}
    kind = tokenizer.get("type") or ("sentencepiece" if str(tokenizer["path"]).endswith(".model")
                                     else "huggingface")
    mlm_type = _TOKENIZER_TYPE_OUT.get(kind)
    return {"tokenizer_type": mlm_type, "tokenizer_model": str(tokenizer["path"])} if mlm_type else {}


def precision_args(params_dtype: Optional[str]) -> dict:
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(params_dtype), torch.float32)
    return {"params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


# ------------------------------------------------------------------------------------------ metadata
def has_sharded_key(directory: str, prefix: str) -> bool:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(directory).read_metadata().state_dict_metadata.keys()
    return any(k == prefix or k.startswith(prefix + ".") or k.startswith(prefix + "/") for k in keys)


def metadata_from_directory(directory: str, dir_name: Optional[str] = None) -> dict:
    """Our metadata dict (the shape of minitron.yaml) for a Megatron-LM checkpoint directory (torch_dist, or
    the legacy torch format: megatron_lm_torch.py)."""
    from . import megatron_lm_torch

    if megatron_lm_torch.is_torch_format_dir(directory):
        common = megatron_lm_torch.read_common(directory)
        return _metadata(common, directory, dir_name, has_optimizer=common.get("optimizer") is not None,
                         has_rng=common.get(RNG_KEY) is not None, backend=megatron_lm_torch.BACKEND,
                         layer_counts=megatron_lm_torch.layer_counts(directory, common["args"]))
    common = read_common(directory)
    if common.get("args") is None:
        raise ValueError(f"{os.path.join(directory, COMMON_FILE)} holds no `args`: it is a megatron-core dist "
                         f"checkpoint but not one written by Megatron-LM's training loop (a NeMo 2 `weights/` "
                         f"directory, for instance), so its architecture is unknown")
    # a never-stepped non-distributed optimizer has only its param groups (common.pt), no sharded state
    has_optimizer = "optimizer" in common or has_sharded_key(directory, "optimizer")
    return _metadata(common, directory, dir_name, has_optimizer=has_optimizer,
                     has_rng=has_sharded_key(directory, RNG_KEY), backend="torch_dist")


# Megatron-LM's arguments that split layers over pipeline stages other than evenly
_UNEVEN_SPLIT_ARGS = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                      "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                      "account_for_loss_in_pipeline_split")


def _metadata(common: dict, directory: str, dir_name: Optional[str], has_optimizer: bool, has_rng: bool,
              backend: str, layer_counts: Optional[list] = None) -> dict:
    """``layer_counts``: layers per stage and virtual chunk when known from the files (torch format); else the
    even split when the args split evenly, or None (unknown)."""
    args = common["args"]
    arch = arch_from_args(args)
    release = (dir_name or os.path.basename(os.path.normpath(directory))) == RELEASE_DIR
    sizes = {"tp": int(_get(args, "tensor_model_parallel_size", default=1)),
             "pp": int(_get(args, "pipeline_model_parallel_size", default=1))}
    chunks = int(_get(args, "virtual_pipeline_model_parallel_size", default=1) or 1)
    pp = sizes["pp"]
    per_stage = None
    uneven = pp > 1 and any(_get(args, name) for name in _UNEVEN_SPLIT_ARGS)
    if layer_counts is not None:
        per_stage = layer_counts
    elif arch.num_layers % (pp * chunks) == 0 and not uneven:
        per_stage = [[arch.num_layers // (pp * chunks)] * chunks for _ in range(pp)]
    content = common.get("content_metadata") or {}
    if has_optimizer:
        sharding = content.get("distrib_optim_sharding_type") or (
            "per_parameter" if not _get(args, "use_distributed_optimizer", default=False) else "unknown")
    else:
        sharding = None
    dtype = _get(args, "params_dtype")
    extra = common.get("extra") if isinstance(common.get("extra"), dict) else {}
    return {
        "format": FORMAT,
        "format_version": 1,
        "iteration": 0 if release and "iteration" not in common else int(common.get("iteration", 0)),
        "architecture": to_dict(arch),
        "parallel": {"tensor_model_parallel_size": sizes["tp"], "pipeline_model_parallel_size": pp,
                     "data_parallel_size": int(_get(args, "data_parallel_size", default=1)),
                     "world_size": int(_get(args, "world_size", default=sizes["tp"] * pp)),
                     "model_chunks": chunks, "layers_per_stage": per_stage},
        "contents": {"model": True, "optimizer": has_optimizer, "optimizer_sharding": sharding,
                     "scheduler": SCHEDULER_KEY in common, "rng": has_rng,
                     "extra_keys": sorted(str(k) for k in extra), "release": release,
                     "params_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
                     "backend": backend},
        "provenance": {"written_by": "Megatron-LM", "checkpoint_version": common.get("checkpoint_version")},
        "tokenizer": tokenizer_from_args(args),
    }


# ------------------------------------------------------------------------------------------ state parts
def content_metadata(optimizer_sharding: Optional[str]) -> dict:
    """What Megatron-LM records as ``content_metadata`` (and passes to sharded_state_dict) for our save."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if optimizer_sharding not in (None, "per_parameter"):
        metadata["distrib_optim_sharding_type"] = optimizer_sharding
        if optimizer_sharding == "fully_reshardable":
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    return metadata


def _cuda_rng_state_from_seed(seed: int):
    """A CUDA generator state (seed, Philox offset 0) for a save made where no GPU is: Megatron-LM's load
    calls torch.cuda.set_rng_state on it unconditionally."""
    import torch

    return torch.tensor(list(int(seed).to_bytes(8, "little")) + [0] * 8, dtype=torch.uint8)


def to_megatron_rng(state: dict) -> list:
    """Our collected RNG state as Megatron-LM's list of one dict (its get_rng_state without
    --data-parallel-random-init)."""
    import torch

    cuda = state.get("cuda")
    if cuda is None:
        cuda = _cuda_rng_state_from_seed(torch.initial_seed())
    return [{"random_rng_state": state["random"], "np_rng_state": state["numpy"],
             "torch_rng_state": state["torch"], "cuda_rng_state": cuda,
             "rng_tracker_states": dict(state["tracker"])}]


def from_megatron_rng(states) -> dict:
    """Megatron-LM's RNG list (entry 0: DP rank 0's, which every DP rank restores) as our dict."""
    entry = states[0] if isinstance(states, (list, tuple)) else states
    return {"random": entry["random_rng_state"], "numpy": entry["np_rng_state"],
            "torch": entry["torch_rng_state"], "cuda": entry.get("cuda_rng_state"),
            "tracker": dict(entry.get("rng_tracker_states") or {})}


def rng_sharded_object(states: list):
    """The ShardedObject layout of Megatron-LM's get_rng_state: one object per (PP, TP) rank, DP replicas."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        RNG_KEY, states,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


_SCHEDULER_STEP_FIELDS = ("num_steps", "lr_warmup_steps", "lr_decay_steps", "wd_incr_steps")


def scheduler_to_megatron_lm(state: dict, global_batch_size: Optional[int]) -> dict:
    """Our OptimizerParamScheduler state (steps = iterations) in Megatron-LM's units: it steps its scheduler
    by the samples of each iteration (lr_warmup_steps = lr_warmup_iters x global_batch_size, ...) and checks
    the saved values against its own on load. Unchanged when the global batch size is not known."""
    if not global_batch_size:
        return state
    return {k: (v * global_batch_size if k in _SCHEDULER_STEP_FIELDS and v is not None else v)
            for k, v in state.items()}


def scheduler_from_megatron_lm(state: dict, args) -> dict:
    """A Megatron-LM scheduler state (samples) in our units (iterations), by args.global_batch_size."""
    gbs = _get(args, "global_batch_size")
    if not gbs:
        return state
    return {k: (v / gbs if k in _SCHEDULER_STEP_FIELDS and v is not None else v) for k, v in state.items()}


def training_args(cfg) -> dict:
    """Megatron-LM's names for a training config's batch, schedule and seed (for the saved ``args``; the
    scheduler state is converted to its units with global_batch_size)."""
    t, d = cfg.train, cfg.data
    return {"global_batch_size": d.global_batch_size, "micro_batch_size": d.micro_batch_size,
            "train_iters": t.train_iters, "lr": t.lr, "min_lr": t.min_lr, "lr_warmup_iters": t.lr_warmup_iters,
            "lr_decay_iters": t.lr_decay_iters or t.train_iters, "lr_decay_style": t.lr_decay_style,
            "weight_decay": t.weight_decay, "start_weight_decay": t.weight_decay,
            "end_weight_decay": t.weight_decay, "weight_decay_incr_style": "constant",
            "adam_beta1": t.adam_beta1, "adam_beta2": t.adam_beta2, "adam_eps": t.adam_eps,
            "clip_grad": t.clip_grad, "seed": t.seed, "save_interval": t.save_interval or None}


def output_dir_name(iteration: int, has_optimizer: bool) -> str:
    """Where a save into a Megatron-LM ROOT goes. Weights without optimizer state are a `release`
    checkpoint: Megatron-LM loads a numbered iteration only together with its optimizer state (else it
    stops unless given --finetune / --no-load-optim), a release with no flags (iteration 0, fresh
    optimizer, scheduler and RNG: how it starts a run from pretrained weights)."""
    if not has_optimizer:
        return RELEASE_DIR
    return f"iter_{int(iteration):07d}"

