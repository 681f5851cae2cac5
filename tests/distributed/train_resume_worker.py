"""4 ranks at TP1PP2 (DP2, distributed optimizer), dropout on: a run stopped at iteration 3 (exit_interval) and
resumed from its checkpoint reproduces the uninterrupted run's loss, grad-norm and validation sequence exactly
(bitwise), which needs the model, optimizer, LR schedule, RNG and data position all restored. In fp32 and in
bf16 (where megatron's fp32 main weights, kept in the optimizer state, must come back too). The resumed model
is built without a random init (build_gpt(initialize=False)): only the checkpoint sets its weights. Also with
train.fused_adam (torch's fused AdamW kernel inside megatron's distributed optimizer, resumed fused)."""
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist

from megatron_minitron import checkpoint
from megatron_minitron.config import Data, ModelArch, Parallel, Train, TrainConfig
from megatron_minitron.train.loop import Trainer

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from helpers import SyntheticTokens  # noqa: E402

ARCH = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, vocab_size=256, seq_length=16, hidden_dropout=0.1, attention_dropout=0.1)


def config(save, **train_kw):
    return TrainConfig(
        model=ARCH, parallel=Parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2),
        data=Data(micro_batch_size=2, global_batch_size=8),
        train=Train(train_iters=6, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2, eval_interval=2, eval_iters=1,
                    save=save, save_interval=0, keep_last=2, progress_bar=False, seed=5, **train_kw))


def losses(history, keys=("lm_loss", "grad_norm", "lr", "val_lm_loss")):
    return [tuple(h.get(k) for k in keys) for h in history]


def main():
    for precision, train_kw in (("fp32", {}), ("bf16", {}), ("bf16", {"fused_adam": True})):
        name = precision + "".join(f"_{k}" for k in train_kw)
        check_resume(os.path.join(sys.argv[1], name), precision, **train_kw)
    dist.barrier()
    if dist.get_rank() == 0:
        print("RESUME OK", flush=True)


def torch_adam_groups(optimizer):
    """The param groups of the torch AdamW inside megatron-core's (distributed, mixed-precision) optimizer."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [(opt, group) for opt in inner if isinstance(opt, torch.optim.AdamW) for group in opt.param_groups]


def check_resume(root, precision, **train_kw):
    train_ds = SyntheticTokens(64, ARCH.seq_length, ARCH.vocab_size, seed=1)
    valid_ds = SyntheticTokens(16, ARCH.seq_length, ARCH.vocab_size, seed=2)

    whole = Trainer(config(os.path.join(root, "whole"), precision=precision, **train_kw),
                    datasets=(train_ds, valid_ds)).setup().run()

    first = Trainer(config(os.path.join(root, "split"), exit_interval=3, precision=precision, **train_kw),
                    datasets=(train_ds, valid_ds)).setup().run()
    assert first.iteration == 3, first.iteration
    assert checkpoint.latest_iteration(os.path.join(root, "split")) == 3
    second_trainer = Trainer(config(os.path.join(root, "split"), precision=precision, **train_kw),
                             datasets=(train_ds, valid_ds)).setup()
    assert second_trainer.state.iteration == 3 and second_trainer.state.consumed_samples == 24
    groups = torch_adam_groups(second_trainer.optimizer)
    assert groups and all(bool(g["fused"]) is train_kw.get("fused_adam", False) for _, g in groups), groups
    for opt, group in groups:  # the loaded step counters, where the chosen implementation reads them
        for p in group["params"]:
            assert opt.state[p]["step"].item() == 3 and opt.state[p]["step"].dtype == torch.float32
    with mock.patch.object(torch, "_fused_adamw_", wraps=torch._fused_adamw_) as fused_kernel:
        second = second_trainer.run()
    assert (fused_kernel.call_count > 0) is train_kw.get("fused_adam", False), fused_kernel.call_count

    expected, got = losses(whole.history), losses(first.history + second.history)
    if dist.get_rank() == 0:
        for e, g in zip(expected, got):
            print(precision, "whole", e, "\nsplit", g, flush=True)
    assert len(expected) == len(got) == 6
    assert expected == got, f"{precision} {train_kw}: resumed run differs from the uninterrupted one"
    assert whole.history[0]["lm_loss"] != whole.history[-1]["lm_loss"]


if __name__ == "__main__":
    main()
