"""Rank-0 progress: a tqdm bar (or plain lines when not a TTY), a metrics.jsonl file, wandb when enabled."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch

from ..config import ModelArch

# Dense bf16 peak per GPU, for MFU. Unknown devices report no MFU rather than a wrong one.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12, "GB200": 2500e12}


def forward_flops_per_token(arch: ModelArch, seq_length: Optional[int] = None) -> float:
    """Model FLOPs of one token's forward at a ``seq_length`` window (default ``arch.seq_length``): 2 per
    weight of every matmul (the output layer included; the embedding lookup, norms and biases not), plus causal
    attention's
    QK^T and AV, 2 * 2 * (s / 2) * heads * head_dim per layer: on average a token attends to half the window."""
    from ..model import params

    s = arch.seq_length if seq_length is None else seq_length
    per_layer = sum(t.numel(arch) for t in params.layer_tensors(arch) if len(t.axes) == 2)  # no norms, biases
    dense = arch.num_layers * per_layer + arch.hidden_size * arch.padded_vocab_size()
    attention = 2 * arch.num_layers * s * arch.num_attention_heads * arch.head_dim
    return 2 * dense + attention


def training_flops_per_token(arch: ModelArch) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), PaLM-style accounting."""
    return 3 * forward_flops_per_token(arch)


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, log_dir: Optional[str],
                 use_bar: bool = True, wandb_cfg: Optional[dict] = None, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.bar = None
        self.metrics_file = None
        self.wandb = None
        self._last_time = time.perf_counter()
        if not enabled:
            return
        if use_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.metrics_file = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        if wandb_cfg and wandb_cfg.get("enabled"):
            self.wandb = _start_wandb(wandb_cfg, run_config, log_dir)

    def interval_seconds(self) -> float:
        now = time.perf_counter()
        elapsed, self._last_time = now - self._last_time, now
        return elapsed

    def log(self, iteration: int, metrics: dict, advance: int = 0, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, **{k: _plain(v) for k, v in metrics.items()}}
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=iteration)
        text = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.update(advance)
            if console:
                self.bar.set_postfix_str(text)
        elif console:
            print(f"iter {iteration}: {text}", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file:
            self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: dict, run_config: Optional[dict], log_dir: Optional[str]):
    try:
        import wandb
    except ImportError as e:
        raise ValueError("train.wandb=true but wandb is not installed: pip install 'megatron-minitron[wandb]'") from e
    os.environ.setdefault("WANDB_MODE", cfg.get("mode", "offline"))
    return wandb.init(project=cfg.get("project"), config=run_config, dir=log_dir,
                      mode=cfg.get("mode", "offline"))


def _plain(v):
    return float(v) if isinstance(v, (torch.Tensor,)) else v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
