"""4 ranks at TP1PP2 (DP2, distributed optimizer), dropout on: a run stopped at iteration 3 (exit_interval) and
resumed from its checkpoint reproduces the uninterrupted run's loss, grad-norm and validation sequence exactly
(bitwise), which needs the model, optimizer, LR schedule, RNG and data position all restored. In fp32 and in
bf16 (where megatron's fp32 main weights, kept in the optimizer state, must come back too). The resumed model
is built without a random init (build_gpt(initialize=False)): only the checkpoint sets its weights."""
import os
import sys

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
    for precision in ("fp32", "bf16"):
        check_resume(os.path.join(sys.argv[1], precision), precision)
    dist.barrier()
    if dist.get_rank() == 0:
        print("RESUME OK", flush=True)


def check_resume(root, precision):
    train_ds = SyntheticTokens(64, ARCH.seq_length, ARCH.vocab_size, seed=1)
    valid_ds = SyntheticTokens(16, ARCH.seq_length, ARCH.vocab_size, seed=2)

    whole = Trainer(config(os.path.join(root, "whole"), precision=precision),
                    datasets=(train_ds, valid_ds)).setup().run()

    first = Trainer(config(os.path.join(root, "split"), exit_interval=3, precision=precision),
                    datasets=(train_ds, valid_ds)).setup().run()
    assert first.iteration == 3, first.iteration
    assert checkpoint.latest_iteration(os.path.join(root, "split")) == 3
    second_trainer = Trainer(config(os.path.join(root, "split"), precision=precision),
                             datasets=(train_ds, valid_ds)).setup()
    assert second_trainer.state.iteration == 3 and second_trainer.state.consumed_samples == 24
    second = second_trainer.run()

    expected, got = losses(whole.history), losses(first.history + second.history)
    if dist.get_rank() == 0:
        for e, g in zip(expected, got):
            print(precision, "whole", e, "\nsplit", g, flush=True)
    assert len(expected) == len(got) == 6
    assert expected == got, f"{precision}: resumed run differs from the uninterrupted one"
    assert whole.history[0]["lm_loss"] != whole.history[-1]["lm_loss"]


if __name__ == "__main__":
    main()
