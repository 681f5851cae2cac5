"""4 ranks: importance scores, plans, pruned tensors and pruned logits are the same at TP1PP1 (DP4), TP2PP1
(DP2), TP1PP2 (DP2) and TP2PP2 (DP1). Source weights are made identical across layouts by saving a TP1PP1
model with megatron's dist-checkpointing and loading it at each layout; the calibration samples are split
over DP ranks, so every layout sees the same samples in total. The model has Qwen3's per-head q/k layernorms and
a head dim (12) that is not hidden / heads (8): those norms are replicated on every TP rank and no pruning
dimension cuts them, so each kept layer's pruned q/k norms are its source ones."""
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune import (ImportanceSettings, PruneTargets, estimate_importance, make_plan,
                                     prune_model_state)
from megatron_minitron.runtime.distributed import init_distributed, set_seed

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from helpers import full_logits, load_state, save_state  # noqa: E402

ARCH = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                 kv_channels=12, qk_layernorm=True, vocab_size=256, seq_length=16)
QK_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
SETTINGS = ImportanceSettings(depth_metrics=["bi", "lm_loss"], block_sizes=[2])
TARGETS = PruneTargets(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=2,
                       num_layers=3)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def calibration():
    g = torch.Generator().manual_seed(11)
    text = torch.randint(0, ARCH.vocab_size, (4, 2, ARCH.seq_length + 1), generator=g)  # 4 batches of 2
    return [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in text]


def flat(scores):
    parts = [scores.heads, scores.groups, scores.neurons, scores.hidden]
    parts += [scores.layers[m] for m in sorted(scores.layers)]
    parts += [scores.blocks[m][k] for m in sorted(scores.blocks) for k in sorted(scores.blocks[m])]
    return torch.cat([p.reshape(-1).double() for p in parts])


def check(cond, msg):
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {msg}")


def main():
    from megatron.core import parallel_state as ps

    root = sys.argv[1]
    rank0 = lambda *a: dist.get_rank() == 0 and print(*a, flush=True)  # noqa: E731
    init_distributed(1, 1)
    set_seed(7)
    source = build_gpt(ARCH, Parallel())
    with torch.no_grad():  # non-trivial norm weights, so that hidden-channel trimming of norms matters
        for p in source.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    save_state([source], os.path.join(root, "init"))
    probe = calibration()[0]["tokens"]
    ref_scores = ref_plan = ref_logits = None
    for tp, pp in LAYOUTS:
        tag = f"tp{tp}pp{pp}"
        init_distributed(tp, pp)
        par = Parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        model = build_gpt(ARCH, par)
        load_state([model], os.path.join(root, "init"))
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        scores = estimate_importance([model], calibration()[dp_rank::dp], SETTINGS)
        vec = flat(scores)
        # identical on every rank of this layout (bitwise) ...
        everyone = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, vec)
        check(all(torch.equal(v, vec) for v in everyone), f"{tag}: ranks hold different scores")
        check(scores.num_samples == 8, f"{tag}: saw {scores.num_samples} samples, want 8")
        # ... and equal to the TP1PP1 scores up to float summation order
        if ref_scores is None:
            ref_scores = vec
        diff = ((vec - ref_scores).abs() / ref_scores.abs().clamp(min=1e-3)).max().item()
        check(diff < 1e-4, f"{tag}: scores differ from TP1PP1 by {diff:.2e} (relative)")
        plan = make_plan(scores, ARCH, TARGETS, tp=2)
        if ref_plan is None:
            ref_plan = plan.to_dict()
            check(any(plan.head_merge), "the test plan should merge heads")
        check(plan.to_dict() == ref_plan, f"{tag}: plan differs from TP1PP1")
        state = prune_model_state(model, plan)
        split = plan.target_pipeline_split(par.layers_per_stage(ARCH.num_layers)) if pp > 1 else None
        target_par = dataclasses.replace(par, pipeline_split=split)
        pruned = build_gpt(plan.target, target_par)
        pruned.load_state_dict(state, strict=True)
        logits = full_logits(pruned, probe)
        if logits is not None:
            if ref_logits is None:
                ref_logits = logits
            d = (logits - ref_logits).abs().max().item()
            check(d < 1e-5, f"{tag}: pruned logits differ from TP1PP1 by {d}")
        save_state([pruned], os.path.join(root, f"pruned_{tag}"))
        rank0(f"{tag}: scores (rel diff {diff:.1e}), plan and pruned logits match TP1PP1")

    # every layout's pruned tensors, loaded back at TP1PP1, are identical
    init_distributed(1, 1)
    reference = None
    for tp, pp in LAYOUTS:
        model = build_gpt(plan.target, Parallel())
        load_state([model], os.path.join(root, f"pruned_tp{tp}pp{pp}"))
        tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        if reference is None:
            reference = tensors
        for k, v in tensors.items():
            check(torch.equal(v, reference[k]), f"tp{tp}pp{pp}: pruned tensor {k} differs from TP1PP1")
    source_state = source.state_dict()
    for new, old in enumerate(plan.kept_layers):
        for norm in QK_NORMS:
            kept = reference[f"decoder.layers.{new}.{norm}"]
            check(torch.equal(kept, source_state[f"decoder.layers.{old}.{norm}"]),
                  f"pruned layer {new} (source {old}): {norm} is not the source's")
    dist.barrier()
    rank0("PRUNE LAYOUTS OK")


if __name__ == "__main__":
    main()
