"""Tiny random-weight transformers models of each supported family (no downloads), shared by the HF
conversion tests (unit and distributed workers)."""
from __future__ import annotations

import torch

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.1)  # large enough weights that a mapping mistake moves logits by >> 1e-4

PHI_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi3 / SmolLM3 configs' defaults exceed VOCAB

# name -> (transformers config class name, config kwargs)
CASES = {
    "llama": ("LlamaConfig", dict(COMMON, rms_norm_eps=1e-5, rope_theta=10000.0)),
    "llama_tied": ("LlamaConfig", dict(COMMON, tie_word_embeddings=True, rope_theta=500000.0)),
    "llama31": ("LlamaConfig", dict(COMMON | {"max_position_embeddings": 131072}, rope_theta=500000.0,
                                    rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
    "mistral_nemo": ("MistralConfig", dict(COMMON, head_dim=16, sliding_window=None,
                                           rope_theta=1000000.0)),  # 4 x 16 != 32
    "qwen2": ("Qwen2Config", dict(COMMON, tie_word_embeddings=True, rope_theta=1000000.0)),
    # Qwen3-4B's quirks: head_dim != hidden / heads (here 16 vs 8), tied embeddings, per-head q/k norms
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=16, tie_word_embeddings=True, rope_theta=1000000.0,
                                  rms_norm_eps=1e-6)),
    # YaRN as Qwen's model cards tell users to extend Qwen3's context (factor 4 over the pretrained window)
    "qwen3_yarn": ("Qwen3Config", dict(COMMON, head_dim=16, rms_norm_eps=1e-6, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 16})),
    # every other YaRN knob transformers reads: an explicit attention factor, betas, no truncation
    "llama_yarn": ("LlamaConfig", dict(COMMON, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "attention_factor": 1.3,
        "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}, rope_theta=10000.0)),
    # Phi-4's layout (fused qkv_proj / gate_up_proj), and Phi-4-mini's: RoPE on 3/4 of the head dim, tied
    "phi3": ("Phi3Config", dict(COMMON, rms_norm_eps=1e-5, rope_theta=250000.0, sliding_window=None, **PHI_IDS)),
    "phi3_partial_tied": ("Phi3Config", dict(COMMON, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
                                             partial_rotary_factor=0.75, tie_word_embeddings=True, **PHI_IDS)),
    # Phi-3.5-mini / Phi-4-mini's LongRoPE: per-frequency factors, short up to 16 positions, long beyond (head
    # dim 8 x 0.75 -> 3 frequencies), attention factor sqrt(1 + ln(64 / 16) / ln 16)
    "phi3_longrope": ("Phi3Config", dict(COMMON, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
                                         partial_rotary_factor=0.75, original_max_position_embeddings=16,
                                         rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 2.1],
                                                       "long_factor": [1.5, 3.0, 7.0]}, **PHI_IDS)),
    # SmolLM3: layer 1 of 2 skips RoPE (no_rope_layer_interval=2; the released models: every 4th layer)
    "smollm3": ("SmolLM3Config", dict(COMMON, rms_norm_eps=1e-6, rope_theta=2000000.0, no_rope_layer_interval=2,
                                      **PHI_IDS)),
    # Arcee AFM: llama attention with a non-gated squared-ReLU MLP; YaRN as AFM-4.5B extends its context
    "arcee": ("ArceeConfig", dict(COMMON, rms_norm_eps=1e-5, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32},
        **PHI_IDS)),
    "nemotron": ("NemotronConfig", dict(COMMON, num_key_value_heads=4, partial_rotary_factor=0.5,
                                        norm_eps=1e-5, rope_theta=10000.0)),
}


def build_hf_model(case: str, seed: int = 0):
    """A transformers CausalLM of family ``case`` with random weights, fp32, eval, sdpa-free (eager)."""
    import transformers

    cls_name, kwargs = CASES[case]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random norms and biases too (HF initialises them to constants)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def sample_tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's vocab-parallel logits [b, s, V/TP] of a last-stage megatron model."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()


def convert_in_memory(hf_model, tp: int = 1, pp: int = 1):
    """(arch, family, this rank's megatron stage) holding ``hf_model``'s weights; needs init_distributed."""
    from megatron_minitron.config import Parallel
    from megatron_minitron.hf import arch_from_hf_config, dict_reader, load_hf_weights
    from megatron_minitron.hf.fused import FusedView
    from megatron_minitron.model.builder import build_gpt

    arch, family = arch_from_hf_config(hf_model.config.to_dict())
    model = build_gpt(arch, Parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                      attention_backend="sdpa").eval()
    state = hf_model.state_dict()
    load_hf_weights(model, arch, FusedView(dict_reader(state), state, arch, family).read)
    return arch, family, model
