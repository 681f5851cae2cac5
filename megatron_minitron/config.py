"""Typed configuration: dataclasses loadable from YAML, overridable with ``a.b=value``.

Every job (train, prune, distill, eval, search) takes one of these; ``validate()`` runs before any work
so that a bad value fails in a second with a message that says how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

ACTIVATIONS = ("swiglu", "squared_relu", "gelu")
NORMS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "yarn", "longrope", "learned_absolute", "none")
ROTARY_EMBEDDINGS = ("rope", "yarn", "longrope")  # the position_embedding values that rotate q and k


@dataclass
class ModelArch:
    """A GPT architecture. Names follow megatron-core's TransformerConfig where one exists."""

    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA groups; None = multi-head (one group per head)
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    vocab_size: int = 1024
    seq_length: int = 128
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = False  # Nemotron stores gamma - 1
    activation: str = "swiglu"
    position_embedding: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling: bool = False  # Llama-3.1 style frequency scaling
    rope_scaling_factor: float = 8.0
    # YaRN context extension (position_embedding="yarn"): megatron-core's YarnRotaryEmbedding, which reads these
    # names off the TransformerConfig; HF rope_type "yarn" (Qwen3 / Qwen2.5 long context). Concentration
    # (the factor on cos and sin): get_mscale(f, yarn_mscale) / get_mscale(f, yarn_mscale_all_dim) when both
    # are set, else 0.1 ln f + 1
    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True  # HF's rope "truncate"
    # LongRoPE (position_embedding="longrope", Phi-3 / Phi-4-mini; model/longrope.py): each rotary frequency
    # divided by a factor, the short list's up to the original context, the long list's beyond; cos and sin
    # times the attention factor
    longrope_short_factor: Optional[list] = None
    longrope_long_factor: Optional[list] = None
    longrope_original_max_position_embeddings: int = 4096
    longrope_attention_factor: float = 1.0
    tie_embeddings: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False  # Qwen2: bias on QKV only
    qk_layernorm: bool = False  # Qwen3: a norm (``normalization``) over each query and key head, before RoPE
    # per layer, 1 = that layer's attention skips RoPE (NoPE; SmolLM3 every 4th layer); None = every layer rotates
    no_rope_freq: Optional[list] = None
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # `padded_vocab_size` is what the embedding holds; vocab_size is the tokenizer's. Kept equal unless
    # the tokenizer's size does not divide by TP (megatron pads to a multiple of 128 * TP by default).
    make_vocab_size_divisible_by: int = 128

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def num_parameters(self, tp: int = 1, include_embeddings: bool = True) -> int:
        """Exact parameter count of the megatron GPTModel this builds (independent of TP sharding; ``tp`` only
        pads the vocab). Summed over ``model/params.py``'s tensor table, the one list of what the model holds."""
        from .model.params import model_parameters  # function-local: model/ imports config, not the reverse

        return model_parameters(self, tp, include_embeddings)

    def validate(self) -> None:
        positive = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                    "seq_length"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r}: choose one of {ACTIVATIONS}")
        if self.normalization not in NORMS:
            raise ValueError(f"model.normalization={self.normalization!r}: choose one of {NORMS}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"model.position_embedding={self.position_embedding!r}: choose one of {POSITION_EMBEDDINGS}")
        if self.position_embedding == "yarn":
            self._validate_yarn()
        if self.position_embedding == "longrope":
            self._validate_longrope()
        for kind in ("yarn", "longrope"):
            stray = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                     if f.name.startswith(kind + "_") and getattr(self, f.name) != f.default]
            if stray and self.position_embedding != kind:
                raise ValueError(f"model.{', model.'.join(stray)} only apply with model.position_embedding={kind} "
                                 f"(it is {self.position_embedding!r}); set it, or drop them")
        if self.no_rope_freq is not None:
            self._validate_no_rope()
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.query_groups}: every query group needs the same number "
                "of heads")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set model.kv_channels (head dim) explicitly")

    def _validate_no_rope(self) -> None:
        flags = self.no_rope_freq
        if not isinstance(flags, list) or len(flags) != self.num_layers or any(
                isinstance(x, bool) or x not in (0, 1) for x in flags):
            raise ValueError(f"model.no_rope_freq must list one 0 / 1 per layer ({self.num_layers}; 1 = the layer "
                             f"skips RoPE), got {flags!r}")
        if self.position_embedding not in ROTARY_EMBEDDINGS:
            raise ValueError(f"model.no_rope_freq with model.position_embedding={self.position_embedding!r}: only "
                             f"a rotary model ({', '.join(ROTARY_EMBEDDINGS)}) has RoPE to skip")

    def _validate_longrope(self) -> None:
        if self.rope_scaling:
            raise ValueError("model.position_embedding=longrope with model.rope_scaling=true: choose one")
        pairs = int(self.head_dim * self.rotary_percent) // 2
        for name in ("longrope_short_factor", "longrope_long_factor"):
            factors = getattr(self, name)
            if not isinstance(factors, list) or len(factors) != pairs \
                    or not all(isinstance(x, (int, float)) and x > 0 for x in factors):
                raise ValueError(f"model.{name} must list {pairs} positive numbers (one per rotary frequency: "
                                 f"head dim {self.head_dim} x rotary_percent {self.rotary_percent} / 2), got "
                                 f"{factors if not isinstance(factors, list) else f'{len(factors)} values'}")
        if self.longrope_original_max_position_embeddings <= 0 or self.longrope_attention_factor <= 0:
            raise ValueError("model.longrope_original_max_position_embeddings and model.longrope_attention_factor "
                             "must be positive")

    def _validate_yarn(self) -> None:
        if self.rope_scaling:
            raise ValueError("model.position_embedding=yarn with model.rope_scaling=true: choose one (YaRN, or "
                             "Llama-3.1's frequency scaling with position_embedding=rope)")
        if self.rotary_percent != 1.0:
            raise ValueError(f"model.position_embedding=yarn with model.rotary_percent={self.rotary_percent}: "
                             "megatron-core's YaRN rotates the whole head dim; set rotary_percent=1")
        if self.yarn_rotary_scaling_factor < 1.0:
            raise ValueError(f"model.yarn_rotary_scaling_factor={self.yarn_rotary_scaling_factor}: YaRN "
                             "stretches the context by this factor, which must be >= 1")
        if self.yarn_original_max_position_embeddings <= 0:
            raise ValueError("model.yarn_original_max_position_embeddings must be positive (the context the "
                             "model was pretrained with before YaRN)")
        if self.yarn_beta_fast < self.yarn_beta_slow:
            raise ValueError(f"model.yarn_beta_fast={self.yarn_beta_fast} < yarn_beta_slow={self.yarn_beta_slow}:"
                             " the fast boundary (rotations) must be at least the slow one (defaults 32 and 1)")
        if (self.yarn_mscale is None) != (self.yarn_mscale_all_dim is None):
            raise ValueError("model.yarn_mscale and model.yarn_mscale_all_dim are used together (megatron-core "
                             "ignores one without the other): set both, or neither for 0.1 ln(factor) + 1")


@dataclass
class Parallel:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Layers per pipeline stage, e.g. [3, 5]; None = even split (then PP must divide num_layers).
    pipeline_split: Optional[list] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True

    def validate(self, arch: ModelArch, world_size: Optional[int] = None) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel sizes must be >= 1, got TP={tp} PP={pp}")
        for what, n in (("model.num_attention_heads", arch.num_attention_heads),
                        ("model.num_query_groups", arch.query_groups),
                        ("model.ffn_hidden_size", arch.ffn_hidden_size)):
            if n % tp:
                raise ValueError(
                    f"{what}={n} is not divisible by tensor_model_parallel_size={tp}; "
                    f"pick a TP that divides it")
        if self.pipeline_split is not None:
            split = list(self.pipeline_split)
            if len(split) != pp:
                raise ValueError(f"parallel.pipeline_split={split} has {len(split)} stages, "
                                 f"but pipeline_model_parallel_size={pp}")
            if sum(split) != arch.num_layers or min(split) < 1:
                raise ValueError(f"parallel.pipeline_split={split} must be positive and sum to "
                                 f"model.num_layers={arch.num_layers}")
        elif arch.num_layers % pp:
            raise ValueError(
                f"model.num_layers={arch.num_layers} is not divisible by pipeline_model_parallel_size="
                f"{pp}; choose another PP or give parallel.pipeline_split (layers per stage)")
        if self.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
        if world_size is not None and world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by TP*PP={tp * pp}; launch a "
                             f"multiple of {tp * pp} processes")

    def layers_per_stage(self, num_layers: int) -> list:
        if self.pipeline_split is not None:
            return list(self.pipeline_split)
        return [num_layers // self.pipeline_model_parallel_size] * self.pipeline_model_parallel_size


@dataclass
class Data:
    # Blend: a list of prefixes, or alternating [weight, prefix, weight, prefix, ...] as in Megatron-LM.
    train_data: list = field(default_factory=list)
    valid_data: Optional[list] = None  # None = take a split of train_data
    split: str = "98,2,0"
    tokenizer_type: str = "sentencepiece"  # sentencepiece | huggingface | null
    tokenizer_path: Optional[str] = None
    micro_batch_size: int = 2
    global_batch_size: int = 8
    num_workers: int = 0
    cache_dir: Optional[str] = None
    seed: int = 1234

    def validate(self, dp_size: int = 1) -> None:
        if self.micro_batch_size < 1:
            raise ValueError("data.micro_batch_size must be >= 1")
        if self.global_batch_size % (self.micro_batch_size * dp_size):
            raise ValueError(
                f"data.global_batch_size={self.global_batch_size} must be a multiple of micro_batch_size"
                f" x data-parallel size = {self.micro_batch_size} x {dp_size}")
        for prefix in self.train_data:
            if isinstance(prefix, str) and not os.path.exists(prefix + ".bin"):
                raise FileNotFoundError(
                    f"data.train_data: {prefix}.bin not found; run `minitron preprocess` to build it")


@dataclass
class Train:
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 10
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_decay_iters: Optional[int] = None  # None = train_iters
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 50
    eval_iters: int = 5
    log_interval: int = 10
    save: Optional[str] = None  # checkpoint root directory
    save_interval: int = 0  # 0 = only at the end
    keep_last: int = 2
    # Checkpoint layout of `save`: minitron, or megatron-lm (Megatron-LM's own: its tracker file, `args` in
    # common.pt; Megatron-LM resumes from it). See docs/checkpoints.md.
    save_format: str = "minitron"
    # Initial weights (weights only: iteration, optimizer and data position start fresh), e.g. the teacher
    # for teacher correction. A run always resumes from `save` instead when that holds a checkpoint.
    load: Optional[str] = None
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    attention_backend: str = "auto"  # auto | sdpa | unfused | te
    transformer_engine: bool = False  # use TE's layer spec when importable
    recompute: bool = False  # full activation recomputation
    # RMSNorm through our fused Triton kernels (local spec, CUDA only; elsewhere the torch path runs).
    # Off until measured on a GPU: benchmarks/bench_train.py --fused-kernels compares the two.
    fused_kernels: bool = False
    # torch's fused Adam (one kernel per param group) for the torch AdamW megatron-core uses without Apex / TE
    # (with them, their FusedAdam runs and this changes nothing). Off until measured on a GPU:
    # benchmarks/bench_train.py --fused-adam compares the two.
    fused_adam: bool = False
    # FP8 training of the trained model through Transformer Engine (needs transformer_engine=true):
    # e4m3 | hybrid (e4m3 forward, e5m2 gradients); recipe "delayed" = TE's delayed scaling.
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    exit_interval: Optional[int] = None  # stop (and save) after this many iterations in this run
    wandb: bool = False
    wandb_project: str = "megatron-minitron"
    wandb_mode: str = "offline"
    progress_bar: bool = True

    def validate(self) -> None:
        if self.train_iters < 0:
            raise ValueError("train.train_iters must be >= 0")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.lr_decay_style={self.lr_decay_style!r}: cosine, linear or constant")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is larger than train.lr={self.lr}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision={self.precision!r}: auto, bf16 or fp32")
        if self.attention_backend not in ("auto", "sdpa", "unfused", "te"):
            raise ValueError(f"train.attention_backend={self.attention_backend!r}: auto, sdpa, unfused or te")
        if self.fp8 is not None:
            if self.fp8 not in ("e4m3", "hybrid"):
                raise ValueError(f"train.fp8={self.fp8!r}: e4m3 or hybrid (or null for no FP8)")
            if not self.transformer_engine:
                raise ValueError("train.fp8 runs through Transformer Engine: set train.transformer_engine=true "
                                 "(in an NGC container, where TE is installed)")
            if self.fp8_recipe not in ("delayed", "tensorwise", "mxfp8", "blockwise"):
                raise ValueError(f"train.fp8_recipe={self.fp8_recipe!r}: delayed, tensorwise, mxfp8 or blockwise")
            if self.fp8_amax_compute_algo not in ("max", "most_recent"):
                raise ValueError("train.fp8_amax_compute_algo: max or most_recent")
        if self.keep_last < 1:
            raise ValueError("train.keep_last must be >= 1 (the newest checkpoint is always kept)")
        if self.save_format not in ("minitron", "megatron-lm"):
            raise ValueError(f"train.save_format={self.save_format!r}: minitron or megatron-lm")
        if not isinstance(self.fused_kernels, bool):
            raise ValueError(f"train.fused_kernels={self.fused_kernels!r}: true or false")
        if not isinstance(self.fused_adam, bool):
            raise ValueError(f"train.fused_adam={self.fused_adam!r}: true or false")


@dataclass
class TrainConfig:
    model: ModelArch = field(default_factory=ModelArch)
    parallel: Parallel = field(default_factory=Parallel)
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)

    def validate(self, world_size: Optional[int] = None) -> None:
        self.model.validate()
        self.parallel.validate(self.model, world_size)
        self.train.validate()
        dp = 1
        if world_size is not None:
            dp = world_size // (self.parallel.tensor_model_parallel_size
                                * self.parallel.pipeline_model_parallel_size)
        self.data.validate(dp)


# ---------------------------------------------------------------------------------------------------
# YAML and command-line overrides, for any of the dataclasses above (and those of later jobs).

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, data: Optional[dict], where: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys (typos) with their path."""
    data = dict(data or {})
    hints = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data.pop(f.name)
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            value = from_dict(ftype, value, f"{where}{f.name}.")
        else:
            value = _coerce(value, ftype, f"{where}{f.name}")
        kwargs[f.name] = value
    if data:
        names = [f.name for f in dataclasses.fields(cls)]
        guesses = []
        for key in data:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            if close:
                guesses.append(f"{where}{key} -> {where}{close[0]}")
        hint = f"; did you mean {', '.join(guesses)}?" if guesses else ""
        raise ValueError(f"unknown config key(s) {', '.join(where + str(k) for k in data)}{hint} "
                         f"(known here: {', '.join(names)})")
    obj = cls(**kwargs)
    # which fields the YAML / overrides set (not a dataclass field: asdict and dumps leave it out); jobs whose
    # architecture comes from a checkpoint tell a value the user gave from a default by it
    object.__setattr__(obj, _GIVEN_ATTR, frozenset(kwargs))
    return obj


_GIVEN_ATTR = "_given_fields"


def given_fields(obj) -> frozenset:
    """Names of the fields of dataclass ``obj`` that the user gave: those its YAML / overrides set when
    ``from_dict`` built it, else (built in code) those that differ from the class defaults."""
    recorded = getattr(obj, _GIVEN_ATTR, None)
    if recorded is not None:
        return recorded
    default = type(obj)()
    return frozenset(f.name for f in dataclasses.fields(obj) if getattr(obj, f.name) != getattr(default, f.name))


def _coerce(value: Any, ftype, name: str):
    origin = typing.get_origin(ftype)
    args = [a for a in typing.get_args(ftype) if a is not type(None)]
    if origin is typing.Union:
        if value is None:
            return None
        ftype = args[0]
        origin = typing.get_origin(ftype)
    if value is None:
        return None
    if ftype is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if ftype in (int, float):
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if ftype is int and float(value) != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return ftype(value)
    if ftype is str:
        return str(value)
    if ftype is list or origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return list(value)
    if ftype is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return value
    return value


def apply_overrides(data: dict, overrides: list) -> dict:
    """Apply ``section.key=value`` strings (value parsed as YAML) onto a nested dict."""
    data = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        path, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        keys = path.strip().lstrip("-").split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def load_yaml(path: Optional[str]) -> dict:
    if not path:
        return {}
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


# The command-line face of load_config, shared by train, distill, search and plan: `CONFIG [k=v ...]`.
def add_config_args(parser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (optional; defaults otherwise)")
    parser.add_argument("overrides", nargs="*", help="overrides such as train.lr=1e-4 data.micro_batch_size=4")


def split_config_args(args) -> tuple:
    """A first positional that looks like an override is one (so CONFIG can be left out)."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config] + overrides
    return config, overrides


def load_config(cls, path: Optional[str] = None, overrides: Optional[list] = None):
    """YAML file (optional) + overrides -> dataclass ``cls`` (not yet validated)."""
    return from_dict(cls, apply_overrides(load_yaml(path), overrides or []))


def dump_yaml(cfg, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
