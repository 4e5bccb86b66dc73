"""What every benchmark script prints and waits on: progress lines stamped with the seconds since
the script started, and the device's queue drained before a clock is read."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

_T0 = time.perf_counter()


def stamped(name: str) -> Callable[[str], None]:
    """A `log(msg)` that prints '[name  12.3s] msg' to stderr."""
    def log(msg: str) -> None:
        print(f"[{name} {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)
    return log


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
