"""Checkpoints in and out of NVIDIA Megatron-LM, checked with Megatron-LM's own code (vendored, see harness.py).

One Megatron-LM launch (TP2, 2 ranks, a real train step each) writes SRC and SRC_QK (SRC with Qwen3's
--qk-layernorm and --kv-channels 32 != hidden / heads) the way `pretrain_gpt.py --ckpt-format torch_dist` does,
norm weights moved off 1 first (harness.perturb_norms: the step runs at learning rate 0); then:
  * reading: checkpoint.read_metadata / describe_checkpoint of SRC and SRC_QK against the args Megatron-LM ran
    with, and our logits equal Megatron-LM's.
  * prune: `minitron prune --save` at TP1 and `--in-place --tp 2` on a copy (same scores), and `--save` of
    SRC_QK (heads, a query group, hidden, ffn, layers) -> Megatron-LM's load_checkpoint (default flags,
    architecture from the checkpoint's args; --qk-layernorm for SRC_QK's) loads each at the other TP / at TP1
    (all in one 2-rank launch); the loaded tensors are the ones in the files (plain
    torch.distributed.checkpoint), the same for both prunes of SRC, the slices of the source that
    prune_plan.json names (q/k layernorms uncut); logits equal ours; iteration as recorded.
  * HF: `convert mcore-to-hf` of SRC (llama) and of SRC_QK (qwen3) gives transformers logits equal to
    Megatron-LM's; `convert hf-to-mcore --format megatron-lm` of each export is loaded by Megatron-LM (one
    launch) with the source's exact tensors and the same logits; `minitron eval` gives the same LM loss on
    SRC, on that import and on a minitron-format import.
  * distill: teacher = student = SRC gives KD loss 0 at the first step (both roles read the same weights), and
    the LM loss and gradient norm of `train.load=SRC`'s first step; its save (train.save_format=megatron-lm,
    with LM loss so the optimizer state is not zero) is resumed by Megatron-LM with its optimizer state and
    scheduler, at the saved iteration; its rng_state is what Megatron-LM's load requests and restores.
  * bf16 + --use-distributed-optimizer (the usual pretrain_gpt.py setting): our reading and HF export.
Megatron-LM loads run fp32 with the non-distributed optimizer: megatron-core 0.16.1 without Apex/TE cannot load
a distributed-optimizer checkpoint (DistributedOptimizer.state_dict asserts on an empty torch Adam state).
Each Megatron-LM launch costs ~10 s of imports per rank; the qk cases add runs to existing launches, no launch
of their own.
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
# Qwen3's shape: per-head q/k RMSNorm, head_dim != hidden / heads (32 vs 16 here; 32 vs 48 / 1 once pruned)
QK_HEAD_DIM = 32
QK_ARCH_FLAGS = [*ARCH_FLAGS, "--qk-layernorm", "--kv-channels", str(QK_HEAD_DIM)]
# cuts a query group and a head of the kept one (merged into it); loaded at TP1
QK_TARGETS = ["hidden_size=48", "ffn_hidden_size=96", "num_attention_heads=1", "num_query_groups=1", "num_layers=1"]
# the architecture Megatron-LM's --use-checkpoint-args does not restore: Llama-4 / SmolLM3-style layers without
# RoPE (every 2nd: layer 2 of 2), Llama-3.1 rope scaling, a norm epsilon other than its default (Qwen's 1e-6)
NOPE_ARCH_FLAGS = [*ARCH_FLAGS, "--no-rope-freq", "2", "--use-rope-scaling", "--rope-scaling-factor", "8",
                   "--norm-epsilon", "1e-6"]
NORM_NOISE = 0.2  # norm weights := 1 + N(0, 0.2) in Megatron-LM before it saves (harness.perturb_norms)
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


def our_logits(path, arch=None):
    """Full logits on harness.fixed_tokens() with our loader and model builder (TP1); ``arch``: build this one
    instead of the checkpoint's (the weights are loaded unchecked against it)."""
    from megatron_minitron import checkpoint
    from megatron_minitron.config import Parallel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import destroy, init_distributed

    init_distributed(1, 1)
    try:
        model = build_gpt(arch or checkpoint.read_arch(path), Parallel()).eval()
        checkpoint.load_weights(path, [model], arch=None if arch else checkpoint.read_arch(path))
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
def sources(corpus, tmp_path_factory):
    """SRC and SRC_QK, written in one launch by Megatron-LM at TP2 after one train step (iter_0000007, tracker
    "7"), norm weights away from 1 (harness.perturb_norms)."""
    work = tmp_path_factory.mktemp("megatron_lm")
    tokenizer = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", corpus["tokenizer"]]
    opts = {"iteration": SOURCE_ITERATION, "norm_noise": NORM_NOISE}
    runs = [("write", str(work / name), str(work / f"{name}.pt"), [*flags, "--tensor-model-parallel-size", "2",
                                                                   *tokenizer], opts)
            for name, flags in (("src", ARCH_FLAGS), ("src_qk", QK_ARCH_FLAGS), ("src_nope", NOPE_ARCH_FLAGS))]
    _, dumps = megatron_lm_runs(2, runs)
    out = {}
    for (_, root, *_), written in zip(runs, dumps):
        tracker, tensors = file_tensors(root)
        assert tracker == str(SOURCE_ITERATION)
        assert_tensors_equal(model_keys(tensors), written["tensors"], f"Megatron-LM's save of {root} vs its model")
        out[os.path.basename(root)] = {"root": root, "written": written, "tensors": tensors}
    norms = [v for k, v in model_keys(out["src_qk"]["tensors"]).items() if "layernorm" in k or "layer_norm" in k]
    assert len(norms) == 5 and all((v - 1).abs().min() > 0 for v in norms)  # incl. q/k layernorms, all moved
    return out


@pytest.fixture(scope="module")
def source(sources):
    return sources["src"]


@pytest.fixture(scope="module")
def source_qk(sources):
    """SRC_QK: SRC with Qwen3's --qk-layernorm and --kv-channels 32 (!= hidden / heads = 16)."""
    return sources["src_qk"]


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


def test_our_reading_of_a_qk_layernorm_checkpoint(source_qk):
    """Megatron-LM's --qk-layernorm (its Qwen3 recipes) with --kv-channels: read as such, Megatron-LM's logits."""
    from megatron_minitron import checkpoint

    args = source_qk["written"]["args"]
    assert args["qk_layernorm"] and args["kv_channels"] == QK_HEAD_DIM  # what Megatron-LM ran with
    arch = checkpoint.read_metadata(source_qk["root"])["architecture"]
    assert (arch["qk_layernorm"], arch["kv_channels"], arch["num_attention_heads"], arch["hidden_size"]) == (
        True, QK_HEAD_DIM, 4, 64)
    info = checkpoint.describe_checkpoint(source_qk["root"])
    assert info.arch.qk_layernorm and info.arch.head_dim == QK_HEAD_DIM
    assert info.layout.tensor_model_parallel_size == 2 and info.format == "megatron-lm"
    assert torch.allclose(our_logits(source_qk["root"]), source_qk["written"]["logits"], atol=ATOL, rtol=0)


def test_our_reading_of_a_no_rope_freq_checkpoint(sources):
    """Megatron-LM's --no-rope-freq 2 (the second layer's attention skips RoPE) with Llama-3.1 rope scaling and
    epsilon 1e-6: read as megatron-core expands it (no_rope_freq [0, 1]), Megatron-LM's logits; the same weights
    with every layer rotating give other ones."""
    import dataclasses

    from megatron_minitron import checkpoint

    source = sources["src_nope"]
    assert source["written"]["args"]["no_rope_freq"] == 2  # what Megatron-LM ran with (expanded in its config)
    info = checkpoint.describe_checkpoint(source["root"])
    assert info.arch.no_rope_freq == [0, 1]
    assert (info.arch.rope_scaling, info.arch.rope_scaling_factor, info.arch.norm_epsilon) == (True, 8.0, 1e-6)
    assert torch.allclose(our_logits(source["root"]), source["written"]["logits"], atol=ATOL, rtol=0)
    rotating = our_logits(source["root"], arch=dataclasses.replace(info.arch, no_rope_freq=None))
    assert (rotating - source["written"]["logits"]).abs().max() > 100 * ATOL


def check_pruned_slices(pruned, src, plan, head_dim):
    """Pruned tensors are SRC's rows/columns that prune_plan.json names (global, TP-independent layouts as
    torch_dist stores them): linear_qkv per query group [its q heads, k, v] of head_dim rows each, linear_proj
    head_dim columns per head, where a kept head's columns also sum those of the pruned heads merged into it
    (plan["head_merge"]); q/k layernorms (one head's channels) are never cut."""
    hidden = torch.tensor(plan["hidden"])
    layers = plan["kept_layers"]
    d, hpg = head_dim, plan["source"]["num_attention_heads"] // (plan["source"]["num_query_groups"]
                                                                 or plan["source"]["num_attention_heads"])
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
        qkv = src["decoder.layers.self_attention.linear_qkv.weight"][old].unflatten(0, (-1, hpg + 2, d))
        kept = [(g, sorted(heads)) for g, heads in sorted(zip(plan["groups"][old], plan["heads"][old]))]
        rows = [torch.cat([qkv[g, [h - g * hpg for h in heads]], qkv[g, hpg:]]) for g, heads in kept]
        assert torch.equal(pruned["decoder.layers.self_attention.linear_qkv.weight"][new],
                           torch.cat(rows).flatten(0, 1)[:, hidden])
        proj = src["decoder.layers.self_attention.linear_proj.weight"][old].unflatten(1, (-1, d)).clone()
        for p, k in plan["head_merge"][old]:
            proj[:, k] += proj[:, p]
        heads = sorted(h for _, hs in kept for h in hs)
        assert torch.allclose(pruned["decoder.layers.self_attention.linear_proj.weight"][new],
                              proj[hidden][:, heads].flatten(1), atol=1e-6, rtol=0)
        for norm in ("q_layernorm", "k_layernorm"):
            key = f"decoder.layers.self_attention.{norm}.weight"
            assert (key in pruned) == (key in src), key
            if key in src:
                assert torch.equal(pruned[key][new], src[key][old]), key


def test_pruned_at_tp1_and_in_place_at_tp2_load_in_megatron_lm(source, source_qk, corpus, tmp_path):
    """Also SRC_QK pruned at TP1 (heads, a query group, hidden, ffn, layers), loaded by Megatron-LM in the same
    launch with --qk-layernorm: its --use-checkpoint-args does not restore that flag, and without it Megatron-LM
    builds no q/k norms and leaves the stored ones unread, without a message (as for its own checkpoints)."""
    from megatron_minitron import checkpoint

    save, in_place, qk_save = str(tmp_path / "pruned"), str(tmp_path / "in_place"), str(tmp_path / "pruned_qk")
    scores = str(tmp_path / "scores.pt")
    common = ["--data", corpus["train"], "--num-samples", "8", "--micro-batch-size", "2", "--seq-length", SEQ]
    minitron("prune", "--load", source["root"], "--save", save, "--save-format", "megatron-lm", "--scores", scores,
             *common, "--target", *TARGETS)
    shutil.copytree(source["root"], in_place)
    minitron_torchrun(2, "prune", "--load", in_place, "--in-place", "--tp", "2", "--scores", scores, *common,
                      "--target", *TARGETS)  # same scores
    minitron("prune", "--load", source_qk["root"], "--save", qk_save, "--save-format", "megatron-lm", "--scores",
             str(tmp_path / "scores_qk.pt"), *common, "--target", *QK_TARGETS)

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
        check_pruned_slices(save_files, source["tensors"], json.load(f), head_dim=16)
    tracker_qk, qk_files = file_tensors(qk_save)
    assert tracker_qk == tracker
    with open(os.path.join(qk_save, named, "prune_plan.json")) as f:
        qk_plan = json.load(f)
    assert qk_plan["head_merge"][qk_plan["kept_layers"][0]], qk_plan  # the cut head of the kept group is merged
    check_pruned_slices(qk_files, source_qk["tensors"], qk_plan, head_dim=QK_HEAD_DIM)
    assert {k for k in qk_files if ".self_attention." in k and "_layernorm." in k} == {
        f"decoder.layers.self_attention.{n}_layernorm.weight" for n in "qk"}

    expected = {save: ([1, 48, 96, 2, 2, 16, VOCAB], save_files), in_place: ([1, 48, 96, 2, 2, 16, VOCAB], save_files),
                qk_save: ([1, 48, 96, 1, 1, QK_HEAD_DIM, VOCAB], qk_files)}
    ours = {root: our_logits(root) for root in (save, qk_save)}
    ours[in_place] = ours[save]
    # one launch of 2 ranks: Megatron-LM loads each at the other TP (TP1 here runs DP2); SRC_QK's prune has one
    # query group, so TP1
    runs = [("load", root, str(tmp_path / f"{os.path.basename(root)}.pt"), ["--tensor-model-parallel-size", tp,
                                                                            *extra], {})
            for root, tp, extra in ((save, 2, []), (in_place, 1, []), (qk_save, 1, ["--qk-layernorm"]))]
    _, dumps = megatron_lm_runs(2, runs)
    for (_, root, *_), loaded in zip(runs, dumps):
        args = loaded["args"]
        built = [args[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                   "num_query_groups", "kv_channels", "padded_vocab_size")]
        shape, files = expected[root]
        assert built == shape, (root, built)  # Megatron-LM's model, from our args
        assert args["qk_layernorm"] == (root == qk_save)
        # Megatron-LM reads the iteration we record (--in-place keeps the source's)
        assert loaded["checkpoint_iteration"] == checkpoint.read_metadata(root)["iteration"]
        if root == in_place:
            assert loaded["checkpoint_iteration"] == SOURCE_ITERATION
        # a weights-only checkpoint: Megatron-LM starts at 0 for a release, else at the recorded iteration
        assert loaded["iteration"] == (0 if tracker == "release" else SOURCE_ITERATION)
        assert_tensors_equal(loaded["tensors"], model_keys(files), f"Megatron-LM's load of {root}")
        assert torch.allclose(loaded["logits"], ours[root], atol=ATOL, rtol=0), \
            (root, (loaded["logits"] - ours[root]).abs().max())
    # Megatron-LM's loaded q/k layernorms are SRC_QK's (check_pruned_slices: the files hold SRC_QK's)
    for n in "qk":
        key = f"decoder.layers.self_attention.{n}_layernorm.weight"
        assert torch.equal(dumps[2]["tensors"][key][0], source_qk["tensors"][key][qk_plan["kept_layers"][0]])


def test_our_save_loads_in_megatron_lm_with_the_flags_the_save_names(sources, corpus, tmp_path):
    """SRC_NOPE pruned (width) to Megatron-LM format: Megatron-LM loads it with the flags the save's warning
    names and gives our logits; with --use-checkpoint-args alone it rotates every layer, with plain RoPE and
    its default epsilon (other logits, no error), which is why the save warns."""
    from megatron_minitron import checkpoint
    from megatron_minitron.checkpoint import megatron_lm as mlm

    save = str(tmp_path / "pruned_nope")
    with pytest.warns(UserWarning, match="with: --use-rope-scaling --rope-scaling-factor 8.0 --norm-epsilon 1e-06 "
                                         "--no-rope-freq 2$"):
        minitron("prune", "--load", sources["src_nope"]["root"], "--save", save, "--save-format", "megatron-lm",
                 "--data", corpus["train"], "--num-samples", "8", "--micro-batch-size", "2", "--seq-length", SEQ,
                 "--target", "ffn_hidden_size=96")
    arch = checkpoint.read_arch(save)
    assert arch.no_rope_freq == [0, 1]
    runs = [("load", save, str(tmp_path / f"{name}.pt"), ["--tensor-model-parallel-size", 1, *extra], {})
            for name, extra in (("flag", mlm.load_flags(arch)), ("args_only", []))]
    _, (with_flag, args_only) = megatron_lm_runs(2, runs)
    ours = our_logits(save)
    assert torch.allclose(with_flag["logits"], ours, atol=ATOL, rtol=0), (with_flag["logits"] - ours).abs().max()
    assert with_flag["args"]["layernorm_epsilon"] == 1e-6 and with_flag["args"]["use_rope_scaling"]
    not_restored = args_only["args"]  # from the checkpoint's args, where we wrote them
    assert (not_restored["no_rope_freq"], not_restored["use_rope_scaling"], not_restored["layernorm_epsilon"]) == (
        None, False, 1e-5)
    assert (args_only["logits"] - ours).abs().max() > 100 * ATOL


def hf_logits(hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        return model, model(input_ids=harness.fixed_tokens()).logits.float()


def test_hf_export_and_import_round_trip_through_megatron_lm(source, source_qk, corpus, tmp_path):
    """SRC and SRC_QK (exported as qwen3: transformers' Qwen3ForCausalLM) both ways; both imports are loaded by
    Megatron-LM in one launch."""
    hf_dir, imported, imported_ours = (str(tmp_path / n) for n in ("hf", "imported", "imported_ours"))
    hf_qk, imported_qk = str(tmp_path / "hf_qk"), str(tmp_path / "imported_qk")
    minitron("convert", "mcore-to-hf", "--input", source["root"], "--output", hf_dir)
    _, hf = hf_logits(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert len(tokenizer) == VOCAB
    megatron_written = source["written"]["logits"]
    assert torch.allclose(hf, megatron_written[..., :hf.shape[-1]], atol=ATOL, rtol=0), \
        (hf - megatron_written[..., :hf.shape[-1]]).abs().max()

    minitron("convert", "mcore-to-hf", "--input", source_qk["root"], "--output", hf_qk)
    with open(os.path.join(hf_qk, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["architectures"], config["head_dim"], config["hidden_size"]) == (
        "qwen3", ["Qwen3ForCausalLM"], QK_HEAD_DIM, 64), config
    model_qk, hf_qk_logits = hf_logits(hf_qk)
    assert type(model_qk).__name__ == "Qwen3ForCausalLM"
    for n in "qk":  # the exported per-head norms are Megatron-LM's
        assert torch.equal(model_qk.model.layers[1].self_attn.get_submodule(f"{n}_norm").weight.float(),
                           source_qk["tensors"][f"decoder.layers.self_attention.{n}_layernorm.weight"][1])
    qk_written = source_qk["written"]["logits"]
    assert torch.allclose(hf_qk_logits, qk_written[..., :hf_qk_logits.shape[-1]], atol=ATOL, rtol=0), \
        (hf_qk_logits - qk_written[..., :hf_qk_logits.shape[-1]]).abs().max()

    for src_dir, out_dir in ((hf_dir, imported), (hf_qk, imported_qk)):
        minitron("convert", "hf-to-mcore", "--input", src_dir, "--output", out_dir, "--format", "megatron-lm",
                 "--dtype", "fp32")
    minitron("convert", "hf-to-mcore", "--input", hf_dir, "--output", imported_ours, "--dtype", "fp32")
    runs = [("load", imported, str(tmp_path / "imported.pt"), ["--tensor-model-parallel-size", 2], {}),
            ("load", imported_qk, str(tmp_path / "imported_qk.pt"), ["--tensor-model-parallel-size", 2,
                                                                    "--qk-layernorm"], {})]
    _, (loaded, loaded_qk) = megatron_lm_runs(2, runs)
    for root, got, src, logits in ((imported, loaded, source, hf), (imported_qk, loaded_qk, source_qk, hf_qk_logits)):
        _, files = file_tensors(root)
        assert_tensors_equal(got["tensors"], model_keys(files), f"Megatron-LM's load of our import {root}")
        assert_tensors_equal(got["tensors"], src["written"]["tensors"], f"{src['root']} -> HF -> Megatron-LM format")
        assert torch.allclose(got["logits"][..., :logits.shape[-1]], logits, atol=ATOL, rtol=0)
    assert loaded_qk["args"]["kv_channels"] == QK_HEAD_DIM  # from our args (--use-checkpoint-args)

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
