"""Tensor-parallel engines: rank 0 in the caller's process, ranks 1 .. N-1 in worker processes.

`LLM(model, tensor_parallel_size=N)` starts the N-1 workers itself, as vLLM does: each joins a
process group with the caller (NCCL on CUDA, one GPU per rank; gloo on the CPU), loads only its
slices of the checkpoint (model/tensor_parallel.py), builds an engine of the same shape and runs
every step the leader (rank 0) plans, until the leader stops it (engine/runner.py `follow`).
Under an external launcher (`torchrun ... -m dsv2 serve`), the processes exist already: rank 0
serves and leads, every other rank calls `follow_forever`.

Failure: a worker that dies makes the leader's next collective fail (gloo at once; a watchdog here
ends the leader within seconds where a collective would wait, as NCCL's does), with an error that
names the worker; a leader that dies takes its workers with it (each watches its parent).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# idle workers wait for the next step as long as the server is up: no collective timeout; deaths
# are found by the watchdogs instead
_NO_TIMEOUT = timedelta(days=365)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How every rank builds its part of the model and its engine (picklable, sent to workers)."""

    model: str
    device: str
    dtype: str | None
    quantization: str | None
    load_format: str
    engine: object  # EngineConfig
    cache_dtype: object
    data_parallel_attention: bool = False  # model/tensor_parallel.py, engine/data_parallel.py
    tokenizer: str | None = None  # the directory of tokenizer.json (data-parallel ranks sample and detokenize)


def backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def local_device(device: str, rank: int) -> str:
    """One GPU per rank of a node (LOCAL_RANK under torchrun, the rank for spawned workers)."""
    if device != "cuda":
        return device
    index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def build_model(spec: ModelSpec, device: str):
    """This rank's part of the model: the checkpoint's slices, or random weights of its shape."""
    from ..checkpoint import load_model, random_model
    from ..config import ModelConfig
    from ..model.tensor_parallel import shard_

    if spec.load_format == "dummy":  # every rank draws the whole model from the same seed, keeps its part
        model = random_model(ModelConfig.from_hf(spec.model), device, spec.dtype, quantization=spec.quantization)
        shard_(model, data_parallel_attention=spec.data_parallel_attention)
        return model
    return load_model(spec.model, device=device, dtype=spec.dtype, quantization=spec.quantization or "auto",
                      tensor_parallel="world", data_parallel_attention=spec.data_parallel_attention)


def follow_forever(spec: ModelSpec, rank: int) -> None:
    """A follower rank's whole life: its engine built in step with the leader's, then every step."""
    from .engine import LLMEngine

    device = local_device(spec.device, rank)
    model = build_model(spec, device)
    if spec.data_parallel_attention:  # an engine of its own, for the requests rank 0 gives it
        from ..tokenizer import Tokenizer
        from .data_parallel import DataParallelEngine

        tokenizer = None if spec.tokenizer is None else Tokenizer.from_dir(spec.tokenizer)
        DataParallelEngine(LLMEngine(model, tokenizer, spec.engine, spec.cache_dtype), dist.group.WORLD).follow()
        return
    engine = LLMEngine(model, None, spec.engine, spec.cache_dtype, tp_group=dist.group.WORLD)
    engine.runner.follow()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_torchrun(size: int | None, device: str | None) -> int:
    """Join the process group torchrun describes, whose ranks are the engine's; returns its size."""
    world = int(os.environ["WORLD_SIZE"])
    if size not in (None, world):
        raise ValueError(f"--tensor-parallel-size {size} under torchrun with {world} processes: the engine "
                         "takes every launched process (leave it out, or make them equal)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group(backend(device), timeout=_NO_TIMEOUT)
    return world


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)  # the leader is gone: nothing will ever ask this worker for a step
        time.sleep(0.5)


def _worker(rank: int, size: int, port: int, spec: ModelSpec, parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    dist.init_process_group(backend(spec.device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=_NO_TIMEOUT)
    try:
        follow_forever(spec, rank)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """Ranks 1 .. size-1 of a tensor-parallel engine, started as processes of this one; this
    process joins the group as rank 0."""

    def __init__(self, size: int, spec: ModelSpec):
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a process group: under torchrun, launch one "
                               "process per rank (`torchrun --nproc-per-node N -m dsv2 serve ...`) instead")
        port = _free_port()
        context = mp.get_context("spawn")
        self.procs = [context.Process(target=_worker, args=(r, size, port, spec, os.getpid()), daemon=True,
                                      name=f"dsv2-tp-worker-{r}") for r in range(1, size)]
        for p in self.procs:
            p.start()
        self.failure: str | None = None
        self._stopping = False
        self._busy = False
        threading.Thread(target=self._watch, daemon=True).start()
        dist.init_process_group(backend(spec.device), init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=size, timeout=_NO_TIMEOUT)

    def _scan(self) -> bool:
        """Whether a worker has died (its death then in `failure`)."""
        for r, p in enumerate(self.procs, 1):
            if self.failure is None and p.exitcode is not None and not self._stopping:
                self.failure = f"tensor-parallel worker {r} (pid {p.pid}) died with exit code {p.exitcode}"
        return self.failure is not None

    def _watch(self) -> None:
        while not self._stopping:
            if self._scan():
                self._end_if_stuck()
                return
            time.sleep(0.2)

    def _end_if_stuck(self) -> None:
        """A collective with a dead peer may wait forever (NCCL): give a step in progress a few
        seconds to fail on its own, then end the process, saying why. An idle leader learns of
        the death at its next step (`check`)."""
        time.sleep(5.0)
        if not self._busy:
            return
        print(f"dsv2: {self.failure}; ending the stuck engine", file=sys.stderr, flush=True)
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        os._exit(1)

    def __enter__(self) -> Workers:  # the engine holds the workers while a step runs
        self._busy = True
        return self

    def __exit__(self, *exc) -> None:
        self._busy = False

    def check(self, error: BaseException | None = None) -> None:
        """Raise a clear error if a worker died (`error`: what the leader saw, often a collective
        that failed a moment before the death shows in the process table)."""
        deadline = time.monotonic() + (2.0 if error is not None else 0.0)
        while not self._scan() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.failure is not None:
            raise RuntimeError(self.failure) from error

    def close(self, engine) -> None:
        """Stop the followers (the engine's last word) and wait for their processes."""
        if self._stopping:
            return
        self._stopping = True
        if self.failure is None:
            try:
                engine.stop_followers()
            except Exception:  # noqa: BLE001 - a group already broken: the processes are ended below
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.exitcode is None:
                p.kill()
                p.join()
        if dist.is_initialized():
            dist.destroy_process_group()
