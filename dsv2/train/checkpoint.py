"""Training checkpoints: everything a resume needs, written atomically, verified on the way back.

A checkpoint is a directory `checkpoints/step-00000100/` holding the model in HF format (loadable
by the engine and transformers as it is), `trainer.pt` (optimizer, schedule position, data
position, RNG states, config) and `manifest.json` with every file's size and sha256, written
last. The directory is assembled under a temporary name and renamed into place, so a crash leaves
either a whole checkpoint or none; one damaged later (truncated, edited) fails its manifest and
the previous good one is used instead, with a message.

A run on several processes (train/parallel.py) writes sharded checkpoints instead: `dcp/` holds the
model and optimizer state as torch.distributed.checkpoint wrote them, each rank its shards, with
`config.json` (the model's) beside `trainer.pt`. DCP reshards on load, so such a checkpoint resumes on
any number of processes, one included; `dsv2 export` turns it into the HF-format model directory.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_model
from ..model import Transformer

MANIFEST = "manifest.json"
SHARDS = "dcp"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _paths(run_dir: Path, step: int) -> tuple[Path, Path]:
    root = run_dir / "checkpoints"
    return root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"


def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    _, tmp = _paths(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "state": state, "rng": rng_state()}, tmp / "trainer.pt")
    return _seal(run_dir, step, keep)


def _seal(run_dir: Path, step: int, keep: int) -> Path:
    """The manifest of the assembled checkpoint, written last; then the rename into place."""
    final, tmp = _paths(run_dir, step)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=2))
    for p in files + [tmp / MANIFEST]:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def verify(path: Path) -> str | None:
    """None if the checkpoint matches its manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        return f"no readable {MANIFEST} ({e.__class__.__name__})"
    for name, info in manifest.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, manifest says {info['bytes']}"
        if _sha256(p) != info["sha256"]:
            return f"{name} does not match its sha256"
    return None


def latest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are reported and skipped."""
    for path in reversed(checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        print(f"dsv2: checkpoint {path} is damaged ({problem}); trying the previous one", file=sys.stderr)
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)


def is_sharded(path: Path) -> bool:
    return (path / SHARDS).is_dir()


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: dict[str, Any], keep: int, d, model_config, asynchronous: bool = False):
    """Every rank writes its shards of the model and optimizer (DCP); rank 0 the rest, the manifest and
    the rename, once all shards are down. Returns a function that finishes the checkpoint and returns
    its path: called at once, or, `asynchronous`, when the caller next needs it done (DCP's async_save
    copies the state to host memory before it returns, so training goes on while the files are
    written; until the finish the checkpoint is an unsealed temporary directory that resume ignores)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = _paths(run_dir, step)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    shards = {"model": model_state, "optimizer": optim_state}
    trainer = copy.deepcopy({"state": state, "rng": rng_state(), "world_size": d.world})  # as of this step
    future = None
    if asynchronous:
        future = dcp.async_save(shards, checkpoint_id=str(tmp / SHARDS), process_group=_checkpoint_group())
    else:
        dcp.save(shards, checkpoint_id=str(tmp / SHARDS))

    def finish() -> Path:
        if future is not None:
            future.result()
        d.barrier()
        if d.main:
            torch.save(trainer, tmp / "trainer.pt")
            (tmp / "config.json").write_text(json.dumps(model_config.to_hf(), indent=2) + "\n")
            _seal(run_dir, step, keep)
        d.barrier()
        return final

    return finish if asynchronous else finish()


@functools.cache
def _checkpoint_group():
    """A gloo group of every rank for the background save's own collectives, apart from training's."""
    return torch.distributed.new_group(backend="gloo")


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A sharded checkpoint's model and optimizer state into `model` as it is sharded now (or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    single = not torch.distributed.is_initialized()  # one process reads every shard
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / SHARDS), no_dist=single)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A single-process checkpoint's optimizer state (torch's format: parameters by position) onto a
    sharded model's optimizer: the positions named as the parameters they were (the groups of
    loop.param_groups, in model order), then sharded by set_optimizer_state_dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for group in _param_names(model) for n in group]
    full = {"state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def _param_names(model: torch.nn.Module) -> list[list[str]]:
    """Parameter names in loop.param_groups' order: the decayed (2-D and up), then the rest."""
    named = list(model.named_parameters())
    return [[n for n, p in named if p.ndim >= 2], [n for n, p in named if p.ndim < 2]]


def export(checkpoint: Path, out: Path) -> None:
    """A training checkpoint (sharded or not) as an HF-format model directory: config.json and
    safetensors, what load_model, transformers and the engine read."""
    from ..config import ModelConfig

    problem = verify(checkpoint)
    if problem is not None:
        raise ValueError(f"checkpoint {checkpoint} is damaged: {problem}")
    if not is_sharded(checkpoint):
        shutil.copytree(checkpoint / "model", out, dirs_exist_ok=False)
        return
    model = Transformer(ModelConfig.from_hf(checkpoint))
    model.load_state_dict(_whole_model(checkpoint))
    save_model(model, out)


_PART = re.compile(r"^(.*\.experts)\.part(\d+)\.(gate_up_proj|down_proj)(\..*)?$")


def _read_all(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint under `prefix` ("model." or "optimizer.state."), read
    whole by this process alone, with the prefix dropped."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path / SHARDS))
    stored = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {k.removeprefix(prefix): t for k, t in state.items()}


def _join_parts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expert-parallel parts (`experts.partG.X[.suffix]`, G = EP rank) joined in rank order into
    `experts.X[.suffix]`; a 0-d entry (an optimizer step count) is the same in every part."""
    whole, parts = {}, {}
    for name, t in state.items():
        m = _PART.match(name)
        if m:
            parts.setdefault(f"{m[1]}.{m[3]}{m[4] or ''}", {})[int(m[2])] = t
        else:
            whole[name] = t
    for name, pieces in parts.items():
        ordered = [pieces[g] for g in sorted(pieces)]
        whole[name] = ordered[0] if ordered[0].dim() == 0 else torch.cat(ordered)
    return whole


def _whole_model(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a sharded checkpoint as the unsharded model names them."""
    return _join_parts(_read_all(path, "model."))


def load_any_layout(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, unsplit: torch.nn.Module,
                    saved: dict[str, Any]) -> None:
    """A checkpoint written with another expert-parallel layout (another `ep`, or one process) into
    this run's: every rank reads the whole model and optimizer state, joins the expert parts, takes
    its own experts back out and loads the result as full tensors that FSDP2 shards. `unsplit`: the
    model as one process builds it (meta is enough), whose parameter order names a single-process
    checkpoint's optimizer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_state_dict,
    )

    if is_sharded(path):
        weights = _whole_model(path)
        flat = _join_parts(_read_all(path, "optimizer.state."))
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            name, _, field = key.rpartition(".")
            optim.setdefault(name, {})[field] = t
    else:
        from ..checkpoint import load_model

        weights = load_model(path / "model", quantization="none").state_dict()
        names = [n for group in _param_names(unsplit) for n in group]
        optim = {names[i]: v for i, v in saved["optimizer"]["state"].items()}
    full = StateDictOptions(full_state_dict=True)
    # the names only: model.state_dict() of a sharded model gathers nothing
    mine_model = {name: _own_part(name, weights[_unsplit_name(name)], model) for name in model.state_dict()}
    current = get_optimizer_state_dict(model, optimizer, options=full)
    mine_optim = {"state": {name: {k: _own_part(name, v, model) for k, v in optim[_unsplit_name(name)].items()}
                            for name in current["state"]},
                  "param_groups": current["param_groups"]}
    set_state_dict(model, optimizer, model_state_dict=mine_model, optim_state_dict=mine_optim, options=full)


def _unsplit_name(name: str) -> str:
    m = _PART.match(name)
    return f"{m[1]}.{m[3]}{m[4] or ''}" if m else name


def _own_part(name: str, whole: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """This rank's piece of `whole`, the unsplit tensor that `name` (this run's name) is part of: its
    experts' rows for an expert-parallel part, all of it otherwise."""
    m = _PART.match(name)
    if m is None or whole.dim() == 0:
        return whole
    per = model.get_submodule(f"{m[1]}.part{m[2]}").n_experts
    return whole[int(m[2]) * per:(int(m[2]) + 1) * per]
