"""`minitron eval` configuration: ``EvalConfig`` holds every option of the command (flag ``--num-fewshot``
is field ``num_fewshot``), loadable from YAML and ``key=value`` overrides with ``config.load_config``.

``EvalConfig.validate()`` makes every check that can fail on the user's side before any model is built
(the options themselves, the task files, the checkpoint's metadata, tokenizer and data against the model's
vocabulary, the sequence length, the parallel layout) and returns what it read (``EvalInputs``), so the job
reads nothing twice. Error messages name the command-line flags; the config key is the flag without its
leading dashes, with ``_`` for ``-``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

from ..config import ModelArch
from .inputs import SPLIT_NAMES

if TYPE_CHECKING:
    from ..checkpoint import CheckpointInfo

PRECISIONS = ("auto", "bf16", "fp32")
TASK_FORMATS = ("auto", "native", "winogrande", "hellaswag", "arc", "mmlu")
TOKENIZER_TYPES = ("auto", "sentencepiece", "huggingface")

@dataclass
class EvalConfig:
    load: Optional[str] = None  # checkpoint directory, or a root (follows `latest`)
    tp: int = 1  # tensor-parallel size of this run
    pp: int = 1  # pipeline-parallel size of this run
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    # LM loss / perplexity
    data: Optional[str] = None  # dataset prefix (.bin/.idx)
    split: Optional[str] = None  # e.g. "949,50,1": only the split_name share of data's documents
    split_name: str = "valid"
    num_samples: Optional[int] = None  # None = every window of the split
    seq_length: Optional[int] = None  # None = the checkpoint's seq_length
    micro_batch_size: int = 4
    # multiple-choice tasks
    tasks: List[str] = field(default_factory=list)  # jsonl task files; results keyed by file name
    task_format: str = "auto"
    num_fewshot: int = 0
    limit: Optional[int] = None  # first N items of each task
    batch_size: int = 8  # (context, continuation) requests per forward
    tokenizer: Optional[str] = None  # None = the data sidecar, else the checkpoint's record
    tokenizer_type: str = "auto"
    seed: int = 1234  # dataset shuffle and few-shot sampling
    output: Optional[str] = None  # JSON results, written by rank 0
    log_samples: bool = False  # per-item log-likelihoods in the results

    def check_options(self) -> None:
        """The checks that read no file."""
        if not self.data and not self.tasks:
            raise ValueError("nothing to evaluate: give --data PREFIX (LM loss) and/or --tasks FILE ...")
        if self.split and not self.data:
            raise ValueError("--split applies to --data; give --data PREFIX too")
        if not self.load:
            raise ValueError("no checkpoint to evaluate: give --load CKPT (or `load:` in the --config file)")
        for flag, value, choices in (("--precision", self.precision, PRECISIONS),
                                     ("--task-format", self.task_format, TASK_FORMATS),
                                     ("--tokenizer-type", self.tokenizer_type, TOKENIZER_TYPES),
                                     ("--split-name", self.split_name, SPLIT_NAMES)):
            if value not in choices:
                raise ValueError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        for flag, value in (("--tp", self.tp), ("--pp", self.pp), ("--micro-batch-size", self.micro_batch_size),
                            ("--batch-size", self.batch_size), ("--num-samples", self.num_samples),
                            ("--limit", self.limit)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value} must be >= 1")
        if self.num_fewshot < 0:
            raise ValueError(f"--num-fewshot {self.num_fewshot} must be >= 0 (0: no examples before an item)")

    def validate(self) -> "EvalInputs":
        """Every user-side check before any model is built (see the module docstring); returns the task
        files, checkpoint metadata and architecture, tokenizer and sequence length it read."""
        from .. import checkpoint
        from ..config import Parallel
        from ..job_arch import check_seq_length
        from .inputs import resolve_eval_tokenizer
        from .tasks import load_task

        self.check_options()
        tasks = [load_task(path, self.task_format) for path in self.tasks]  # bad files fail first
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"two task files share a name ({names}); rename one (results are keyed by file name)")
        info = checkpoint.describe_checkpoint(self.load)
        arch = info.arch
        tokenizer = None
        if tasks:
            tokenizer = resolve_eval_tokenizer(self.tokenizer, self.tokenizer_type, self.data, info)
            if tokenizer.vocab_size > arch.padded_vocab_size(self.tp):
                raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                                 f"holds {arch.padded_vocab_size(self.tp)}: it is not this model's tokenizer")
        if self.data:
            from ..data import check_token_ids
            check_token_ids([self.data], arch.vocab_size, "--data")
        seq_length = arch.seq_length if self.seq_length is None else self.seq_length
        warnings = check_seq_length(seq_length, arch, "--seq-length", f"the checkpoint {self.load}")
        Parallel(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp).validate(arch)
        return EvalInputs(tasks, info, arch, tokenizer, seq_length, tuple(warnings),
                          self._task_requests(tasks, tokenizer, seq_length))

    def _task_requests(self, tasks, tokenizer, seq_length: int) -> dict:
        """Each task's tokenised requests (kept for the run: tokenised once), every one checked against the
        window now, so a choice too long for it fails before the model is built and the LM pass has run."""
        from .scoring import task_requests

        out = {}
        for task in tasks:
            requests, spans = task_requests(task.items, tokenizer, self.num_fewshot, self.seed, self.limit)
            for request in requests:
                try:
                    request.window(seq_length)
                except ValueError as exc:
                    raise ValueError(f"task {task.name} ({task.path}): {exc}") from None
            out[task.name] = (requests, spans)
        return out


@dataclass
class EvalInputs:
    """What ``EvalConfig.validate`` read: the loaded task files, the checkpoint's description and architecture,
    the tokenizer (None without tasks), the evaluation window and the warnings to show."""
    tasks: list
    checkpoint: "CheckpointInfo"
    arch: ModelArch
    tokenizer: object
    seq_length: int
    warnings: tuple = ()
    requests: dict = field(default_factory=dict)  # task name -> (requests, per-item spans), checked
