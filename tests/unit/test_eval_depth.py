"""The accuracy depth metric: registers under its name, scores a layer with zeroed output weights (the
identity) exactly 0 and a layer that matters by the accuracy lost without it, equal to the accuracy of
a model built without that layer; prune.plan's rule (lowest score dropped) then drops the zeroed layer."""
import json

import pytest
import torch

from megatron_minitron.config import ModelArch, Parallel
from megatron_minitron.eval import MCItem, Task, evaluate_task, accuracy_depth_metric
from megatron_minitron.model.builder import build_gpt
from megatron_minitron.prune.depth import DEPTH_METRICS, DepthContext, register_depth_metric, removal_scores
from megatron_minitron.prune.plan import top_k
from megatron_minitron.runtime.distributed import init_distributed, set_seed

ARCH = ModelArch(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=259,
                 seq_length=32)


class ByteTokenizer:
    vocab_size = 259
    eod = 2

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]


def items(n=24):
    g = torch.Generator().manual_seed(5)
    words = ["cat", "dog", "sun", "red", "sky", "box", "map", "pen", "cup", "jar"]  # one length: ranks by content
    pick = lambda: words[int(torch.randint(len(words), (1,), generator=g))]  # noqa: E731
    return [MCItem(f"{pick()} {pick()} {pick()}:", [pick(), pick(), pick()], 0) for _ in range(n)]


def test_accuracy_metric_ranks_layers(tmp_path):
    init_distributed(1, 1)
    set_seed(2)
    model = build_gpt(ARCH, Parallel()).eval()
    with torch.no_grad():
        first = model.decoder.layers[0]
        first.self_attention.linear_proj.weight.zero_()  # layer 0 adds nothing to the residual stream
        first.mlp.linear_fc2.weight.zero_()
        model.decoder.layers[2].mlp.linear_fc2.weight.mul_(30.0)  # layer 2 dominates the output
    # answers = the full model's own predictions, so its accuracy is 1 and removals can only lose
    task = Task("t", "t.jsonl", "native", items())
    full = evaluate_task([model], task, ByteTokenizer())
    path = tmp_path / "task.jsonl"
    with open(path, "w") as f:
        for item, r in zip(task.items, full["items"]):
            f.write(json.dumps({"context": item.context, "choices": item.choices, "answer": r["pred"]}) + "\n")

    fn = accuracy_depth_metric(str(path), name="test_accuracy", tokenizer=ByteTokenizer())
    register_depth_metric("test_accuracy", fn)
    assert DEPTH_METRICS["test_accuracy"] is fn
    ctx = DepthContext([model], batches=[])
    scores = removal_scores(ctx, "test_accuracy", ARCH.num_layers, [1, 2])
    assert ctx.cache[("eval.accuracy", "test_accuracy")] == 1.0
    assert scores[1][0] == 0.0
    assert scores[2].shape == (2,)

    # reference for layer 2: a two-layer model holding layers 0 and 1 only
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.layers.2.")}
    small = build_gpt(ModelArch(**{**ARCH.__dict__, "num_layers": 2}), Parallel()).eval()
    small.load_state_dict(state, strict=True)
    task_now = Task("t", str(path), "native", [MCItem(i.context, i.choices, r["pred"])
                                                for i, r in zip(task.items, full["items"])])
    without_last = evaluate_task([small], task_now, ByteTokenizer())["acc"]
    assert without_last < 1.0  # the test model must make layer 2 matter
    assert float(scores[1][2]) == pytest.approx(1.0 - without_last)
    assert top_k(-scores[1], 1) == [0]  # prune.plan drops the lowest-scored layer: the zeroed one


def test_registration_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        accuracy_depth_metric(str(tmp_path / "missing.jsonl"), tokenizer=ByteTokenizer())
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(ValueError, match="need a tokenizer"):
        accuracy_depth_metric(str(path))
    with pytest.raises(ValueError, match="measure"):
        accuracy_depth_metric(str(path), tokenizer=ByteTokenizer(), measure="f1")
    with pytest.raises(ValueError, match="'bi' is computed"):
        accuracy_depth_metric(str(path), tokenizer=ByteTokenizer(), name="bi")
