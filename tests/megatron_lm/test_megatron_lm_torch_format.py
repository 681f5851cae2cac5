"""Megatron-LM's legacy ``--ckpt-format torch`` checkpoints (one model_optim_rng.pt per model-parallel rank, what
its tools/checkpoint/convert.py writes too), written by Megatron-LM's own save_checkpoint (vendored, harness.py)
and read by megatron_minitron/checkpoint/megatron_lm_torch.py.

One 4-rank Megatron-LM launch writes three sources, norm weights moved off 1 (harness.perturb_norms):
  * TP2PP2: 4 layers, untied embeddings, TP2 x PP2, after a real train step (so with optimizer state);
  * TIED:   2 layers, tied embeddings, TP2 (DP2), after a train step; PP1, so its dump has Megatron-LM's logits;
  * VPP:    4 layers, tied, PP2 with 2 virtual chunks per stage (DP2; files hold model0 / model1, layers
            interleaved over stages, the last stage keeps its copy of the embedding as output_layer).
Then:
  * describe_checkpoint against the args Megatron-LM ran with; a TP1 model loaded from each holds exactly
    Megatron-LM's tensors (its sharded_state_dict gathered by the harness: TP- and PP-independent), and TIED
    gives Megatron-LM's logits, in our model and in transformers after `convert mcore-to-hf`, and the same
    `minitron eval` loss loaded at its saved TP2 (2 ranks) as at TP1;
  * prune of VPP at TP1 (in this process) and at TP2 x PP2 (4 ranks) with the same scores write the same
    tensors, and Megatron-LM's load_checkpoint (default flags) loads that output with our logits;
  * refused with the fix: --in-place, a resume (load_checkpoint with optimizer), a lost rank file, a flipped
    byte in a tensor (the rank files' zip CRC-32s, on load and in `minitron verify`).
"""
import json
import os
import re
import shutil
import sys
import zipfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from test_megatron_lm_checkpoints import (ATOL, NORM_NOISE, SEQ, TARGETS, assert_tensors_equal,  # noqa: E402
                                          corpus, file_tensors, hf_logits, megatron_lm_runs, minitron,
                                          minitron_torchrun, model_keys, our_logits)

assert corpus  # the module fixture (sentencepiece tokenizer + data), used here too

BASE_FLAGS = ["--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
              "--group-query-attention", "--num-query-groups", "2", "--seq-length", str(SEQ),
              "--max-position-embeddings", str(SEQ), "--normalization", "RMSNorm", "--swiglu",
              "--position-embedding-type", "rope", "--disable-bias-linear", "--init-method-std", "0.1",
              "--ckpt-format", "torch"]
SOURCES = {  # name -> (flags, harness options)
    "tp2pp2": (["--num-layers", "4", "--untie-embeddings-and-output-weights", "--tensor-model-parallel-size", "2",
                "--pipeline-model-parallel-size", "2"], {}),
    "tied": (["--num-layers", "2", "--tensor-model-parallel-size", "2"], {}),
    # the interleaved schedule needs as many micro-batches as stages; the harness's step feeds one
    "vpp": (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
             "1"], {"train_steps": 0}),
}
ITERATION = 5


@pytest.fixture(scope="module")
def torch_sources(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("megatron_lm_torch")
    tokenizer = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", corpus["tokenizer"]]
    runs = [("write", str(work / name), str(work / f"{name}.pt"), [*BASE_FLAGS, *flags, *tokenizer],
             {"iteration": ITERATION, "norm_noise": NORM_NOISE, **opts}) for name, (flags, opts) in SOURCES.items()]
    _, dumps = megatron_lm_runs(4, runs)
    out = {}
    for (_, root, *_), written in zip(runs, dumps):
        directory = os.path.join(root, f"iter_{ITERATION:07d}")
        assert any(n.startswith("mp_rank_") for n in os.listdir(directory)), os.listdir(directory)  # torch format
        out[os.path.basename(root)] = {"root": root, "written": written}
    return out


def loaded_tensors(path):
    """Our TP1 model of the checkpoint's arch, loaded from it: its tensors as torch_dist would store them."""
    from megatron_minitron import checkpoint
    from megatron_minitron.config import Parallel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import destroy, init_distributed

    init_distributed(1, 1)
    try:
        arch = checkpoint.read_arch(path)
        model = build_gpt(arch, Parallel()).eval()
        checkpoint.load_weights(path, [model], arch=arch)
        return harness.global_tensors(model.sharded_state_dict())
    finally:
        destroy()


def test_reading_torch_format_checkpoints_gives_megatron_lm_s_tensors_and_logits(torch_sources, corpus, tmp_path):
    from megatron_minitron import checkpoint

    expected_layout = {"tp2pp2": (2, 2, 1, 4, 1, ((2,), (2,))), "tied": (2, 1, 2, 4, 1, ((2,),)),
                       "vpp": (1, 2, 2, 4, 2, ((1, 1), (1, 1)))}
    for name, source in torch_sources.items():
        args = source["written"]["args"]
        info = checkpoint.describe_checkpoint(source["root"])
        assert info.format == "megatron-lm" and info.contents.backend == "torch", name
        assert info.directory == os.path.join(source["root"], f"iter_{ITERATION:07d}") and info.iteration == ITERATION
        layout = info.layout
        assert (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.data_parallel_size,
                layout.world_size, layout.model_chunks, layout.layers_per_stage) == expected_layout[name], name
        assert (info.arch.num_layers, info.arch.hidden_size, info.arch.tie_embeddings, info.arch.vocab_size) == (
            args["num_layers"], 64, not args["untie_embeddings_and_output_weights"], args["padded_vocab_size"])
        assert info.contents.optimizer and info.contents.scheduler and info.contents.rng, name
        assert info.tokenizer["type"] == "sentencepiece" and os.path.samefile(info.tokenizer_path,
                                                                              corpus["tokenizer"])
        assert_tensors_equal(loaded_tensors(source["root"]), source["written"]["tensors"],
                             f"our TP1 load of {name}")
    tied = torch_sources["tied"]
    assert torch.allclose(our_logits(tied["root"]), tied["written"]["logits"], atol=ATOL, rtol=0)
    # at the saved TP2 each rank takes its own file's shards: the same LM loss as the TP1 load
    losses = []
    for launch, tp in ((minitron, []), (lambda *a: minitron_torchrun(2, *a), ["--tp", "2"])):
        out = tmp_path / f"eval{len(losses)}.json"
        launch("eval", "--load", tied["root"], *tp, "--data", corpus["valid"], "--num-samples", "4",
               "--seq-length", SEQ, "--micro-batch-size", "2", "--output", out)
        losses.append(json.loads(out.read_text())["lm"]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5), losses
    hf_dir = str(tmp_path / "hf")
    minitron("convert", "mcore-to-hf", "--input", tied["root"], "--output", hf_dir)
    _, hf = hf_logits(hf_dir)
    assert torch.allclose(hf, tied["written"]["logits"][..., :hf.shape[-1]], atol=ATOL, rtol=0)


def test_prune_of_a_torch_format_checkpoint_at_two_layouts_loads_in_megatron_lm(torch_sources, corpus, tmp_path):
    from megatron_minitron import checkpoint

    source = torch_sources["vpp"]["root"]
    tp1, tp2pp2, scores = str(tmp_path / "tp1"), str(tmp_path / "tp2pp2"), str(tmp_path / "scores.pt")
    common = ["--data", corpus["train"], "--num-samples", "8", "--micro-batch-size", "2", "--seq-length", SEQ,
              "--scores", scores, "--target", *TARGETS[:-1]]  # width: both stages keep layers
    minitron("prune", "--load", source, "--save", tp1, *common)
    minitron_torchrun(4, "prune", "--load", source, "--save", tp2pp2, "--tp", "2", "--pp", "2", *common)
    tracker, files = file_tensors(tp1)  # Megatron-LM's torch_dist: the input's family of formats
    assert file_tensors(tp2pp2)[0] == tracker
    assert_tensors_equal(model_keys(file_tensors(tp2pp2)[1]), model_keys(files), "prune at TP2 x PP2 vs TP1")
    assert (checkpoint.read_arch(tp1).hidden_size, checkpoint.read_arch(tp1).tie_embeddings) == (48, True)

    _, (loaded,) = megatron_lm_runs(2, [("load", tp1, str(tmp_path / "loaded.pt"), ["--tensor-model-parallel-size",
                                                                                     2], {})])
    assert_tensors_equal(loaded["tensors"], model_keys(files), "Megatron-LM's load of the pruned torch source")
    assert torch.allclose(loaded["logits"], our_logits(tp1), atol=ATOL, rtol=0)


def test_torch_format_refusals(torch_sources, corpus, tmp_path, capsys):
    from megatron_minitron import checkpoint, cli
    from megatron_minitron.config import Parallel
    from megatron_minitron.model.builder import build_gpt
    from megatron_minitron.runtime.distributed import destroy, init_distributed

    source = torch_sources["tp2pp2"]["root"]
    assert cli.main(["prune", "--load", source, "--in-place", "--data", corpus["train"], "--target",
                     "ffn_hidden_size=96"]) == 2
    assert "--ckpt-format torch checkpoint, which megatron-minitron reads and does not write; use --save OUT" in (
        capsys.readouterr().err)
    init_distributed(1, 1)
    try:
        arch = checkpoint.read_arch(source)
        model = build_gpt(arch, Parallel())
        with pytest.raises(ValueError, match="optimizer, scheduler and RNG state megatron-minitron does not "
                                             "restore; load its weights"):
            checkpoint.load_checkpoint(source, [model])
        damaged = str(tmp_path / "damaged")
        shutil.copytree(source, damaged)
        shutil.rmtree(os.path.join(damaged, f"iter_{ITERATION:07d}", "mp_rank_01_001"))
        with pytest.raises(ValueError, match=r"mp_rank_01_001/model_optim_rng.pt is missing"):
            checkpoint.load_weights(damaged, [model], arch=arch)  # named before any tensor is read
        with pytest.raises(ValueError, match=r"lacks \['mp_rank_01_001'\] \(args say TP2 PP2\)"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("MINITRON_LOAD_VERIFY", "off")  # the reader's own check
                checkpoint.load_weights(damaged, [model], arch=arch)
        # one flipped byte inside a tensor of a rank file: its zip CRC-32 names it (load and `minitron verify`)
        flipped = os.path.join(damaged, f"iter_{ITERATION:07d}", "mp_rank_00_001", "model_optim_rng.pt")
        shutil.rmtree(os.path.dirname(flipped))
        shutil.copytree(os.path.join(source, f"iter_{ITERATION:07d}", "mp_rank_00_001"), os.path.dirname(flipped))
        shutil.copytree(os.path.join(source, f"iter_{ITERATION:07d}", "mp_rank_01_001"),
                        os.path.join(damaged, f"iter_{ITERATION:07d}", "mp_rank_01_001"))
        with zipfile.ZipFile(flipped) as archive:
            entry = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
        with open(flipped, "r+b") as f:
            f.seek(entry.header_offset + 30 + len(entry.filename) + len(entry.extra) + entry.file_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(ValueError, match=f"its entry {re.escape(entry.filename)} does not match its CRC-32"):
            checkpoint.load_weights(damaged, [model], arch=arch)
        assert cli.main(["verify", damaged]) == 2 and "does not match its CRC-32" in capsys.readouterr().err
        assert cli.main(["verify", source]) == 0 and "whose entries match their CRC-32" in capsys.readouterr().out
    finally:
        destroy()
