"""Running a megatron model chunk list without training it: unwrapping the DDP / Float16Module wrappers,
eval mode, skipping layers, and one forward-only pass through megatron-core's pipeline schedule (any PP).
Used by importance scoring, depth metrics and evaluation."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, List, Optional

import torch


def unwrap_model(chunk):
    """The GPTModel inside DDP / Float16Module wrappers (their parameters are the same objects)."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def model_device(model_chunks) -> torch.device:
    return next(unwrap_model(model_chunks[0]).parameters()).device


@contextlib.contextmanager
def eval_mode(model_chunks):
    """Within the block every chunk is in eval mode; each gets its own previous mode back afterwards."""
    chunks = [unwrap_model(c) for c in model_chunks]
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)


def transformer_layers(model_chunks) -> list:
    """(global 0-based layer id, layer module) of this rank's stage."""
    out = []
    for chunk in model_chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            out.append((layer.layer_number - 1, layer))
    return out


def _identity_layer(*args, **kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    # a new tensor: a stage whose layers are all skipped must not hand its input buffer on unchanged
    return hidden.clone(), kwargs.get("context")


@contextlib.contextmanager
def skip_layers(model_chunks, layer_ids: Iterable[int]):
    """Within the block, the layers with these global 0-based ids act as the identity (on whichever
    pipeline stage owns them)."""
    ids = set(int(i) for i in layer_ids)
    patched = []
    try:
        for lid, layer in transformer_layers(model_chunks):
            if lid in ids:
                layer.forward = _identity_layer  # instance attribute shadows the class method
                patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


def forward_only(model_chunks, batch: dict, collect: Callable[[torch.Tensor], dict]) -> List[dict]:
    """One micro-batch forward through megatron's schedule (forward only, any PP). ``batch`` holds
    ``tokens`` [b, s] and optionally ``position_ids`` and ``labels`` (then the model returns per-token
    losses, else logits). ``collect(output)`` turns the last stage's output into a report dict; returns
    the reports (one per micro-batch) on the last pipeline stage, [] elsewhere. Collective over TP x PP."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = model_device(model_chunks)
    tokens = batch["tokens"].to(device)
    b, s = tokens.shape
    positions = batch.get("position_ids")
    positions = torch.arange(s, device=device).expand(b, s) if positions is None else positions.to(device)
    labels: Optional[torch.Tensor] = batch.get("labels")
    labels = None if labels is None else labels.to(device)

    def forward_step(data_iterator, model):
        next(data_iterator)
        out = model(tokens, positions, None, labels=labels)
        return out, lambda output: (output.sum() * 0, collect(output))

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=list(model_chunks),
        num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    return list(reports or [])
