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
    # checkpoints written in the background (DCP's async_save) while training goes on
    async_checkpoint: bool = False
    # expert parallelism: the routed experts split over groups of `ep` consecutive ranks
    # (train/expert_parallel.py), FSDP2 sharding each part over the world / ep ranks that hold it
    ep: int = 1

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("auto", "bf16", "none"):
            raise ValueError(f"parallel.mixed_precision = {self.mixed_precision!r}: expected auto, bf16 or none")
        if self.ep < 1:
            raise ValueError(f"parallel.ep = {self.ep}: must be at least 1")

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
    # launched by torchrun: a process group, even of one (whose training shards with FSDP2 only
    # for parallel.cpu_offload)
    launched: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> Dist:
        """Join the process group that torchrun describes (RANK and WORLD_SIZE set), else a world of
        one without torch.distributed. `device`: "auto" (CUDA when available), "cuda" or "cpu"."""
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls(0, 1, torch.device("cuda" if cuda else device if device != "auto" else "cpu"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        target = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(target)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=target if cuda else None)
        return cls(dist.get_rank(), dist.get_world_size(), target, launched=True)

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
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()


def shard(model: nn.Module, d: Dist, cfg: ParallelConfig) -> dist.ProcessGroup | None:
    """FSDP2 over every rank: each decoder block a unit (its parameters gathered for its forward and
    backward only), the embeddings, final norm and LM head in the root unit. With ep > 1 the routed
    experts are first split over EP groups, and each rank's part is its own unit, sharded over the
    ranks that hold the same part (`scale_expert_gradients` then finishes their average). Returns the
    EP group (None without EP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from .expert_parallel import apply_expert_parallel

    mesh = init_device_mesh(d.device.type, (d.world,), mesh_dim_names=("dp",))
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and d.device.type == "cuda")
    options = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
        else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    }
    ep_group = None
    if cfg.ep > 1:
        if d.world % cfg.ep:
            raise ValueError(f"parallel.ep = {cfg.ep} does not divide the {d.world} processes")
        grid = init_device_mesh(d.device.type, (d.world // cfg.ep, cfg.ep), mesh_dim_names=("dp_rep", "ep"))
        ep_group = grid["ep"].get_group()
        apply_expert_parallel(model, ep_group)
    for block in model.layers:
        if cfg.ep > 1 and block.is_moe:
            fully_shard(block.mlp.experts, reshard_after_forward=cfg.reshard_after_forward,
                        **{**options, "mesh": grid["dp_rep"]})
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **options)
    fully_shard(model, **options)
    return ep_group


def sync_gradients(model: nn.Module, on: bool) -> None:
    """Whether the next backward reduces gradients across ranks (off for all but a step's last
    micro-batch: one reduction per step instead of one per micro-batch)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(on)


def scale_expert_gradients(model: nn.Module, ep: int) -> None:
    """Each expert part's gradient sums its EP group's ep ranks' tokens (through the all-to-all) and
    FSDP2 averages it over the world / ep ranks holding the part: divided by ep it is the average
    over the world that every other gradient is. (FSDP2's own divide factor would do this in the
    reduction, but with a reduce op that gloo lacks.)"""
    from .expert_parallel import ExpertParallel

    for module in model.modules():
        if isinstance(module, ExpertParallel):
            torch._foreach_mul_([p.grad for p in module.parameters() if p.grad is not None], 1.0 / ep)


def clip_grad_norm_(model: nn.Module, max_norm: float, ep_group: dist.ProcessGroup | None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a sharded model whose gradients live on several meshes
    (FSDP2's over all ranks; with EP, each expert part's over the ranks that hold it): the squared
    norm per mesh, the expert parts' summed over their EP group (each rank holds other experts),
    then every gradient scaled by min(1, max_norm / (norm + 1e-6)) as torch does."""
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    total = torch.zeros((), device=next(model.parameters()).device)
    for mesh, grads in by_mesh.items():
        squared = full_value(torch.nn.utils.get_total_norm(grads)) ** 2
        if ep_group is not None and mesh is not None and mesh.mesh_dim_names == ("dp_rep",):
            dist.all_reduce(squared, group=ep_group)
        total = total + squared
    total = total.sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for grads in by_mesh.values():
        torch._foreach_mul_(grads, coef)
    return total


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (clip_grad_norm_'s total over sharded gradients) or a tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
