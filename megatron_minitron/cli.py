"""`minitron <subcommand>`: each subcommand lives with its concept and registers itself here."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .errors import debug_enabled, user_error_message


def build_parser() -> argparse.ArgumentParser:
    from . import demo
    from .checkpoint import cli as checkpoint_cli
    from .data import cli as data_cli
    from .distill import cli as distill_cli
    from .eval import cli as eval_cli
    from .hf import cli as hf_cli
    from .plan import cli as plan_cli
    from .prune import cli as prune_cli
    from .search import cli as search_cli
    from .train import cli as train_cli

    parser = argparse.ArgumentParser(prog="minitron", description=USAGE_GUIDE, epilog=USAGE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="<subcommand>")
    for module in (demo, data_cli, train_cli, prune_cli, distill_cli, eval_cli, search_cli, hf_cli, plan_cli,
                   checkpoint_cli):
        module.register(subparsers)
    for sub in _all_subparsers(parser):
        sub.formatter_class = HelpFormatter
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help line ends with its default (unless it names one already, or there is none to
    name: unset / off); descriptions keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _all_subparsers(parser: argparse.ArgumentParser) -> list:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += [sub] + _all_subparsers(sub)
    return found


USAGE_GUIDE = """\
Turn one trained GPT into smaller ones (NVIDIA's Minitron recipe) on megatron-core: score layers, heads,
query groups, MLP neurons and embedding channels on a little calibration data, prune, then distill the
pruned student from the unpruned teacher. Every subcommand runs as a plain process or under torchrun
(`torchrun --nproc-per-node 8 -m megatron_minitron.cli <subcommand> ...`) at any TP x PP x DP.

The usual journey:
  minitron convert hf-to-mcore --input HF_DIR --output TEACHER   (or start from a Megatron-LM checkpoint)
  minitron preprocess --input docs.jsonl --tokenizer-type huggingface --tokenizer-model HF_DIR \\
      --output-prefix data/mix
  minitron prune --load TEACHER --data data/mix_train --save STUDENT --target ffn_hidden_size=9216
  minitron distill CONFIG distill.teacher=TEACHER distill.student=STUDENT train.save=RUN
  minitron eval --load RUN --data data/mix_valid
  minitron convert mcore-to-hf --input RUN --output HF_OUT

Try it on the embedded example first: `minitron demo` (CPU, a few minutes)."""
USAGE_EPILOG = """\
`minitron <subcommand> --help` shows each one's options and their defaults. Errors are one line with the
fix (exit code 2); MINITRON_DEBUG=1 shows the full traceback. Docs: README.md and docs/ in the repository."""


def run_subcommand(register, argv: list) -> int:
    """Run one subcommand in this process with its own parser, as `minitron` would (tests drive the CLI
    this way; library callers use the jobs: prune.run, eval.run_eval, distill.job.run)."""
    parser = argparse.ArgumentParser(prog="minitron")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


def quiet_library_warnings() -> None:
    """Our commands' output is for people: hide megatron-core's and torch's deprecation notices (they are
    for library developers, and a user cannot act on them). Only in our entry point, never at import, so
    users' own code that imports megatron_minitron keeps every warning."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch|transformers)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*deprecated", category=UserWarning, module=r"megatron(\.|$)")
    # megatron-core 0.17-0.19: import-time notices (absl missing, experimental MIMO configs) and torch DCP's
    # notes on the single-process loads megatron's torch_dist strategy makes since 0.18
    warnings.filterwarnings("ignore", message=r"(absl\.logging is not installed|.*is experimental)",
                            category=UserWarning, module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", message=r"(The argument order of load has been changed|torch\.distributed is "
                                              r"disabled, unavailable or uninitialized)", category=UserWarning)
    # ... and rank-0 logger warnings for library developers ("GPTModel IS DEPRECATED", DDP's full_param_layout
    # note, "async save is deprecated" printed for synchronous saves, "load_common is deprecated")
    for name in ("megatron.core.models.gpt.gpt_model", "megatron.core.distributed.distributed_data_parallel",
                 "megatron.core.dist_checkpointing.strategies.torch",
                 "megatron.core.dist_checkpointing.strategies.common"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # megatron reads `.grad` of non-leaf tensors; under the CPU test mode's torch-function hook torch notices
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf",
                            category=UserWarning)


def main(argv=None) -> int:
    if not debug_enabled():
        quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        message = user_error_message(e)
        if message is None or debug_enabled():
            raise  # a bug of ours (or MINITRON_DEBUG=1): the traceback is what helps
        print(f"minitron {args.command}: error: {message}", file=sys.stderr, flush=True)
        return 2
    finally:
        from .runtime.distributed import destroy
        destroy()


if __name__ == "__main__":
    sys.exit(main())
