"""The training loop, readable top to bottom. Used by `minitron train`, teacher correction, distillation and
search; what is optimised comes from an objective (``objective.py``), everything else is shared.

    setup:  torchrun env -> parallel_state; model (this rank's stage) -> DDP -> optimizer + LR schedule;
            resume from `train.save` if it holds a checkpoint, else initial weights from `train.load`;
            data iterators positioned at the resumed sample.
    step:   megatron-core forward/backward schedule over micro-batches (any PP) -> optimizer step -> LR step.
    around: periodic validation, checkpoints every `save_interval`, a collective check for SIGTERM/SIGUSR1
            (save and exit 0), `exit_interval` (save and stop), progress on rank 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import config as cfgmod
from ..config import TrainConfig
from ..model.builder import build_gpt, resolve_dtype
from ..runtime.collectives import sum_to_all_ranks
from ..runtime.distributed import init_distributed, set_seed
from ..runtime.forward import unwrap_model
from .objective import LMObjective, Objective
from .optim import build_optimizer, build_scheduler, wrap_ddp
from .progress import Progress, peak_flops, training_flops_per_token
from .signals import ExitSignalHandler


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # per-iteration metrics of this run (rank 0 has values)


class Trainer:
    def __init__(self, cfg: TrainConfig, objective: Optional[Objective] = None, provenance: Optional[dict] = None,
                 datasets: Optional[tuple] = None):
        if objective is not None and not isinstance(objective, Objective):
            raise ValueError(f"{type(objective).__name__} is not a training objective: it needs metric_names, "
                             f"forward_step, wrap_model, schedule_kwargs and describe (subclass "
                             f"train.objective.BaseObjective for the optional hooks)")
        self.cfg = cfg
        self.objective: Objective = objective or LMObjective()
        self.provenance = provenance or {}
        self._datasets = datasets  # (train, valid) already built, e.g. by tests or search
        self.state = TrainState()
        self.exit_code = 0
        self.tokenizer_record = None  # what checkpoints name as the tokenizer (kept from the source)
        self._progress = None  # while run() is going: log0 writes above its progress bar
        self._save_lock = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        cfg = self.cfg
        par = cfg.parallel
        cfg.model.validate()
        par.validate(cfg.model)
        self.rt = init_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size)
        cfg.validate(self.rt.world_size)
        if self._datasets is None:
            from ..data import check_token_ids
            check_token_ids(cfg.data.train_data, cfg.model.vocab_size, "data.train_data")
            check_token_ids(cfg.data.valid_data, cfg.model.vocab_size, "data.valid_data")
        if cfg.train.save:  # one writer per root, for the whole run (a second run fails here, at once)
            from ..checkpoint.lock import lock_output_on_rank0
            self._save_lock = lock_output_on_rank0(cfg.train.save, is_root=True, what="train.save")
        set_seed(cfg.train.seed)
        self.dtype = resolve_dtype(cfg.train.precision)
        t = cfg.train
        fp8 = (dict(format=t.fp8, recipe=t.fp8_recipe, amax_history_len=t.fp8_amax_history_len,
                    amax_compute_algo=t.fp8_amax_compute_algo) if t.fp8 else None)
        self.arch = self._model_arch()
        if t.save_format == "megatron-lm":  # before any work: a run must not fail at its first save
            from ..checkpoint.megatron_lm import check_representable
            check_representable(self.arch, "train.save_format=megatron-lm: the model")
        self._resumes = self._resuming()  # train.save holds a checkpoint: read once, used twice
        # a resume or train.load sets every weight next: no random init (on the CPU, seconds per 1B parameters)
        model = build_gpt(self.arch, par, self.dtype, attention_backend=t.attention_backend,
                          use_te=t.transformer_engine, recompute=t.recompute, device=self.rt.device, fp8=fp8,
                          fused_kernels=t.fused_kernels, initialize=not (self._resumes or t.load))
        model = self.objective.wrap_model(self, model)  # e.g. co-locate a frozen teacher
        self.model = [wrap_ddp(model, par)]
        self.optimizer = build_optimizer(self.model, cfg.train, par, self.dtype)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self._configure_megatron(model.config)
        self._load_initial_state()
        self.train_ds, self.valid_ds = self._datasets or self._build_datasets()
        return self

    def _configure_megatron(self, mconfig) -> None:
        from megatron.core.distributed import finalize_model_grads

        mconfig.finalize_model_grads_func = finalize_model_grads
        mconfig.no_sync_func = self.model[0].no_sync
        assert mconfig.calculate_per_token_loss  # set by the builder, before DDP reads it

    def _model_arch(self):
        """What is built, loaded and saved: cfg.model (seq_length = this run's window) with the maximum context
        of the checkpoint the weights come from (the resumed one, else train.load), see job_arch.py."""
        from .. import checkpoint
        from ..job_arch import model_arch

        t = self.cfg.train
        source = t.save if t.save and checkpoint.latest_iteration(t.save) is not None else t.load
        return model_arch(self.cfg.model, checkpoint.read_arch(source) if source else None)

    def _load_initial_state(self) -> None:
        from .. import checkpoint

        tcfg = self.cfg.train
        chunks = self.unwrapped()
        if self._resumes:
            extra = checkpoint.load_checkpoint(tcfg.save, chunks, optimizer=self.optimizer,
                                               scheduler=self.scheduler, arch=self.arch)
            self.state.iteration = int(extra["iteration"])
            self.state.consumed_samples = int(extra.get("consumed_samples", 0))
            loaded_from = tcfg.save
            self.log0(f"resumed from {tcfg.save} at iteration {self.state.iteration}")
        elif tcfg.load:  # weights only, into the trained model proper (a wrapper may name it)
            checkpoint.load_weights(tcfg.load, [getattr(c, "init_target", c) for c in chunks], arch=self.arch,
                                    optimizer=self.optimizer)
            loaded_from = tcfg.load
            self.provenance.setdefault("initialised_from", tcfg.load)
            self.log0(f"initial weights from {tcfg.load}")
        else:
            return
        info = checkpoint.describe_checkpoint(loaded_from)
        self.tokenizer_record = info.tokenizer
        for key, value in info.hf_lineage.items():  # what the saves descend from, for mcore-to-hf
            self.provenance.setdefault(key, value)

    def _resuming(self) -> bool:
        from .. import checkpoint

        return bool(self.cfg.train.save) and checkpoint.latest_iteration(self.cfg.train.save) is not None

    def _build_datasets(self):
        from ..data import build_gpt_datasets

        t, d = self.cfg.train, self.cfg.data
        train_samples = t.train_iters * d.global_batch_size
        eval_rounds = t.train_iters // max(t.eval_interval, 1) + 1
        # eval_iters=0 never evaluates (evaluate() returns nothing): no validation data needed
        valid_samples = max(t.eval_iters * d.global_batch_size * eval_rounds, d.global_batch_size) \
            if t.eval_iters > 0 else 0
        return build_gpt_datasets(d, self.cfg.model.seq_length, train_samples, valid_samples)

    def unwrapped(self) -> list:
        return [unwrap_model(m) for m in self.model]

    def log0(self, text: str) -> None:
        if not self.rt.is_rank0:
            return
        if self._progress is not None:
            self._progress.write(text)  # above the progress bar, never through it
        else:
            print(text, flush=True)

    def start_summary(self, tokens_per_iter: int) -> str:
        cfg, st = self.cfg, self.state
        what = self.objective.describe(self.arch)
        where = cfg.train.save or "nowhere (train.save is not set)"
        return (f"{what}; TP{self.rt.tp} PP{self.rt.pp} DP{self.rt.dp}; {tokens_per_iter:,} tokens per step "
                f"({cfg.data.global_batch_size} x {cfg.model.seq_length}); iterations {st.iteration} -> "
                f"{cfg.train.train_iters}; checkpoints to {where}")

    def end_summary(self, start_iteration: int, seconds: float, tokens_per_iter: int) -> str:
        st = self.state
        ran = st.iteration - start_iteration
        text = (f"done: {ran} iterations ({start_iteration} -> {st.iteration}), {ran * tokens_per_iter:,} tokens "
                f"in {seconds:.0f} s")
        key = next((k for k in ("val_loss", "val_lm_loss") if any(k in h for h in st.history)), None)
        if key is not None:
            points = [(h["iteration"], h[key]) for h in st.history if key in h]
            best = min(points, key=lambda p: p[1])
            text += (f"; final {key} {points[-1][1]:.4f} (iteration {points[-1][0]}), best {best[1]:.4f} "
                     f"(iteration {best[0]})")
        if self.cfg.train.save:
            text += f"; checkpoints in {self.cfg.train.save}"
        return text

    # ------------------------------------------------------------------ data
    @property
    def num_microbatches(self) -> int:
        d = self.cfg.data
        return d.global_batch_size // (d.micro_batch_size * self.rt.dp)

    def _batches(self, dataset, consumed_samples: int):
        from megatron.core import parallel_state as ps

        from ..data import micro_batches

        d = self.cfg.data
        it = micro_batches(dataset, d.micro_batch_size, ps.get_data_parallel_rank(), self.rt.dp,
                           consumed_samples, num_workers=d.num_workers)
        device = self.rt.device
        return ({k: v.to(device, non_blocking=True) for k, v in b.items()} for b in it)

    # ------------------------------------------------------------------ steps
    def _forward_backward(self, data_iterator, forward_only: bool) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        d = self.cfg.data
        extra = self.objective.schedule_kwargs(self.rt.pp > 1)  # e.g. widened p2p shapes for a co-located teacher
        reports = get_forward_backward_func()(
            forward_step_func=self.objective.forward_step, data_iterator=data_iterator,
            model=self.model, num_microbatches=self.num_microbatches,
            seq_length=self.cfg.model.seq_length, micro_batch_size=d.micro_batch_size,
            forward_only=forward_only, **extra)
        return self._reduce_reports(reports)

    def _reduce_reports(self, reports: list) -> dict:
        """Sum [sum, count] pairs over micro-batches and DP; every rank gets the values (from the last PP
        stage, which is the only one computing them)."""
        names = self.objective.metric_names
        totals = torch.zeros(len(names), 2, dtype=torch.float64, device=self.rt.device)
        for report in reports or []:
            for i, name in enumerate(names):
                if name in report:
                    totals[i] += report[name].to(totals)
        sum_to_all_ranks(totals)
        return {name: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}

    def train_step(self, data_iterator) -> dict:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self._forward_backward(data_iterator, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if not ok:
            metrics["skipped"] = 1
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.valid_ds is None or self.cfg.train.eval_iters <= 0:
            return {}
        for chunk in self.model:
            chunk.eval()
        it = self._batches(self.valid_ds, 0)  # the same validation samples every time
        sums = {}
        for _ in range(self.cfg.train.eval_iters):
            for k, v in self._forward_backward(it, forward_only=True).items():
                sums[k] = sums.get(k, 0.0) + v
        for chunk in self.model:
            chunk.train()
        return {f"val_{k}": v / self.cfg.train.eval_iters for k, v in sums.items()}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[str]:
        from .. import checkpoint

        tcfg = self.cfg.train
        if not tcfg.save:
            return None
        path = checkpoint.save_checkpoint(
            tcfg.save, self.state.iteration, self.unwrapped(), optimizer=self.optimizer,
            scheduler=self.scheduler, extra={"consumed_samples": self.state.consumed_samples},
            arch=self.arch, parallel=self.cfg.parallel, provenance=self.provenance,
            keep_last=tcfg.keep_last, tokenizer=self._tokenizer_for_checkpoint(), format=tcfg.save_format,
            megatron_lm_args=checkpoint.megatron_lm.training_args(self.cfg))
        self.log0(f"saved checkpoint {path}")
        return path

    def _tokenizer_for_checkpoint(self):
        """The configured tokenizer, else the one the initial/resumed checkpoint named, else the training
        data's sidecar: so eval and HF export find it from any checkpoint of the pipeline."""
        d = self.cfg.data
        if d.tokenizer_path:  # with its fingerprint and the data's BOS convention
            from ..data.tokenizer import configured_tokenizer_record
            return configured_tokenizer_record(d.tokenizer_type, d.tokenizer_path,
                                               [p for p in d.train_data if isinstance(p, str)])
        if self.tokenizer_record:
            return self.tokenizer_record
        prefixes = [p for p in d.train_data if isinstance(p, str)]
        if prefixes:
            from ..data import load_tokenizer_sidecar
            tok = load_tokenizer_sidecar(prefixes[0])
            if tok is not None:
                return tok.describe()
        return None

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainState:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        signals = ExitSignalHandler()
        progress = Progress(total=t.train_iters, initial=st.iteration, enabled=self.rt.is_rank0,
                            log_dir=t.save, use_bar=t.progress_bar,
                            wandb_cfg={"enabled": t.wandb, "project": t.wandb_project, "mode": t.wandb_mode},
                            run_config=cfgmod.to_dict(cfg))
        tokens_per_iter = cfg.data.global_batch_size * cfg.model.seq_length
        flops_per_token = (training_flops_per_token(cfg.model)
                           + self.objective.extra_flops_per_token(cfg.model.seq_length))  # + a KD teacher's
        flops_per_iter = flops_per_token * tokens_per_iter
        peak = peak_flops(self.rt.device)
        train_iter = self._batches(self.train_ds, st.consumed_samples)
        start_iteration = st.iteration
        saved_at = None
        for chunk in self.model:
            chunk.train()
        progress.interval_seconds()
        self._progress = progress
        progress.write(self.start_summary(tokens_per_iter))
        started = time.perf_counter()
        try:
            while st.iteration < t.train_iters:
                metrics = self.train_step(train_iter)
                st.iteration += 1
                st.consumed_samples += cfg.data.global_batch_size
                seconds = progress.interval_seconds()
                metrics["tokens_per_s"] = tokens_per_iter / max(seconds, 1e-9)
                if peak:
                    metrics["mfu"] = flops_per_iter / seconds / (peak * self.rt.world_size)
                st.history.append({"iteration": st.iteration, **metrics})
                console = st.iteration % max(t.log_interval, 1) == 0 or st.iteration == t.train_iters
                progress.log(st.iteration, metrics, advance=1, console=console)
                if t.eval_interval and st.iteration % t.eval_interval == 0:
                    val = self.evaluate()
                    if val:
                        progress.log(st.iteration, val)
                        st.history[-1].update(val)
                stop_now = signals.should_exit(self.rt.device)
                ran = st.iteration - start_iteration
                limit_hit = t.exit_interval is not None and ran >= t.exit_interval
                periodic = t.save_interval and st.iteration % t.save_interval == 0
                if periodic or stop_now or limit_hit or st.iteration == t.train_iters:
                    self.save()
                    saved_at = st.iteration
                if stop_now:
                    progress.write(f"exit signal received: saved at iteration {st.iteration}, exiting")
                    break
                if limit_hit:
                    progress.write(f"exit_interval={t.exit_interval} reached at iteration {st.iteration}")
                    break
            if saved_at != st.iteration and st.iteration > start_iteration:
                self.save()
            progress.write(self.end_summary(start_iteration, time.perf_counter() - started, tokens_per_iter))
        finally:
            self._progress = None
            progress.close()
            signals.restore()
            if self._save_lock is not None:
                self._save_lock.release()  # the next writer (e.g. a resume in this process) may take it
        return st


def train(cfg: TrainConfig, objective: Optional[Objective] = None, provenance: Optional[dict] = None) -> TrainState:
    return Trainer(cfg, objective=objective, provenance=provenance).setup().run()
