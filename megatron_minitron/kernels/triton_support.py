"""What every Triton kernel of ours checks before a launch. A CPU tensor reaches a kernel only under
Triton's interpreter (the tests, `TRITON_INTERPRET=1`); otherwise the launch would crash in the driver."""
from __future__ import annotations

import torch


def check_interpretable(x: torch.Tensor, kernel, what: str, fallback: str = "use backend='torch'") -> None:
    """ValueError with the fix when ``x`` is on the CPU and ``kernel`` was not decorated in interpreter mode."""
    if x.device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise ValueError(f"the Triton {what} got CPU tensors but Triton is not in interpreter mode: set "
                         f"TRITON_INTERPRET=1 before triton is first imported, or {fallback}")
