"""Single process: importance scores equal a reference computed another way (plain hooks capturing every
activation, one-shot aggregation over all samples at once; lm_loss vs a model with the layer really removed
by trimming); the depth-metric registry; clear errors for unsupported setups."""
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune import (DEPTH_METRICS, ImportanceSettings, PruneTargets, aggregate,
                                     estimate_importance, make_plan, prune_model_state, register_depth_metric,
                                     skip_layers)
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ARCH = ModelArch(num_layers=3, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=12)


@pytest.fixture(scope="module")
def model():
    init_distributed(1, 1)
    set_seed(3)
    return build_gpt(ARCH, Parallel()).eval()


def data(n=3, b=2):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, ARCH.vocab_size, (n, b, ARCH.seq_length + 1), generator=g)
    return [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in text]


@torch.no_grad()
def capture(model, batches):
    """Every probed activation of every batch, concatenated over the batch dim (plain hooks)."""
    acts, handles = {}, []

    def keep(name, pre):
        def hook(mod, args, out=None):
            x = args[0] if pre else (out[0] if isinstance(out, tuple) else out)
            acts.setdefault(name, []).append(x.detach())
        return hook

    for i, layer in enumerate(model.decoder.layers):
        handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(keep(f"proj{i}", True)))
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(keep(f"fc2{i}", True)))
        handles.append(layer.input_layernorm.register_forward_hook(keep(f"ln1{i}", False)))
        handles.append(layer.pre_mlp_layernorm.register_forward_hook(keep(f"ln2{i}", False)))
        handles.append(layer.register_forward_hook(keep(f"out{i}", False)))
    handles.append(model.decoder.final_layernorm.register_forward_hook(keep("final", False)))
    emb = []
    handles.append(model.embedding.register_forward_hook(lambda m, a, o: emb.append(o.detach())))
    for b in batches:
        t = b["tokens"]
        model(t, torch.arange(t.shape[1]).expand_as(t), None)
    for h in handles:
        h.remove()
    out = {k: torch.cat(v, dim=1) for k, v in acts.items()}
    out["emb"] = torch.cat(emb, dim=1)
    return out


def test_scores_match_reference(model):
    batches = data()
    settings = ImportanceSettings(depth_metrics=["bi", "lm_loss"], block_sizes=[2])
    scores = estimate_importance([model], batches, settings)
    acts = capture(model, batches)
    L, d = ARCH.num_layers, ARCH.head_dim
    for i in range(L):
        x = acts[f"proj{i}"]
        per_head = x.reshape(*x.shape[:2], -1, d).norm(dim=-1)
        torch.testing.assert_close(scores.heads[i], aggregate(per_head, "l2", "mean"))
        torch.testing.assert_close(scores.neurons[i], aggregate(acts[f"fc2{i}"].abs(), "l2", "mean"))
    torch.testing.assert_close(scores.groups, scores.heads.reshape(L, 2, 2).sum(-1))
    sites = [f"ln1{i}" for i in range(L)] + [f"ln2{i}" for i in range(L)] + ["final"]
    torch.testing.assert_close(scores.hidden, sum(aggregate(acts[s].abs(), "l2", "mean") for s in sites))
    hs = [acts["emb"]] + [acts[f"out{i}"] for i in range(L)]
    bi = lambda a, b: (1 - F.cosine_similarity(a.double(), b.double(), dim=-1)).mean()  # noqa: E731
    torch.testing.assert_close(scores.layers["bi"], torch.stack([bi(hs[i], hs[i + 1]) for i in range(L)]))
    torch.testing.assert_close(scores.blocks["bi"][2], torch.stack([bi(hs[i], hs[i + 2]) for i in range(L - 1)]))
    assert scores.num_samples == 6
    # lm_loss of skipping layer 1 == loss of the model with layer 1 trimmed away - loss of the full model
    plan = make_plan(scores, ARCH, PruneTargets(drop_layers=[1]))
    set_seed(5)
    dropped = build_gpt(plan.target, Parallel()).eval()
    dropped.load_state_dict(prune_model_state(model, plan))

    def loss(m):
        with torch.no_grad():
            per = [m(b["tokens"], torch.arange(12).expand_as(b["tokens"]), None, labels=b["labels"]) for b in batches]
        return torch.cat(per).double().mean()

    torch.testing.assert_close(scores.layers["lm_loss"][1], loss(dropped) - loss(model), atol=1e-6, rtol=1e-5)


def test_skip_layers_restores_and_registry(model):
    tokens = data(1)[0]["tokens"]
    pos = torch.arange(12).expand_as(tokens)
    with torch.no_grad():
        before = model(tokens, pos, None)
        with skip_layers([model], [0, 1, 2]):
            skipped = model(tokens, pos, None)
        after = model(tokens, pos, None)
    torch.testing.assert_close(before, after, atol=0, rtol=0)
    assert (skipped - before).abs().max() > 1e-3

    calls = []
    register_depth_metric("count", lambda ctx, layers: float(len(calls.append(layers) or calls)))
    try:
        s = estimate_importance([model], data(2), ImportanceSettings(depth_metrics=["count"], depth_batches=1))
        assert calls == [(0,), (1,), (2,)] and s.layers["count"].tolist() == [1.0, 2.0, 3.0]
    finally:
        DEPTH_METRICS.pop("count")
    with pytest.raises(ValueError, match="unknown depth metric"):
        estimate_importance([model], data(1), ImportanceSettings(depth_metrics=["nope"]))


def test_unsupported_setups_raise():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(sequence_parallel=True))
    with pytest.raises(ValueError, match="sequence_parallel=false"):
        estimate_importance([fake], [], ImportanceSettings())
    with pytest.raises(ValueError, match="aggregation"):
        ImportanceSettings(batch_aggregation="max").validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_cosines_share_each_boundary_and_match_cosine_similarity(dtype):
    """BI's cosines from boundaries cast and normed once equal F.cosine_similarity in float64 of the same
    values (bf16: fp32 accumulation), for every pair of a walk that releases boundaries as it goes."""
    from megatron_minitron.prune.importance import _Boundaries

    g = torch.Generator().manual_seed(2)
    hs = {j: (torch.randn(9, 2, 64, generator=g) + 0.3 * j).to(dtype) for j in range(5)}
    hs[4][0, 0] = 0  # a zero row: eps keeps it finite, as in F.cosine_similarity
    walk = _Boundaries(hs)
    for i in range(4):
        for k in (1, 2, 3):
            if i + k <= 4:
                ref = F.cosine_similarity(hs[i].double(), hs[i + k].double(), dim=-1)
                tol = 1e-5 if dtype == torch.bfloat16 else 1e-12
                torch.testing.assert_close(walk.cosine(i, i + k), ref, rtol=tol, atol=tol)
        walk.release(i)
        assert all(j > i for j in walk.cast)
