"""Test helpers shared by worker scripts: synthetic data, full logits at any layout, raw dist-ckpt save/load
(megatron's own API, independent of our checkpoint module), a plain-torch reference optimizer step, and
multi-rank comparisons that name the failing rank."""
import os

import torch
import torch.distributed as dist


class SyntheticTokens:
    """Deterministic GPT samples shaped like megatron's GPTDataset items; some loss positions masked."""

    def __init__(self, num_samples, seq_length, vocab_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.text = torch.randint(0, vocab_size, (num_samples, seq_length + 1), generator=g)
        self.mask = (torch.rand(num_samples, seq_length, generator=g) > 0.1).float()
        self.seq_length = seq_length

    def __len__(self):
        return self.text.shape[0]

    def __getitem__(self, i):
        return {"tokens": self.text[i, :-1].clone(), "labels": self.text[i, 1:].clone(),
                "loss_mask": self.mask[i].clone(), "position_ids": torch.arange(self.seq_length)}


def check_close(name, actual, expected, rtol, atol):
    """assert_close in float64, the message naming this rank and the quantity."""
    try:
        torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise AssertionError(f"rank {dist.get_rank()}: {name}: {exc}") from None


def check_same_on_all_ranks(name, tensor, group):
    """``tensor`` is bitwise identical on every rank of ``group`` (collective)."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    for other in gathered[1:]:
        assert torch.equal(gathered[0], other), f"{name}: per-token loss differs across TP ranks"


@torch.no_grad()
def full_logits(model, tokens):
    """Full-vocabulary logits [b, s, V] through megatron's schedule (any PP); None on non-last stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    was_training = model.training
    model.eval()
    b, s = tokens.shape
    positions = torch.arange(s).expand(b, s)

    def forward_step(data_iterator, m):
        next(data_iterator)
        out = m(tokens, positions, None)
        return out, lambda o: (o.sum() * 0, {"logits": o.detach()})

    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]),
                                      model=[model], num_microbatches=1, seq_length=s,
                                      micro_batch_size=b, forward_only=True)
    model.train(was_training)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return gather_from_tensor_model_parallel_region(out[0]["logits"])


def save_state(model_chunks, directory):
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    sharded = {}
    for chunk in model_chunks:
        sharded.update(chunk.sharded_state_dict())
    dist_checkpointing.save(sharded, directory)
    dist.barrier()


def load_state(model_chunks, directory):
    from megatron.core import dist_checkpointing

    for chunk in model_chunks:
        state = dist_checkpointing.load(chunk.sharded_state_dict(), directory)
        chunk.load_state_dict(state, strict=False)
    dist.barrier()


def plain_reference_step(model, batch, train_cfg):
    """One AdamW step with megatron's rules (no weight decay on 1-D params, global-norm clipping), in plain
    torch on an unsharded TP1PP1 model. Returns (token-mean loss, {name: updated tensor})."""
    from torch.func import functional_call

    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    tokens = torch.stack([x["tokens"] for x in batch])
    labels = torch.stack([x["labels"] for x in batch])
    mask = torch.stack([x["loss_mask"] for x in batch])
    positions = torch.stack([x["position_ids"] for x in batch])
    model.train()
    per_token = functional_call(model, params, (tokens, positions, None), {"labels": labels})
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    grads = [p.grad for p in params.values()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    coeff = train_cfg.clip_grad / (norm + 1e-6)
    if coeff < 1.0:
        for g in grads:
            g.mul_(coeff)
    decay = [p for p in params.values() if p.ndim > 1]
    no_decay = [p for p in params.values() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                            eps=train_cfg.adam_eps)
    opt.step()
    return loss.item(), {n: p.detach() for n, p in params.items()}


def count_kernel_calls(calls: dict) -> list:
    """Wrap train.fused_kernels' RoPE and SwiGLU entry points (the modules import them at call time) so that
    each call adds one to ``calls["rope"]`` / ``calls["swiglu"]``; returns [(module, name, original)] to undo."""
    from megatron_minitron.kernels import rope_triton, swiglu_triton

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    patched = [(rope_triton, "triton_apply_rotary_pos_emb", "rope"), (swiglu_triton, "triton_swiglu", "swiglu")]
    originals = []
    for module, name, key in patched:
        originals.append((module, name, getattr(module, name)))
        setattr(module, name, counted(key, getattr(module, name)))
    return originals
