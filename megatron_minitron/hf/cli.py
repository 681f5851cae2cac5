"""`minitron convert hf-to-mcore | mcore-to-hf`: Hugging Face directories <-> megatron dist checkpoints.

Both work as one process (TP = PP = 1) or under torchrun with ``--tp/--pp`` matching the world size:
each rank reads only its own shards (hf-to-mcore) or writes its own stage (mcore-to-hf).
"""
from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert between Hugging Face and megatron checkpoints",
                              description=__doc__)
    sub = p.add_subparsers(dest="direction", metavar="<direction>")
    a = sub.add_parser("hf-to-mcore", help="Hugging Face directory -> megatron dist checkpoint")
    a.add_argument("--input", required=True, help="HF model directory (config.json + *.safetensors)")
    a.add_argument("--output", required=True, help="checkpoint directory to create (saved exactly there)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    a.add_argument("--format", "--save-format", dest="format", choices=("minitron", "megatron-lm"),
                   default="minitron",
                   help="checkpoint layout: minitron (default) or megatron-lm (a Megatron-LM root: "
                        "OUTPUT/release + latest_checkpointed_iteration.txt, for Megatron-LM's --load); "
                        "--save-format is the same option under prune's name")
    a.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights dtype; auto = bf16 when the HF config says bfloat16, else fp32")
    a.set_defaults(handler=run)
    b = sub.add_parser("mcore-to-hf", help="megatron checkpoint -> Hugging Face directory")
    b.add_argument("--input", required=True, help="checkpoint root (follows `latest`) or checkpoint dir")
    b.add_argument("--output", required=True, help="HF model directory to write")
    b.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load at (default 1)")
    b.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load at (default 1)")
    b.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="dtype of the written tensors; auto = as stored in the checkpoint")
    b.add_argument("--family", default=None,
                   help="HF family to write (llama, mistral, qwen2, qwen3, phi3, smollm3, arcee, nemotron); default: the one the "
                        "weights were imported as (kept through prune / train / distill), else inferred from the "
                        "architecture")
    b.add_argument("--tokenizer", default=None,
                   help="tokenizer to export with the model (sentencepiece .model, tokenizer.json or HF "
                        "directory); default: the one the checkpoint records")
    b.set_defaults(handler=run)
    p.set_defaults(handler=_missing_direction)


def _missing_direction(args) -> int:
    raise ValueError("say which way: `minitron convert hf-to-mcore ...` or `minitron convert mcore-to-hf ...`")


def run(args) -> int:
    if args.direction == "hf-to-mcore":
        hf_to_mcore(args.input, args.output, args.tp, args.pp, args.dtype, format=args.format)
    elif args.direction == "mcore-to-hf":
        mcore_to_hf(args.input, args.output, args.tp, args.pp, args.dtype, args.family,
                    getattr(args, "tokenizer", None))
    else:
        return _missing_direction(args)
    return 0


def _init(tp: int, pp: int):
    import torch.distributed as dist

    from ..runtime.distributed import init_distributed

    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got {tp} and {pp}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise ValueError(f"conversion runs on exactly TP x PP = {tp} x {pp} = {tp * pp} processes, but "
                         f"{world} were launched; use `torchrun --nproc-per-node={tp * pp}` (or adjust --tp/--pp)")
    runtime = init_distributed(tp, pp)
    return runtime, dist


def _say(runtime, text: str) -> None:
    if runtime.is_rank0:
        print(f"[convert] {text}", flush=True)


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, dtype: str = "auto",
                format: str = "minitron") -> str:
    """Convert an HF directory into a megatron dist checkpoint saved exactly at ``out_dir`` (with
    ``format="megatron-lm"``: a Megatron-LM root, the weights in ``out_dir/release``)."""
    from ..checkpoint import save_checkpoint_to
    from ..config import Parallel
    from ..model.builder import build_gpt
    from . import io as hf_io
    from .convert import load_hf_weights
    from .families import arch_from_hf_config
    from .fused import FusedView
    from .mapping import check_hf_names

    hf_dir = os.path.abspath(hf_dir)
    hf_config = hf_io.read_hf_config(hf_dir)  # before any process group: errors come out at once
    arch, family = arch_from_hf_config(hf_config, where=os.path.join(hf_dir, hf_io.CONFIG_FILE))
    if format == "megatron-lm":
        from ..checkpoint.megatron_lm import check_representable
        check_representable(arch, f"--format megatron-lm: {hf_dir}")
    parallel = Parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    parallel.validate(arch)
    reader = hf_io.SafetensorsReader(hf_dir)
    view = FusedView(reader.read, reader.names(), arch, family)  # Phi-3's fused qkv / gate_up in their parts
    check_hf_names(view.names(), arch, hf_dir, view.file_name)
    if dtype == "auto":
        stored = hf_config.get("torch_dtype") or hf_config.get("dtype")
        dtype = "bf16" if stored == "bfloat16" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose fp32, bf16 or auto")

    runtime, dist = _init(tp, pp)
    from ..checkpoint.lock import lock_output_on_rank0
    output_lock = lock_output_on_rank0(out_dir, False, "--output directory")  # noqa: F841 (held until return)
    _say(runtime, f"{hf_dir}: {family}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
                  f"vocab {arch.vocab_size} (embedding rows {arch.padded_vocab_size(tp)}) -> TP{tp} PP{pp} {dtype}")
    # every parameter is set from the HF files (load_hf_weights raises on one without a counterpart)
    model = build_gpt(arch, parallel, dtype=DTYPES[dtype], device=runtime.device, initialize=False).eval()
    load_hf_weights(model, arch, view.read)
    reader.close()

    out_dir = os.path.abspath(out_dir)
    provenance = {"converted_from": hf_dir, "family": family, "hf_config": hf_config}
    present = [f for f in hf_io.TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, f))]
    files_dir = os.path.join(out_dir, "release") if format == "megatron-lm" else out_dir
    tokenizer = hf_io.tokenizer_record(hf_dir, files_dir, present) if present else None
    final = save_checkpoint_to(out_dir, [model], arch=arch, parallel=parallel, provenance=provenance,
                               tokenizer=tokenizer, format=format)
    if runtime.is_rank0 and present:
        hf_io.copy_tokenizer_files(hf_dir, final)
    dist.barrier()
    _say(runtime, f"saved {final}" + (f" with {', '.join(present)}" if present else ""))
    return final


def mcore_to_hf(ckpt: str, out_dir: str, tp: int = 1, pp: int = 1, dtype: str = "auto",
                family=None, tokenizer_path=None) -> str:
    """Write the megatron checkpoint ``ckpt`` as an HF directory (safetensors, config, tokenizer).

    The tokenizer (``tokenizer_path``, else the checkpoint's) is always written in a form AutoTokenizer
    loads (a sentencepiece model is converted), and its bos/eos/pad ids go into config.json and
    generation_config.json."""
    from ..checkpoint import describe_checkpoint, load_weights
    from ..config import Parallel
    from ..model.builder import build_gpt
    from . import io as hf_io
    from .convert import export_hf_weights
    from .families import check_arch_exportable, family_for_arch, hf_config_from_arch

    info = describe_checkpoint(ckpt)
    arch = info.arch
    family = family or info.hf_family or family_for_arch(arch)
    check_arch_exportable(arch, family)
    parallel = Parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    parallel.validate(arch)
    stored = info.torch_dtype(default=torch.float32)
    out_dtype = stored if dtype == "auto" else DTYPES[dtype]

    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and any(f.endswith(".safetensors") for f in os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already holds safetensors files; choose an empty or new directory")

    directory = info.directory
    tokenizer, note = _export_tokenizer_source(info, tokenizer_path)  # errors before any work
    runtime, dist = _init(tp, pp)
    _say(runtime, f"{directory}: {arch.num_layers} layers, hidden {arch.hidden_size} -> {family} at "
                  f"{out_dir} ({_DTYPE_NAMES[out_dtype]})")
    model = build_gpt(arch, parallel, dtype=stored, device=runtime.device, initialize=False).eval()
    load_weights(directory, [model], arch=arch)
    if runtime.is_rank0:
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    export_hf_weights(model, arch, out_dir, dtype=out_dtype, family=family)
    if runtime.is_rank0:
        from .tokenizer_export import export_tokenizer, ids_follow_tokenizer, special_token_ids

        config = hf_config_from_arch(arch, family, base=info.hf_config,
                                     dtype=_DTYPE_NAMES[out_dtype])
        if tokenizer is not None:
            copied = export_tokenizer(tokenizer, out_dir, arch.seq_length)
            ids = special_token_ids(tokenizer)
        else:  # an HF tokenizer we could not read: its files as they are (old behaviour)
            copied, ids = hf_io.copy_tokenizer_files(directory, out_dir), {}
        if "generation_config.json" not in copied:  # the source model's, kept by hf-to-mcore
            copied += hf_io.copy_tokenizer_files(directory, out_dir, ["generation_config.json"])
        override = ids_follow_tokenizer(tokenizer)
        hf_io.write_hf_config(hf_io.fill_token_ids(config, ids, override), out_dir)
        hf_io.write_generation_config(out_dir, ids, override)
        if note:
            print(f"[convert] {note}", flush=True)
        print(f"[convert] wrote {out_dir}" + (f" with {', '.join(copied)}" if copied else
                                               " WITHOUT a tokenizer: the checkpoint records none; give "
                                               "--tokenizer PATH for AutoTokenizer to load it"), flush=True)
    dist.barrier()
    return out_dir


def _export_tokenizer_source(info, given):
    """(tokenizer to export or None, note to print) for the checkpoint ``info`` (its CheckpointInfo). A given
    or sentencepiece tokenizer that fails is an error; an HF one the installed transformers cannot read is
    copied file by file instead."""
    from .tokenizer_export import checkpoint_tokenizer

    if given:
        return checkpoint_tokenizer(info, given), None
    try:
        return checkpoint_tokenizer(info), None
    except (FileNotFoundError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001  transformers raises anything on tokenizer files it cannot read
        if info.tokenizer is not None and info.tokenizer.get("type") == "sentencepiece":
            raise
        return None, (f"note: the checkpoint's tokenizer could not be read ({type(e).__name__}: {e}); its "
                      f"files are copied as they are and config.json keeps its token ids")
