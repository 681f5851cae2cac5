"""Hugging Face <-> megatron-core conversion (Llama 2/3/3.1, Mistral / Mistral-NeMo, Qwen2, Qwen3, Phi-3 / Phi-4,
SmolLM3, Arcee AFM, Nemotron).

Layers:
- ``families``: config.json <-> ``ModelArch`` (pure); ``rope``: its rope settings (Llama-3.x, YaRN, LongRoPE).
- ``mapping``: which HF tensors make each megatron parameter; cutting one TP shard; merging shards (pure).
- ``fused``: the families whose files fuse some of those tensors (Phi-3's qkv_proj, gate_up_proj).
- ``io``: lazy safetensors reading, sharded writing, tokenizer files.
- ``convert``: fill / export a built, sharded megatron model on any TP x PP layout (collective).
- ``cli``: ``minitron convert hf-to-mcore | mcore-to-hf``.
"""
from .convert import export_hf_weights, load_hf_weights, stage_layout
from .families import (SUPPORTED_FAMILIES, arch_from_hf_config, check_arch_exportable, detect_family,
                       family_for_arch, hf_config_from_arch)
from .fused import FusedView, fuse
from .io import (TOKENIZER_FILES, SafetensorsReader, copy_tokenizer_files, read_hf_config,
                 write_hf_config)
from .mapping import (ParamSpec, check_hf_names, dict_reader, hf_tensors, hf_to_megatron, interleave_qkv,
                      megatron_shard, megatron_to_hf, param_specs, split_qkv)

__all__ = [
    "SUPPORTED_FAMILIES", "TOKENIZER_FILES", "FusedView", "ParamSpec", "SafetensorsReader", "arch_from_hf_config",
    "check_arch_exportable", "check_hf_names", "copy_tokenizer_files", "detect_family", "dict_reader",
    "export_hf_weights", "family_for_arch", "fuse", "hf_config_from_arch", "hf_tensors", "hf_to_megatron",
    "interleave_qkv", "load_hf_weights", "megatron_shard", "megatron_to_hf", "param_specs",
    "read_hf_config", "split_qkv", "stage_layout", "write_hf_config",
]
