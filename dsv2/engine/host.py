"""Host-to-device transfers that do not wait for the GPU.

A copy from pageable host memory may synchronize with the stream before it starts, which would
make the host wait for the step in flight and undo async scheduling; a copy from pinned memory is
queued like a kernel. The caching host allocator keeps the pinned block until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on `device`, staged through pinned memory on CUDA."""
    return host_tensor(values, device, dtype).to(device, non_blocking=True)


def host_tensor(values: Sequence, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A CPU tensor of `values`, pinned when it is bound for a CUDA device."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
