"""Run megatron-core on CPU (tests, CPU demos) by redirecting its few hard-wired CUDA calls.

megatron-core assumes CUDA in a handful of places: tensor factories called with ``device="cuda"`` or
``device=torch.cuda.current_device()`` (pipeline schedules, p2p shape exchange, masks, DDP buffers,
grad clipping), ``Tensor.cuda()``, ``torch.cuda.synchronize`` and the CUDA RNG tracker used for
model-parallel dropout. On a CPU-only torch all of these raise. ``enable()`` patches exactly those and
nothing else; it is only ever called when no GPU is present, so GPU runs never go through here.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE = None


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites a ``device=`` keyword naming CUDA (or a bare GPU index) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.to,) and args and len(args) > 1:
            first = args[1]
            if isinstance(first, (int, str, torch.device)) and not isinstance(first, bool):
                mapped = _to_cpu_device(first)
                if mapped is not first:
                    args = (args[0], mapped) + tuple(args[2:])
        return func(*args, **kwargs)


class HostStream:
    """Stands in for a CUDA stream: on the CPU every operation is already ordered, so waiting and recording
    do nothing. megatron-core >= 0.19 asks for the current stream in DDP's gradient sync on every step
    (param_and_grad_buffer.py start_grad_sync), 0.16 only with several distributed-optimizer instances."""

    def wait_event(self, event=None):
        pass

    def wait_stream(self, stream=None):
        pass

    def record_event(self, event=None):
        return None

    def synchronize(self):
        pass


def enabled() -> bool:
    return _ENABLED


def enable() -> None:
    """Idempotent. Must run before megatron-core builds a model or a pipeline schedule."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_mode.enable() called on a machine with a GPU; GPU runs must not use it")

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    # The RNG tracker seeds "the CUDA generator" then reads its state back: the CPU one stands in.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it after seeding the CPU
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.empty_cache = lambda: None
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.cuda.device_count = lambda: 0
    torch.cuda.current_stream = lambda *a, **k: HostStream()
    torch.Tensor.cuda = lambda self, *a, **k: self
    # megatron's optimizers dispatch on the type string ('torch.cuda.FloatTensor', ...)
    original_type = torch.Tensor.type

    def cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_type_name

    from megatron.core.tensor_parallel import random as mp_random

    # The model-parallel RNG tracker forks "CUDA" generator states; on CPU it forks the CPU one, which
    # keeps megatron's semantics (dropout inside TP regions uses the model-parallel seed).
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    _MODE = _CudaToCpu()
    _MODE.__enter__()
    _ENABLED = True
