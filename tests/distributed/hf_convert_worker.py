"""2 ranks: for every tiny HF family, at TP2 and at PP2, each rank loads its own shards lazily from the
safetensors files, the gathered logits match transformers, and the export is bit-identical to the source.
Then the CLI path under torchrun: HF -> dist checkpoint at one layout -> HF at the other (fp32 and bf16).

``check_tp2_pp2`` does the same for qwen3 at TP2 x PP2; train_equivalence_worker.py, a 4-rank launch, calls it
(the CLI runs on exactly TP x PP processes, so this 2-rank launch cannot).

Usage: torchrun --nproc-per-node=2 hf_convert_worker.py WORK_DIR
"""
import os
import sys

import torch
import torch.distributed as dist

from megatron_minitron.config import Parallel
from megatron_minitron.hf import (FusedView, SafetensorsReader, arch_from_hf_config, check_hf_names,
                                  export_hf_weights, load_hf_weights, read_hf_config)
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.runtime.distributed import destroy, init_distributed
from tests.hf_tiny_models import CASES, build_hf_model, hf_logits, sample_tokens
from tests.helpers import full_logits

# (case, dtype, the layout hf_to_mcore saves at, the layout mcore_to_hf loads at); qwen3's q/k norms are
# replicated over TP ranks, so they go from two copies to one
CLI_CASES = (("nemotron", "fp32", (2, 1), (1, 2)),
             ("qwen2", "fp32", (1, 2), (2, 1)),
             ("qwen3", "fp32", (2, 1), (1, 2)),
             ("phi3_partial_tied", "fp32", (1, 2), (2, 1)),  # fused qkv_proj / gate_up_proj files
             ("llama", "bf16", (1, 2), (2, 1)))


class CountingReader:
    """Counts the elements a rank reads, to show that it reads only its own shards."""

    def __init__(self, path):
        self.inner = SafetensorsReader(path)
        self.elements = 0

    def read(self, name, rows=None, cols=None):
        t = self.inner.read(name, rows=rows, cols=cols)
        self.elements += t.numel()
        return t


def check_case(case, tp, pp, work, hf_model, tokens, reference_logits):
    src = os.path.join(work, "src", case)
    arch, family = arch_from_hf_config(read_hf_config(src))
    reader = CountingReader(src)
    view = FusedView(reader.read, reader.inner.names(), arch, family)  # phi3: row ranges of the fused tensors
    check_hf_names(view.names(), arch, src)
    model = build_gpt(arch, Parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                      attention_backend="sdpa").eval()
    load_hf_weights(model, arch, view.read)
    local_elements = sum(p.numel() for p in model.parameters())
    assert reader.elements == local_elements, (case, reader.elements, local_elements)

    logits = full_logits(model, tokens)
    if logits is not None:
        diff = (logits.float() - reference_logits).abs().max().item()
        assert diff < 1e-4, (case, tp, pp, diff)
        print(f"DIFF {case} tp{tp} pp{pp} {diff:.2e}", flush=True)

    out = os.path.join(work, f"out_tp{tp}_pp{pp}", case)
    export_hf_weights(model, arch, out, max_shard_bytes=30_000, family=family)
    if dist.get_rank() == 0:
        back = SafetensorsReader(out)
        expected = hf_model.state_dict()
        if arch.tie_embeddings:
            expected.pop("lm_head.weight", None)
        assert sorted(back.names()) == sorted(expected), (case, sorted(set(back.names()) ^ set(expected)))
        for name, tensor in expected.items():
            assert torch.equal(back.read(name), tensor), (case, tp, pp, name)
    dist.barrier()
    return local_elements


def save_sources(work, cases):
    """The tiny HF models of ``cases`` (saved by rank 0 in several safetensors shards) and their logits."""
    tokens = sample_tokens()
    models = {case: build_hf_model(case) for case in sorted(cases)}
    references = {case: hf_logits(m, tokens) for case, m in models.items()}
    if dist.get_rank() == 0:
        for case, m in models.items():
            m.save_pretrained(os.path.join(work, "src", case), max_shard_size="40KB")
    dist.barrier()
    return tokens, models, references


def cli_round_trip(work, case, dtype, save_at, load_at, hf_model):
    from megatron_minitron.hf.cli import hf_to_mcore, mcore_to_hf

    src = os.path.join(work, "src", case)
    tag = f"{case}_tp{save_at[0]}pp{save_at[1]}_tp{load_at[0]}pp{load_at[1]}"
    ckpt, out = os.path.join(work, "ckpt", tag), os.path.join(work, "cli_out", tag)
    hf_to_mcore(src, ckpt, *save_at, dtype=dtype)
    mcore_to_hf(ckpt, out, *load_at)
    if dist.get_rank() == 0:
        back = SafetensorsReader(out)
        expected = hf_model.state_dict()
        if hf_model.config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        assert sorted(back.names()) == sorted(expected), case
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        for name, tensor in expected.items():
            assert torch.equal(back.read(name), tensor.to(torch_dtype)), (case, name)
    dist.barrier()
    print(f"rank {dist.get_rank()} CLI {case} {dtype} TP{save_at[0]}PP{save_at[1]} -> "
          f"TP{load_at[0]}PP{load_at[1]} OK", flush=True)


def check_tp2_pp2(work, cases=("qwen3",)):
    """On 4 ranks: lazy load at TP2 x PP2, logits vs transformers, export, and the CLI at TP2 x PP2 both ways."""
    assert dist.get_world_size() == 4, dist.get_world_size()
    init_distributed(2, 2)
    tokens, models, references = save_sources(work, cases)
    for case in sorted(cases):
        n = check_case(case, 2, 2, work, models[case], tokens, references[case])
        print(f"rank {dist.get_rank()} TP2 PP2 {case}: read {n} elements, logits and export OK", flush=True)
        cli_round_trip(work, case, "fp32", (2, 2), (2, 2), models[case])


def main():
    work = sys.argv[1]
    init_distributed(2, 1)
    rank = dist.get_rank()
    tokens, models, references = save_sources(work, CASES)

    for tp, pp in ((2, 1), (1, 2)):
        init_distributed(tp, pp)
        for case in sorted(CASES):
            n = check_case(case, tp, pp, work, models[case], tokens, references[case])
            print(f"rank {rank} TP{tp} PP{pp} {case}: read {n} elements, logits and export OK", flush=True)

    for case, dtype, save_at, load_at in CLI_CASES:
        cli_round_trip(work, case, dtype, save_at, load_at, models[case])
    destroy()


if __name__ == "__main__":
    main()
