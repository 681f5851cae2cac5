"""4 ranks: the same weights give the same logits, loss and post-step weights at TP1PP1 (DP4), TP2PP1 (DP2),
TP1PP2 (DP2), TP2PP2 (DP1) and TP2PP2 with sequence parallelism, and all of them match a plain-torch reference step (AdamW + global-norm
clipping on the unsharded model, no megatron schedule, DDP or distributed optimizer involved).

The model is Qwen3-shaped: per-head q/k layernorms and a head dim (8) that is not hidden / heads (16). Those
norm weights are replicated on every TP rank while each rank sees only its own heads, so their gradient is a
partial sum that megatron's finalize_model_grads must all-reduce over TP: at DP1 the layouts' q/k norm grads
(before clipping) are compared with the reference's, and after one more step the weights must still be
bitwise identical on the ranks of each TP group."""
import importlib.util
import os
import sys
import tempfile

import torch
import torch.distributed as dist

from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig
from megatron_minitron.runtime.distributed import init_distributed, set_seed
from megatron_minitron.train.loop import Trainer

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from helpers import (SyntheticTokens, full_logits, load_state, plain_reference_step,  # noqa: E402
                     save_state)

ARCH = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, kv_channels=8, qk_layernorm=True, vocab_size=256, seq_length=16)
GLOBAL_BATCH = 8


def config(tp, pp, sp=False, save=None, **train_kw):
    return TrainConfig(
        model=ARCH,
        parallel=Parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          sequence_parallel=sp),
        data=Data(micro_batch_size=1, global_batch_size=GLOBAL_BATCH),
        train=Train(train_iters=1, lr=1e-2, min_lr=1e-2, lr_warmup_iters=0, lr_decay_style="constant",
                    # adam_eps: Adam's first step is g / (|g| + eps); with eps=1e-8 elements whose
                    # gradient is pure rounding noise flip freely between layouts and the reference
                    adam_eps=1e-5, weight_decay=0.1, clip_grad=0.5, eval_iters=0, eval_interval=0, save=save,
                    progress_bar=False, **train_kw))


LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False), (2, 2, True)]
QK_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
EXTRA_STEPS = 1  # after the compared one (Adam then has moments): TP ranks whose q/k norm grads were not all-reduced
# would step them apart


def qk_norm_params(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(QK_NORMS)}


def reference_grads(model, batch):
    """d(token-mean loss)/d(q/k norm weights) on the unsharded model, plain torch (before any clipping)."""
    from torch.func import functional_call

    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    tokens, labels, mask, positions = (torch.stack([x[k] for x in batch])
                                       for k in ("tokens", "labels", "loss_mask", "position_ids"))
    per_token = functional_call(model, params, (tokens, positions, None), {"labels": labels})
    ((per_token * mask).sum() / mask.sum()).backward()
    return {n: p.grad for n, p in params.items() if n.endswith(QK_NORMS)}


def capture_grads_after_finalize(trainer, into):
    """Snapshot the q/k norm main_grads right after finalize_model_grads (DP/TP reduced, divided by the token
    count), before the optimizer clips them."""
    mconfig = trainer.unwrapped()[0].config
    finalize = mconfig.finalize_model_grads_func

    def wrapped(*args, **kwargs):
        out = finalize(*args, **kwargs)
        for chunk in trainer.unwrapped():
            into.update({n: p.main_grad.detach().clone() for n, p in qk_norm_params(chunk).items()})
        return out

    mconfig.finalize_model_grads_func = wrapped


def main():
    from megatron.core import parallel_state as ps

    root = sys.argv[1]
    ds = SyntheticTokens(64, ARCH.seq_length, ARCH.vocab_size, seed=3)
    probe = torch.stack([ds[i]["tokens"] for i in range(3)])

    # Reference: an unsharded TP1PP1 model, stepped with plain torch.
    init_distributed(1, 1)
    set_seed(7)
    ref = Trainer(config(1, 1), datasets=(ds, None)).setup()
    ref_model = ref.unwrapped()[0]
    save_state([ref_model], os.path.join(root, "init"))
    ref_logits = full_logits(ref_model, probe)
    batch = [ds[i] for i in range(GLOBAL_BATCH)]
    ref_loss, ref_after = plain_reference_step(ref_model, batch, ref.cfg.train)
    ref_qk_grads = reference_grads(ref_model, batch)
    assert len(ref_qk_grads) == 2 * ARCH.num_layers and all(g.abs().sum() > 0 for g in ref_qk_grads.values())

    for tp, pp, sp in LAYOUTS:
        tag = f"tp{tp}pp{pp}" + ("sp" if sp else "")
        trainer = Trainer(config(tp, pp, sp), datasets=(ds, None)).setup()
        load_state(trainer.unwrapped(), os.path.join(root, "init"))
        logits = full_logits(trainer.unwrapped()[0], probe)
        if logits is not None:
            diff = (logits - ref_logits).abs().max().item()
            assert diff < 1e-5, f"{tag}: logits differ from TP1PP1 by {diff}"
        grads = {}
        capture_grads_after_finalize(trainer, grads)
        batches = trainer._batches(ds, 0)
        metrics = trainer.train_step(batches)
        assert abs(metrics["lm_loss"] - ref_loss) < 1e-5, f"{tag}: loss {metrics['lm_loss']} vs {ref_loss}"
        if ps.get_data_parallel_world_size() == 1:
            # with DP > 1 the distributed optimizer's reduce-scatter leaves only this rank's shard valid
            offset = ps.get_pipeline_model_parallel_rank() * (ARCH.num_layers // pp)  # global layer numbers
            for name, g in grads.items():
                layer, rest = name.split("decoder.layers.")[1].split(".", 1)
                ref_name = f"decoder.layers.{int(layer) + offset}.{rest}"
                diff = (g - ref_qk_grads[ref_name]).abs().max().item()
                assert diff < 1e-6, (f"rank {dist.get_rank()} {tag}: {ref_name} grad differs from the reference by"
                                     f" {diff} (not summed over TP?)")
            assert len(grads) == 2 * ARCH.num_layers // pp, (tag, sorted(grads))
        save_state(trainer.unwrapped(), os.path.join(root, tag))
        qk_note = ""
        if tp > 1:
            for _ in range(EXTRA_STEPS):
                trainer.train_step(batches)
            for name, p in qk_norm_params(trainer.unwrapped()[0]).items():
                w = p.detach().clone()
                everyone = [torch.empty_like(w) for _ in range(tp)]
                dist.all_gather(everyone, w, group=ps.get_tensor_model_parallel_group())
                assert all(torch.equal(w, o) for o in everyone), (
                    f"rank {dist.get_rank()} {tag}: {name} differs across TP ranks after {1 + EXTRA_STEPS} steps")
            qk_note = (", q/k norm " + ("grads == reference, " if ps.get_data_parallel_world_size() == 1 else "")
                       + f"weights equal on TP ranks after {1 + EXTRA_STEPS} steps")
        if dist.get_rank() == 0:
            print(f"{tag}: logits ok, loss {metrics['lm_loss']:.6f} == reference {ref_loss:.6f}{qk_note}", flush=True)

    # Compare every layout's stepped weights, loaded back at TP1PP1, with the plain-torch step.
    init_distributed(1, 1)
    check = Trainer(config(1, 1), datasets=(ds, None)).setup()
    for tp, pp, sp in LAYOUTS:
        tag = f"tp{tp}pp{pp}" + ("sp" if sp else "")
        load_state(check.unwrapped(), os.path.join(root, tag))
        for name, p in check.unwrapped()[0].named_parameters():
            diff = (p.detach() - ref_after[name]).abs().max().item()
            assert diff < 2e-5, f"{tag}: {name} after one step differs from reference by {diff}"
        if dist.get_rank() == 0:
            print(f"{tag}: weights after one step match the plain-torch reference", flush=True)

    # HF qwen3 at TP2 x PP2 (hf_convert_worker.py's check; its own launch has 2 ranks, this one has 4)
    if importlib.util.find_spec("transformers") is not None:
        from tests.distributed.hf_convert_worker import check_tp2_pp2
        check_tp2_pp2(os.path.join(root, "hf"))
    dist.barrier()
    if dist.get_rank() == 0:
        print("EQUIVALENCE OK", flush=True)


if __name__ == "__main__":
    main()
