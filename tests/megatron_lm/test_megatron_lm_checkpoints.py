"""Checkpoints in and out of NVIDIA Megatron-LM, checked with Megatron-LM's own code (vendored, see harness.py).

One Megatron-LM run (TP2, 2 ranks, a real train step) writes SRC the way `pretrain_gpt.py --ckpt-format
torch_dist` does; then:
  * reading: checkpoint.read_metadata / describe_checkpoint of SRC against the args Megatron-LM ran with, and
    our logits equal Megatron-LM's.
  * prune: `minitron prune --save` at TP1 and `--in-place --tp 2` on a copy (same scores) -> Megatron-LM's
    load_checkpoint (default flags, architecture from the checkpoint's args) loads each at the other TP (both
    in one 2-rank launch); the loaded tensors are the ones in the files (plain torch.distributed.checkpoint),
    the same for both prunes, the slices of SRC that prune_plan.json names; logits equal ours; iteration as
    recorded.
  * HF: `convert mcore-to-hf` of SRC gives transformers logits equal to Megatron-LM's; `convert hf-to-mcore
    --format megatron-lm` of that export is loaded by Megatron-LM with SRC's exact tensors and the same logits;
    `minitron eval` gives the same LM loss on SRC, on that import and on a minitron-format import.
  * distill: teacher = student = SRC gives KD loss 0 at the first step (both roles read the same weights), and
    the LM loss and gradient norm of `train.load=SRC`'s first step; its save (train.save_format=megatron-lm,
    with LM loss so the optimizer state is not zero) is resumed by Megatron-LM with its optimizer state and
    scheduler, at the saved iteration; its rng_state is what Megatron-LM's load requests and restores.
  * bf16 + --use-distributed-optimizer (the usual pretrain_gpt.py setting): our reading and HF export.
Megatron-LM loads run fp32 with the non-distributed optimizer: megatron-core 0.16.1 without Apex/TE cannot load
a distributed-optimizer checkpoint (DistributedOptimizer.state_dict asserts on an empty torch Adam state).
Each Megatron-LM launch costs ~10 s of imports per rank; the file uses about 180 CPU-seconds (2 min 20 s wall
measured on 2 lightly shared cores).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import harness  # noqa: E402

from procs import torchrun  # noqa: E402

transformers = pytest.importorskip("transformers")

SEQ = 32
VOCAB = 512
SOURCE_ITERATION = 7
ARCH_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
              "--group-query-attention", "--num-query-groups", "2", "--seq-length", str(SEQ),
              "--max-position-embeddings", str(SEQ), "--normalization", "RMSNorm", "--swiglu",
              "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
              "--init-method-std", "0.1"]  # weights large enough that a wrong mapping moves logits by >> 1e-4
# groups stay divisible by 2: the in-place prune runs at TP2, and Megatron-LM loads the result at TP2
TARGETS = ["hidden_size=48", "ffn_hidden_size=96", "num_attention_heads=2", "num_query_groups=2", "num_layers=1"]
ATOL = 1e-4


def minitron(*argv):
    """Our CLI in this process (each command initialises and tears down its own process group)."""
    from megatron_minitron import cli

    rc = cli.main([str(a) for a in argv])
    assert rc == 0, f"minitron {' '.join(map(str, argv))} returned {rc}"


def minitron_torchrun(nproc, *argv):
    """`torchrun -m megatron_minitron.cli ARGV` on nproc CPU ranks, forked from one process that imported torch
    and megatron-core once (tests/fork_ranks.py gives them torchrun's worker environment)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)  # set by the in-process runs
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "fork_ranks.py"), str(nproc),
                           "-m", "megatron_minitron.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT, start_new_session=True)
    if proc.returncode != 0:
        pytest.fail(f"torchrun minitron {' '.join(map(str, argv))} failed:\n{(proc.stdout + proc.stderr)[-6000:]}")


def megatron_lm(op, root, nproc, dump, *flags, **opts):
    """Megatron-LM (harness.py) writes or loads ROOT; returns (its output, the dump)."""
    out, (loaded,) = megatron_lm_runs(nproc, [(op, root, dump, flags, opts)])
    return out, loaded


def megatron_lm_runs(nproc, runs):
    """Several harness runs [(op, root, dump, flags, opts)] in one launch; returns (output, [dump, ...])."""
    argv = []
    for op, root, dump, flags, opts in runs:
        extra = [x for k, v in opts.items() for x in ((f"--{k.replace('_', '-')}",) + (() if v is True else (v,)))]
        argv += [*(["--then"] if argv else []), op, root, "--dump", dump, *extra, "--", *flags]
    out = torchrun(os.path.join(HERE, "harness.py"), nproc, *argv, timeout=600)
    assert "Unable to load" not in out, out[-4000:]
    loads = sum(op == "load" for op, *_ in runs)  # none may say "... will start from random"
    assert out.count("successfully loaded checkpoint") == loads and "start from random" not in out, out[-4000:]
    dumps = []
    for op, root, dump, *_ in runs:
        assert os.path.exists(dump), f"Megatron-LM {op} {root} exited without finishing (sys.exit?):\n{out[-4000:]}"
        dumps.append(torch.load(dump, weights_only=False))
    return out, dumps


def file_tensors(root):
    """The model / optimizer tensors of the checkpoint the root's tracker names, read by plain DCP."""
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        tracker = f.read().strip()
    name = "release" if tracker == "release" else f"iter_{int(tracker):07d}"
    tensors = harness.read_checkpoint_tensors(os.path.join(root, name))
    return tracker, tensors


def assert_tensors_equal(actual, expected, what):
    assert set(actual) == set(expected), f"{what}: keys differ: {set(actual) ^ set(expected)}"
    for key in expected:
        assert torch.equal(actual[key].float(), expected[key].float()), f"{what}: {key} differs"


def model_keys(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}


def our_logits(path):
    """Full logits on harness.fixed_tokens() with our loader and model builder (TP1)."""
    from megatron_minitron import checkpoint
    from megatron_minitron.config import Parallel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import destroy, init_distributed

    init_distributed(1, 1)
    try:
        arch = checkpoint.read_arch(path)
        model = build_gpt(arch, Parallel()).eval()
        checkpoint.load_weights(path, [model], arch=arch)
        tokens = harness.fixed_tokens()
        with torch.no_grad():
            return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()
    finally:
        destroy()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A sentencepiece tokenizer (Megatron-LM's GPTSentencePieceTokenizer reads it) and data made with it."""
    out = tmp_path_factory.mktemp("data")
    minitron("preprocess", "--corpus", "stdlib", "--corpus-bytes", "120000", "--train-tokenizer", "--vocab-size",
             VOCAB, "--output-prefix", out / "stdlib")
    return {"train": str(out / "stdlib_train"), "valid": str(out / "stdlib_valid"),
            "tokenizer": str(out / "stdlib_train.spm.model")}


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """SRC: written by Megatron-LM at TP2 after one train step (iter_0000007, tracker "7")."""
    work = tmp_path_factory.mktemp("megatron_lm")
    root, dump = str(work / "src"), str(work / "src.pt")
    megatron_lm("write", root, 2, dump, *ARCH_FLAGS, "--tensor-model-parallel-size", "2",
                "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", corpus["tokenizer"],
                iteration=SOURCE_ITERATION)
    written = torch.load(dump, weights_only=False)
    tracker, tensors = file_tensors(root)
    assert tracker == str(SOURCE_ITERATION)
    assert_tensors_equal(model_keys(tensors), written["tensors"], "Megatron-LM's save vs its model")
    return {"root": root, "written": written, "tensors": tensors}


def test_our_reading_of_a_megatron_lm_checkpoint(source, corpus):
    from megatron_minitron import checkpoint

    meta = checkpoint.read_metadata(source["root"])
    assert meta["iteration"] == SOURCE_ITERATION
    arch = meta["architecture"]
    assert (arch["num_layers"], arch["hidden_size"], arch["ffn_hidden_size"], arch["num_attention_heads"],
            arch["num_query_groups"], arch["seq_length"]) == (2, 64, 128, 4, 2, SEQ)
    assert (arch["normalization"], arch["activation"], arch["position_embedding"], arch["tie_embeddings"],
            arch["add_bias_linear"]) == ("RMSNorm", "swiglu", "rope", False, False)
    assert arch["vocab_size"] == VOCAB  # the sentencepiece model's size, = Megatron-LM's padded_vocab_size
    assert os.path.samefile(meta["tokenizer"]["path"], corpus["tokenizer"])
    assert torch.allclose(our_logits(source["root"]), source["written"]["logits"], atol=ATOL, rtol=0)


def test_description_of_a_megatron_lm_checkpoint(source, corpus):
    """checkpoint.describe_checkpoint of what Megatron-LM wrote, against the args its run used (its dump)."""
    from megatron_minitron import checkpoint

    args = source["written"]["args"]
    info = checkpoint.describe_checkpoint(source["root"])
    assert info.format == "megatron-lm" and info.directory == os.path.join(source["root"], "iter_0000007")
    assert info.iteration == SOURCE_ITERATION == source["written"]["iteration"]
    saved = info.layout
    assert (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size, saved.data_parallel_size,
            saved.world_size) == (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"],
                                  args["data_parallel_size"], args["world_size"]) == (2, 1, 1, 2)
    assert saved.layers_per_stage == ((args["num_layers"],),) and saved.model_chunks == 1
    assert (info.arch.num_layers, info.arch.hidden_size, info.arch.num_query_groups, info.arch.vocab_size) == (
        args["num_layers"], args["hidden_size"], args["num_query_groups"], args["padded_vocab_size"])
    assert info.params_dtype == str(args["params_dtype"]).replace("torch.", "") == "float32"
    assert info.torch_dtype() is torch.float32
    # one train step with Adam and a scheduler, RNG saved (Megatron-LM's defaults), in iter_0000007
    assert info.contents.optimizer and info.contents.scheduler and info.contents.rng and not info.contents.release
    assert not info.weights_only and info.contents.optimizer_sharding == "per_parameter"
    assert info.tokenizer["type"] == "sentencepiece" and os.path.samefile(info.tokenizer_path, corpus["tokenizer"])
    assert info.provenance["written_by"] == "Megatron-LM" and info.megatron_core is None


def check_pruned_slices(pruned, src, plan):
    """Tensors that pruning only slices (no head merging) are SRC's rows/columns named by the plan."""
    hidden = torch.tensor(plan["hidden"])
    layers = plan["kept_layers"]
    assert torch.equal(pruned["embedding.word_embeddings.weight"], src["embedding.word_embeddings.weight"][:, hidden])
    assert torch.equal(pruned["output_layer.weight"], src["output_layer.weight"][:, hidden])
    assert torch.equal(pruned["decoder.final_layernorm.weight"], src["decoder.final_layernorm.weight"][hidden])
    ffn = src["decoder.layers.mlp.linear_fc2.weight"].shape[-1]
    for new, old in enumerate(layers):
        neurons = torch.tensor(plan["neurons"][old])
        fc2 = src["decoder.layers.mlp.linear_fc2.weight"][old][hidden][:, neurons]
        assert torch.equal(pruned["decoder.layers.mlp.linear_fc2.weight"][new], fc2)
        fc1 = src["decoder.layers.mlp.linear_fc1.weight"][old]  # [gate; up] x hidden, TP-independent
        fc1 = torch.cat([fc1[:ffn][neurons], fc1[ffn:][neurons]])[:, hidden]
        assert torch.equal(pruned["decoder.layers.mlp.linear_fc1.weight"][new], fc1)
        for norm in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"):
            key = f"decoder.layers.{norm}"
            assert torch.equal(pruned[key][new], src[key][old][hidden]), key


def test_pruned_at_tp1_and_in_place_at_tp2_load_in_megatron_lm(source, corpus, tmp_path):
    from megatron_minitron import checkpoint

    save, in_place, scores = str(tmp_path / "pruned"), str(tmp_path / "in_place"), str(tmp_path / "scores.pt")
    common = ["--data", corpus["train"], "--scores", scores, "--num-samples", "8", "--micro-batch-size", "2",
              "--seq-length", SEQ, "--target", *TARGETS]
    minitron("prune", "--load", source["root"], "--save", save, "--save-format", "megatron-lm", *common)
    shutil.copytree(source["root"], in_place)
    minitron_torchrun(2, "prune", "--load", in_place, "--in-place", "--tp", "2", *common)  # same scores

    # only what the tracker names is left in the in-place root (hidden files: our writer lock)
    tracker, in_place_files = file_tensors(in_place)
    named = "release" if tracker == "release" else f"iter_{int(tracker):07d}"
    assert sorted(n for n in os.listdir(in_place) if not n.startswith(".")) == sorted(
        ["latest_checkpointed_iteration.txt", named])
    tracker_save, save_files = file_tensors(save)
    assert tracker_save == tracker
    assert_tensors_equal(model_keys(in_place_files), model_keys(save_files),
                         "prune --in-place at TP2 vs --save at TP1")
    with open(os.path.join(save, named, "prune_plan.json")) as f:
        check_pruned_slices(save_files, source["tensors"], json.load(f))

    ours = our_logits(save)
    # one launch of 2 ranks: Megatron-LM loads each at the other TP (TP1 here runs DP2)
    runs = [("load", root, str(tmp_path / f"{os.path.basename(root)}.pt"), ["--tensor-model-parallel-size", tp], {})
            for root, tp in ((save, 2), (in_place, 1))]
    _, dumps = megatron_lm_runs(2, runs)
    for (_, root, *_), loaded in zip(runs, dumps):
        args = loaded["args"]
        built = [args[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                   "num_query_groups", "kv_channels", "padded_vocab_size")]
        assert built == [1, 48, 96, 2, 2, 16, VOCAB], built  # Megatron-LM's model, from our args
        # Megatron-LM reads the iteration we record (--in-place keeps the source's)
        assert loaded["checkpoint_iteration"] == checkpoint.read_metadata(root)["iteration"]
        if root == in_place:
            assert loaded["checkpoint_iteration"] == SOURCE_ITERATION
        # a weights-only checkpoint: Megatron-LM starts at 0 for a release, else at the recorded iteration
        assert loaded["iteration"] == (0 if tracker == "release" else SOURCE_ITERATION)
        assert_tensors_equal(loaded["tensors"], model_keys(save_files), f"Megatron-LM's load of {root}")
        assert torch.allclose(loaded["logits"], ours, atol=ATOL, rtol=0), (loaded["logits"] - ours).abs().max()


def test_hf_export_and_import_round_trip_through_megatron_lm(source, corpus, tmp_path):
    hf_dir, imported, imported_ours = (str(tmp_path / n) for n in ("hf", "imported", "imported_ours"))
    minitron("convert", "mcore-to-hf", "--input", source["root"], "--output", hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert len(tokenizer) == VOCAB
    with torch.no_grad():
        hf = model(input_ids=harness.fixed_tokens()).logits.float()
    megatron_written = source["written"]["logits"]
    assert torch.allclose(hf, megatron_written[..., :hf.shape[-1]], atol=ATOL, rtol=0), \
        (hf - megatron_written[..., :hf.shape[-1]]).abs().max()

    minitron("convert", "hf-to-mcore", "--input", hf_dir, "--output", imported, "--format", "megatron-lm",
             "--dtype", "fp32")
    minitron("convert", "hf-to-mcore", "--input", hf_dir, "--output", imported_ours, "--dtype", "fp32")
    out, loaded = megatron_lm("load", imported, 2, str(tmp_path / "imported.pt"), "--tensor-model-parallel-size", 2)
    _, files = file_tensors(imported)
    assert_tensors_equal(loaded["tensors"], model_keys(files), "Megatron-LM's load of our import")
    assert_tensors_equal(loaded["tensors"], source["written"]["tensors"], "SRC -> HF -> Megatron-LM format")
    assert torch.allclose(loaded["logits"][..., :hf.shape[-1]], hf, atol=ATOL, rtol=0)

    losses = []
    for path in (source["root"], imported, imported_ours):
        minitron("eval", "--load", path, "--data", corpus["valid"], "--num-samples", "4", "--seq-length", SEQ,
                 "--micro-batch-size", "2", "--output", tmp_path / "eval.json")
        with open(tmp_path / "eval.json") as f:
            losses.append(json.load(f)["lm"]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0] == pytest.approx(losses[2], abs=1e-5), losses


def first_iteration(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return next(m for m in map(json.loads, filter(str.strip, f)) if m.get("iteration") == 1)


def test_distill_and_train_load_read_megatron_lm_and_megatron_lm_resumes_our_save(source, corpus, tmp_path):
    save, trained = str(tmp_path / "distilled"), str(tmp_path / "trained")
    run = [f"data.train_data=[{corpus['train']}]", f"data.valid_data=[{corpus['valid']}]", "data.micro_batch_size=2",
           "data.global_batch_size=2", f"data.cache_dir={tmp_path / 'cache'}", "train.eval_interval=0",
           "train.lr=1e-3", "train.lr_warmup_iters=1", "train.log_interval=1",
           "model.hidden_dropout=0.0", "model.attention_dropout=0.0"]  # no dropout: the student is the teacher
    minitron("distill", *run, "train.train_iters=2", f"distill.teacher={source['root']}",
             f"distill.student={source['root']}", "distill.lm_loss_weight=1.0",
             f"train.save={save}", "train.save_format=megatron-lm", "parallel.use_distributed_optimizer=false")
    first = first_iteration(save)
    assert first["kd_loss"] == pytest.approx(0.0, abs=1e-6), first  # teacher and student read the same weights
    assert first["grad_norm"] > 0  # the LM loss moves the student, so the optimizer state is not zero
    # train.load (architecture from the Megatron-LM checkpoint): the same first step as the distilled student
    minitron("train", *run, "train.train_iters=1", f"train.load={source['root']}", f"train.save={trained}")
    plain = first_iteration(trained)
    assert (plain["lm_loss"], plain["grad_norm"]) == pytest.approx((first["lm_loss"], first["grad_norm"]), rel=1e-6)

    tracker, files = file_tensors(save)
    assert tracker == "2"
    # resumed with the run's hyperparameters (Megatron-LM checks its scheduler's settings against the saved ones)
    out, loaded = megatron_lm("load", save, 1, str(tmp_path / "distilled.pt"), "--lr", "1e-3", "--min-lr", "3e-5",
                              "--lr-warmup-iters", "1", "--train-iters", "2", "--weight-decay", "0.01",
                              "--adam-beta2", "0.95", check_rng=True)
    assert loaded["iteration"] == 2 and loaded["checkpoint_iteration"] == 2
    assert "Rerun state will be ignored" not in out, out[-3000:]
    # our rng_state is what Megatron-LM's load requests and restores (load_checkpoint itself skips it here:
    # a CPU-made save says no_save_rng, its generator states would not fit a GPU)
    rng = loaded["rng"]
    assert isinstance(rng, dict), rng
    assert rng["keys"] == ["cuda_rng_state", "np_rng_state", "random_rng_state", "rng_tracker_states",
                           "torch_rng_state"], rng
    assert rng["tracker"] == rng["megatron_lm_tracker"], rng  # the same model-parallel generators
    assert rng["cuda_rng_state"] == (torch.uint8, (16,)), rng  # a CUDA (Philox: seed, offset) state
    assert_tensors_equal(loaded["tensors"], model_keys(files), "Megatron-LM's load of our distill save")
    assert loaded["optimizer"] is not None, "Megatron-LM did not load the optimizer state"
    optimizer_files = {k: v for k, v in files.items() if k.startswith("optimizer.")}
    assert_tensors_equal(loaded["optimizer"], optimizer_files, "Megatron-LM's optimizer state")
    assert any(v.abs().sum() > 0 for k, v in optimizer_files.items() if ".exp_avg_sq." in k)
    assert loaded["scheduler"]["num_steps"] == 2 * 2  # iterations x global batch (Megatron-LM counts samples)
    assert torch.allclose(loaded["logits"], our_logits(save), atol=ATOL, rtol=0)


def test_bf16_distributed_optimizer_checkpoint_reads_and_exports(corpus, tmp_path):
    """The usual pretrain_gpt.py setting (--bf16 --use-distributed-optimizer): its flattened optimizer state is
    skipped, its bf16 weights give our model (fp32 compute) Megatron-LM's logits within bf16 rounding, and the
    HF export keeps them."""
    from megatron_minitron import checkpoint

    root, dump = str(tmp_path / "bf16"), str(tmp_path / "bf16.pt")
    _, written = megatron_lm("write", root, 2, dump, *ARCH_FLAGS, "--tensor-model-parallel-size", "2", "--bf16",
                             "--use-distributed-optimizer", "--tokenizer-type", "GPTSentencePieceTokenizer",
                             "--tokenizer-model", corpus["tokenizer"], iteration=3)
    meta = checkpoint.read_metadata(root)
    assert meta["iteration"] == 3 and meta["contents"]["params_dtype"] == "bfloat16"
    _, files = file_tensors(root)
    assert any(k.startswith("optimizer.distributed.") for k in files)  # Megatron-LM's distributed layout
    assert_tensors_equal(written["tensors"], model_keys(files), "Megatron-LM's bf16 save vs its model")
    bf16_tolerance = 3e-2 * written["logits"].abs().max().item()
    ours = our_logits(root)
    assert torch.allclose(ours, written["logits"], atol=bf16_tolerance, rtol=0), \
        (ours - written["logits"]).abs().max()

    hf_dir = str(tmp_path / "hf")
    minitron("convert", "mcore-to-hf", "--input", root, "--output", hf_dir, "--dtype", "fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        hf = model(input_ids=harness.fixed_tokens()).logits.float()
    assert torch.allclose(hf, ours[..., :hf.shape[-1]], atol=ATOL, rtol=0)  # the same bf16 weights, fp32 compute
