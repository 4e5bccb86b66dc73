"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
kernel before it in the stream is finishing, and waits (`griddepcontrol.wait`) only where it first
needs that kernel's results. A decode step at batch 1 is ~450 small kernels, each paying 2-3 us of
launch, ramp and tail against a few microseconds of work (bench/RESULTS.md); with PDL the next
kernel's launch and setup, and the few-row linear layer's first weight block, overlap the previous
kernel's tail. Weights never depend on the previous kernel; activations and outputs are touched only
after the wait.

On by default where the GPU has it (compute capability 9.0 or later): batch-1 decode on an H100
went from 334 to 344 tok/s with it (bench/RESULTS.md), and the engine's tokens are the same with and
without (tests/test_engine_gpu.py). DSV2_PDL=0 turns it off, e.g. to rule it out when a kernel
change reads a predecessor's output before its wait, which would race.
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
    return (os.environ.get("DSV2_PDL", "1") != "0" and t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
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
