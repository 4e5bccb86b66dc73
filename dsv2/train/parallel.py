"""Training on several processes: torch.distributed under torchrun, the model sharded with FSDP2.

    torchrun --nproc-per-node N [--nnodes A --node-rank R --rdzv-endpoint HOST:PORT] \\
        -m dsv2 train --config CONFIG [key=value ...]

The model is built and initialized the same on every rank (same seed), then each decoder block and
the root are wrapped by `fully_shard` over a one-dimensional DeviceMesh of all ranks, torchtitan's
way: the model's code does not change. Each optimizer step's micro-batches are the ones a single
process would take, dealt out round-robin to the ranks (every rank reads the same token stream and
keeps its share), and FSDP2's gradient reduction averages over ranks, so a run on N processes
follows the single-process run's loss trajectory up to summation order. NCCL on CUDA (one GPU per
local rank), gloo on CPU. The `[parallel]` table of the train config holds the settings below.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ParallelConfig:
    # parameters, gradients and optimizer state kept on the CPU between uses (FSDP2's CPU offload)
    cpu_offload: bool = False
    # FSDP2 mixed precision: "auto" = bf16 parameters with fp32 gradient reduction on CUDA, none on
    # CPU; "bf16" or "none" to choose
    mixed_precision: str = "auto"
    # free each block's gathered parameters after its forward (less memory, one more all-gather
    # in the backward)
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("auto", "bf16", "none"):
            raise ValueError(f"parallel.mixed_precision = {self.mixed_precision!r}: expected auto, bf16 or none")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ParallelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown [parallel] key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for f in dataclasses.fields(cls):
            if f.name in values and not isinstance(values[f.name], type(f.default)):
                raise ValueError(f"parallel.{f.name} = {values[f.name]!r}: expected {type(f.default).__name__}")
        return cls(**values)


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank and world size from torchrun's environment (one process
    without it), and the device it computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> Dist:
        """Join the process group that torchrun describes (WORLD_SIZE > 1), else a world of one.
        `device`: "auto" (CUDA when available), "cuda" or "cpu"."""
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, torch.device("cuda" if cuda else device if device != "auto" else "cpu"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        target = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(target)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=target if cuda else None)
        return cls(dist.get_rank(), dist.get_world_size(), target)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: dict[str, torch.Tensor | float]) -> None:
        """Each value of `values` summed over ranks, in place (numbers become tensors on the device)."""
        if self.world > 1:
            for k, v in values.items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(v, device=self.device)
                dist.all_reduce(t)
                values[k] = t

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def shard(model: nn.Module, d: Dist, cfg: ParallelConfig) -> nn.Module:
    """FSDP2 over every rank: each decoder block a unit (its parameters gathered for its forward and
    backward only), the embeddings, final norm and LM head in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,), mesh_dim_names=("dp",))
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and d.device.type == "cuda")
    options = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
        else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    }
    for block in model.layers:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **options)
    fully_shard(model, **options)
    return model


def sync_gradients(model: nn.Module, on: bool) -> None:
    """Whether the next backward reduces gradients across ranks (off for all but a step's last
    micro-batch: one reduction per step instead of one per micro-batch)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(on)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (clip_grad_norm_'s total over sharded gradients) or a tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
