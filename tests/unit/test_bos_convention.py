"""One BOS convention per tokenizer, the same in preprocess (training / distillation data), prune
calibration and eval, and the same as lm-evaluation-harness 0.4 applies to the exported HF model.

The reference is lm-evaluation-harness's procedure for a causal HF model, computed here with transformers
on the exported directory: ``tokenizer.encode(text)`` with the tokenizer's default special tokens for the
context and the whole request, the continuation being what the whole adds; an empty context becomes the
tokenizer's bos_token_id (else its eos_token_id); the model scores (context + continuation)[:-1]."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from megatron_minitron.data import build_stdlib_corpus, build_tokenizer, train_sentencepiece  # noqa: E402
from megatron_minitron.data.preprocess import preprocess  # noqa: E402
from megatron_minitron.eval.scoring import encode_pair, item_requests  # noqa: E402

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
DOCS = ["The cat sat on the mat.", "def f(x):\n    return x + 1\n", "  indented text", "", "last one"]
PAIRS = [("Question: what is two plus two?\nAnswer:", " four"), ("The cat sat on the ", "mat"),
         ("", "Hello world"), ("x", " y z"), ("Nothing trailing", "!")]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus = build_stdlib_corpus(str(out), max_bytes=60_000, valid_percent=0)
    path = out / "train.txt"
    with open(corpus.train) as f, open(path, "w") as g:
        for line in f:
            g.write(json.loads(line)["text"])
    return str(path)


def hf_tokenizer_dir(text_file, out_dir, adds_bos: bool) -> str:
    """A byte-level BPE tokenizer.json (Llama-3 style specials) whose post-processor adds BOS or not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([text_file], trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}, f)
    return out_dir


def lm_eval_pair(hf_tok, context: str, continuation: str):
    """lm_eval.api.model.LM.loglikelihood + _encode_pair (0.4.13) for a causal model, default add_bos_token."""
    if context == "":
        cont = hf_tok.encode(continuation, add_special_tokens=False)
        prefix = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole, ctx = hf_tok.encode(context + continuation), hf_tok.encode(context)
    return ctx, whole[len(ctx):]


def lm_eval_loglikelihood(hf_tok, model, context: str, continuation: str) -> float:
    ctx, cont = lm_eval_pair(hf_tok, context, continuation)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([(ctx + cont)[:-1]])).logits.float()
    logp = torch.log_softmax(logits[0, -len(cont):].double(), dim=-1)
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())


@pytest.mark.parametrize("adds_bos", [True, False])
def test_hf_tokenizer_convention_in_preprocess_calibration_and_eval(text_file, tmp_path, adds_bos):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_minitron.data import calibration_batches, load_tokenizer_sidecar

    path = hf_tokenizer_dir(text_file, str(tmp_path / "tok"), adds_bos)
    tok = build_tokenizer("huggingface", path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    bos = hf.convert_tokens_to_ids(BOS)
    assert (tok.add_bos, tok.bos) == ((True, bos) if adds_bos else (False, None))
    with pytest.raises(ValueError, match="convention is its own"):
        build_tokenizer("huggingface", path, add_bos=not adds_bos)

    # preprocess: every document is what the HF tokenizer gives by default (as lm-eval encodes), then EOD
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 8))
    prefix = str(tmp_path / "data")
    preprocess([str(docs)], prefix, tok)
    stored = IndexedDataset(prefix)
    expected = [hf.encode(d) + [tok.eod] for d in DOCS * 8 if d]
    assert [list(map(int, stored[i])) for i in range(len(stored))] == expected
    side = load_tokenizer_sidecar(prefix)
    assert (side.add_bos, side.bos) == (tok.add_bos, tok.bos)

    # calibration windows: BOS right after every EOD (a document start), and nowhere else
    batches = calibration_batches(prefix, 4, 16, 2, cache_dir=str(tmp_path / "cache"))
    tokens = torch.cat([b["tokens"] for b in batches]).numpy()
    after_eod = tokens[:, 1:][tokens[:, :-1] == tok.eod]
    assert after_eod.size > 0
    assert (after_eod == bos).all() if adds_bos else not (tokens == bos).any()
    assert int((tokens == bos).sum()) == (int((tokens[:, :-1] == tok.eod).sum()) + int((tokens[:, 0] == bos).sum())
                                          if adds_bos else 0)

    # eval: (context, continuation) ids exactly as lm-evaluation-harness makes them
    for context, continuation in PAIRS:
        assert encode_pair(tok, context, continuation) == tuple(lm_eval_pair(hf, context, continuation))


def test_sentencepiece_convention_is_recorded_and_followed(text_file, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_minitron.data import load_tokenizer_sidecar
    from megatron_minitron.hf.tokenizer_export import export_sentencepiece

    model = train_sentencepiece([text_file], str(tmp_path / "spm"), 500)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    for add_bos in (False, True):
        tok = build_tokenizer("sentencepiece", model, add_bos=add_bos)
        prefix = str(tmp_path / f"data_{add_bos}")
        preprocess([str(docs)], prefix, tok)
        stored = IndexedDataset(prefix)
        assert [list(map(int, stored[i])) for i in range(len(stored))] == \
            [([1] if add_bos else []) + tok.encode(d) + [2] for d in DOCS if d]
        assert load_tokenizer_sidecar(prefix).add_bos is add_bos  # the sidecar keeps the convention
        export_sentencepiece(tok, str(tmp_path / f"hf_{add_bos}"))
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / f"hf_{add_bos}"))
        for context, continuation in PAIRS:
            assert encode_pair(tok, context, continuation) == tuple(lm_eval_pair(hf, context, continuation))
    # the default stays what existing data was written with: no BOS
    assert build_tokenizer("sentencepiece", model).add_bos is False
    # eval given the model file by path takes the convention the checkpoint records for that vocabulary
    from megatron_minitron.eval import resolve_eval_tokenizer

    record = build_tokenizer("sentencepiece", model, add_bos=True).describe()
    assert resolve_eval_tokenizer(model, metadata={"tokenizer": record}).add_bos is True
    other = {**record, "fingerprint": "sha256:another-vocabulary"}
    assert resolve_eval_tokenizer(model, metadata={"tokenizer": other}).add_bos is False
    assert resolve_eval_tokenizer(model).add_bos is False


def _convert(*argv):
    from megatron_minitron.hf import cli as hf_cli

    parser = argparse.ArgumentParser()
    hf_cli.register(parser.add_subparsers())
    args = parser.parse_args(["convert", *argv])
    return args.handler(args)


@pytest.mark.parametrize("kind", ["hf_bos", "sentencepiece"])
def test_eval_loglikelihoods_equal_lm_eval_on_the_exported_model(text_file, tmp_path, kind):
    """minitron eval's per-choice log-likelihoods == lm-evaluation-harness's computation with transformers
    on the model and tokenizer `convert mcore-to-hf` wrote."""
    from megatron_minitron import checkpoint
    from megatron_minitron.config import Parallel
    from megatron_minitron.eval import evaluate_task, resolve_eval_tokenizer
    from megatron_minitron.eval.tasks import load_task
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import init_distributed
    from tests.hf_tiny_models import COMMON

    init_distributed(1, 1)
    hf_dir, ckpt, back = (str(tmp_path / n) for n in ("hf", "ckpt", "back"))
    if kind == "hf_bos":
        tokenizer_path = hf_tokenizer_dir(text_file, hf_dir, adds_bos=True)
        vocab = build_tokenizer("huggingface", tokenizer_path).vocab_size
    else:
        tokenizer_path = train_sentencepiece([text_file], str(tmp_path / "spm"), 500)
        vocab = 500
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": vocab, "max_position_embeddings": 128})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(hf_dir)
    assert _convert("hf-to-mcore", "--input", hf_dir, "--output", ckpt, "--dtype", "fp32") == 0
    export = ["--tokenizer", tokenizer_path] if kind == "sentencepiece" else []
    assert _convert("mcore-to-hf", "--input", ckpt, "--output", back, *export) == 0

    metadata = checkpoint.read_metadata(ckpt)
    tok = resolve_eval_tokenizer(tokenizer_path if kind == "sentencepiece" else None, metadata=metadata)
    assert tok.add_bos is (kind == "hf_bos")
    arch = checkpoint.arch_from_metadata(metadata)
    model = build_gpt(arch, Parallel(), dtype=torch.float32).eval()
    checkpoint.load_weights(ckpt, [model], arch=arch)
    rows = [{"context": "The capital of France is", "choices": ["Paris", "a cat"], "answer": 0},
            {"context": "def add(a, b):\n    return", "choices": ["a + b", "None", "a - b"], "answer": 0},
            {"context": "2 + 2 =", "choices": ["4", "5"], "answer": 0}]
    task_file = tmp_path / "task.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(str(task_file))
    ours = evaluate_task([model], task, tok, num_fewshot=1, batch_size=2, seq_length=128)

    hf_tok = transformers.AutoTokenizer.from_pretrained(back)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").float().eval()
    for index, item in enumerate(ours["items"]):
        reference = [lm_eval_loglikelihood(hf_tok, hf_model, c, x) for c, x in item_requests(task.items, index, 1, 1234)]
        np.testing.assert_allclose(item["loglikelihoods"], reference, rtol=0, atol=2e-4)
    # and the BOS matters: without it the numbers differ (the bug this convention fixes)
    if kind == "hf_bos":
        c, x = item_requests(task.items, 0, 1, 1234)[0]
        ctx, cont = lm_eval_pair(hf_tok, c, x)
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([(ctx[1:] + cont)[:-1]])).logits.float()
        no_bos = float(torch.log_softmax(logits[0, -len(cont):].double(), -1).gather(
            -1, torch.tensor(cont)[:, None]).sum())
        assert abs(no_bos - ours["items"][0]["loglikelihoods"][0]) > 1e-4


def test_old_sidecar_of_a_bos_adding_tokenizer_warns(text_file, tmp_path):
    import yaml

    from megatron_minitron.data import load_tokenizer_sidecar, write_tokenizer_sidecar

    tok = build_tokenizer("huggingface", hf_tokenizer_dir(text_file, str(tmp_path / "tok"), adds_bos=True))
    side = write_tokenizer_sidecar(str(tmp_path / "data"), tok)
    info = yaml.safe_load(open(side))
    yaml.safe_dump({k: info[k] for k in ("type", "path", "vocab_size", "eod", "eod_token")}, open(side, "w"))
    with pytest.warns(UserWarning, match="preprocess` again"):
        assert load_tokenizer_sidecar(str(tmp_path / "data")).add_bos is True
