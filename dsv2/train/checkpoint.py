"""Training checkpoints: everything a resume needs, written atomically, verified on the way back.

A checkpoint is a directory `checkpoints/step-00000100/` holding the model in HF format (loadable
by the engine and transformers as it is), `trainer.pt` (optimizer, schedule position, data
position, RNG states, config) and `manifest.json` with every file's size and sha256, written
last. The directory is assembled under a temporary name and renamed into place, so a crash leaves
either a whole checkpoint or none; one damaged later (truncated, edited) fails its manifest and
the previous good one is used instead, with a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_model
from ..model import Transformer

MANIFEST = "manifest.json"


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


def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "state": state, "rng": rng_state()}, tmp / "trainer.pt")
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
