"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
kernel before it in the stream is finishing, and waits (`griddepcontrol.wait`) only where it first
needs that kernel's results. A decode step at batch 1 is ~450 small kernels, each paying 2-3 us of
launch, ramp and tail against a few microseconds of work (bench/RESULTS.md); with PDL the next
kernel's launch and setup, and the few-row linear layer's first weight block, overlap the previous
kernel's tail. Weights never depend on the previous kernel; activations and outputs are touched only
after the wait.

Off unless DSV2_PDL=1: the overlap is not measured yet, and a kernel that read a predecessor's
output before its wait would race, so the switch stays explicit until the GPU tests and the decode
benchmark have run with it.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs launch no kernels
    triton = None


@functools.cache
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether launches on t's device use PDL (and their kernels the grid-dependency waits)."""
    return (os.environ.get("DSV2_PDL") == "1" and t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and _device_ok(t.device.index or 0))


def options(t: torch.Tensor) -> dict:
    """Launch options for a kernel taking `USE_GDC`: `kernel[grid](..., **pdl.options(x))`."""
    on = enabled(t)
    return {"USE_GDC": on, "launch_pdl": on}


if triton is not None:

    @triton.jit
    def grid_wait(USE_GDC: tl.constexpr):
        """Where a kernel first reads what the kernels before it wrote (or writes what they may
        still read): wait for them, and let the next kernel launch."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
