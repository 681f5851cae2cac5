"""Pure tests of ranking, target validation, GQA head selection, head-merge pairs and the scores file."""
import dataclasses

import pytest
import torch

from megatron_minitron.config import ModelArch
from megatron_minitron.prune import (ImportanceScores, ImportanceSettings, PruneTargets, group_scores,
                                     make_plan, top_k)

ARCH = ModelArch(num_layers=4, hidden_size=16, ffn_hidden_size=12, num_attention_heads=8, num_query_groups=4,
                 vocab_size=64, seq_length=8)


def scores(arch=ARCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = arch.num_layers
    heads = torch.rand(L, arch.num_attention_heads, generator=g, dtype=torch.float64)
    return ImportanceScores(
        settings=ImportanceSettings(block_sizes=[2]), heads=heads, groups=group_scores(heads, arch.query_groups),
        neurons=torch.rand(L, arch.ffn_hidden_size, generator=g, dtype=torch.float64),
        hidden=torch.rand(arch.hidden_size, generator=g, dtype=torch.float64),
        layers={"bi": torch.tensor([0.5, 0.1, 0.3, 0.9], dtype=torch.float64)},
        blocks={"bi": {2: torch.tensor([0.7, 0.2, 0.6], dtype=torch.float64)}}, num_samples=3)


def test_top_k_ties_and_order():
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0]), 2) == [1, 2]
    assert top_k(torch.tensor([0.1, 0.2, 0.3]), 3) == [0, 1, 2]


def test_plan_ranks_every_axis_like_brute_force():
    s = scores()
    plan = make_plan(s, ARCH, PruneTargets(hidden_size=10, ffn_hidden_size=6, num_attention_heads=2,
                                           num_query_groups=2, num_layers=3), tp=2)
    # hidden: the 10 largest scores, ascending
    order = sorted(range(16), key=lambda i: -s.hidden[i])
    assert plan.hidden == sorted(order[:10])
    assert plan.kept_layers == [0, 2, 3]  # lowest BI layer (1) dropped
    for layer in range(4):
        assert plan.neurons[layer] == sorted(sorted(range(12), key=lambda i: -s.neurons[layer, i])[:6])
        gsum = [float(s.heads[layer, 2 * g] + s.heads[layer, 2 * g + 1]) for g in range(4)]
        assert plan.groups[layer] == sorted(sorted(range(4), key=lambda g: -gsum[g])[:2])
        for g, heads in zip(plan.groups[layer], plan.heads[layer]):
            best = max((2 * g, 2 * g + 1), key=lambda h: float(s.heads[layer, h]))
            assert heads == [best]
            # the other head of the group is merged into the kept one
            assert [2 * g + 2 * g + 1 - best, best] in plan.head_merge[layer]
        assert len(plan.head_merge[layer]) == 2
    t = plan.target
    assert (t.num_layers, t.hidden_size, t.ffn_hidden_size, t.num_attention_heads, t.num_query_groups,
            t.head_dim) == (3, 10, 6, 2, 2, ARCH.head_dim)


def test_depth_choices():
    s = scores()
    assert make_plan(s, ARCH, PruneTargets(num_layers=2, contiguous=True)).kept_layers == [0, 3]  # block 1..2
    assert make_plan(s, ARCH, PruneTargets(num_layers=2)).kept_layers == [0, 3]  # 1 and 2 lowest singly too
    assert make_plan(s, ARCH, PruneTargets(drop_layers=[3, 0])).kept_layers == [1, 2]
    assert make_plan(s, ARCH, PruneTargets(drop_range=[1, 3])).kept_layers == [0]
    assert make_plan(s, ARCH, PruneTargets()).kept_layers == [0, 1, 2, 3]


def test_keep_everything_and_no_merge():
    plan = make_plan(scores(), ARCH, PruneTargets(), merge_heads=False)
    assert plan.hidden == list(range(16)) and plan.kept_layers == [0, 1, 2, 3]
    assert all(h == [[2 * g, 2 * g + 1] for g in range(4)] for h in plan.heads)
    assert plan.head_merge == [[], [], [], []]


@pytest.mark.parametrize("targets,match", [
    (PruneTargets(hidden_size=32), "between 1 and"),
    (PruneTargets(ffn_hidden_size=9), "divisible by tensor_model_parallel_size"),
    (PruneTargets(num_attention_heads=6, num_query_groups=4), "not a multiple"),
    (PruneTargets(num_attention_heads=8, num_query_groups=2), "heads per group"),
    (PruneTargets(drop_layers=[4]), "out of range"),
    (PruneTargets(drop_layers=[0, 1, 2, 3]), "every layer"),
    (PruneTargets(num_layers=3, drop_layers=[0, 1]), "disagrees"),
    (PruneTargets(num_layers=1, contiguous=True), "block_sizes"),
    (PruneTargets(num_layers=3, depth_metric="lm_loss"), "lm_loss"),
])
def test_invalid_targets_raise_with_fix(targets, match):
    with pytest.raises(ValueError, match=match):
        make_plan(scores(), ARCH, targets, tp=2)


def test_scores_from_another_model_rejected():
    with pytest.raises(ValueError, match="another model"):
        make_plan(scores(), ModelArch(num_layers=4, hidden_size=32, ffn_hidden_size=12, num_attention_heads=8,
                                      num_query_groups=4), PruneTargets())


def test_pipeline_split_of_target():
    plan = make_plan(scores(), ARCH, PruneTargets(drop_layers=[1]))
    assert plan.target_pipeline_split([2, 2]) == [1, 2]
    with pytest.raises(ValueError, match="without layers"):
        make_plan(scores(), ARCH, PruneTargets(drop_layers=[0, 1])).target_pipeline_split([2, 2])


def test_scores_and_plan_round_trip(tmp_path):
    s = scores()
    path = str(tmp_path / "scores.pt")
    s.save(path)
    back = ImportanceScores.load(path)
    for name in ("heads", "groups", "neurons", "hidden"):
        assert torch.equal(getattr(back, name), getattr(s, name))
    assert torch.equal(back.layers["bi"], s.layers["bi"]) and torch.equal(back.blocks["bi"][2], s.blocks["bi"][2])
    assert back.settings == s.settings and back.num_samples == 3
    plan = make_plan(s, ARCH, PruneTargets(num_attention_heads=4))
    from megatron_minitron.prune import PrunePlan
    assert PrunePlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(FileNotFoundError, match="run importance"):
        ImportanceScores.load(str(tmp_path / "missing.pt"))


def test_depth_pruning_keeps_the_kept_layers_rope_flags():
    """SmolLM3-style NoPE layers: the pruned arch's no_rope_freq is the kept layers' own flags, in order."""
    nope = dataclasses.replace(ARCH, no_rope_freq=[0, 1, 1, 0])
    s = scores()
    for targets, kept, flags in ((PruneTargets(drop_layers=[0]), [1, 2, 3], [1, 1, 0]),
                                 (PruneTargets(drop_layers=[1, 2]), [0, 3], None),  # no kept layer skips RoPE
                                 (PruneTargets(drop_range=[0, 1]), [2, 3], [1, 0])):
        plan = make_plan(s, nope, targets)
        assert plan.kept_layers == kept
        assert plan.target.no_rope_freq == flags  # None, not [0, 0]: recorded as an unflagged model
        plan.target.validate()
