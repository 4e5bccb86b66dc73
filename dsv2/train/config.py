"""TrainConfig: every setting of a training run, from a TOML file plus key=value overrides.

Defaults are the paper's recipe (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, warmup then x0.316
at 60% and 90% of tokens, balance factors 0.003/0.05/0.02); sizes default to a small run.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    # model: a preset name, or a directory / config.json; overrides apply on top (ModelConfig fields)
    model: str = "dsv2-small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # an HF-format model directory whose weights start the run (in place of `model` and the random
    # init), its config with model_overrides on top: e.g. a context extension with new rope keys
    init_from: str | None = None
    init_std: float = 0.006
    # data: a directory written by `dsv2 data prepare`
    data: str = "data/builtin"
    seq_len: int = 512
    # how long, and in what steps: batch sizes count sequences per optimizer step
    max_tokens: int = 10_000_000
    batch_start: int = 32
    batch_end: int = 32
    ramp_tokens: int = 0
    micro_batch: int = 8
    # optimizer and schedule
    lr: float = 4.2e-4
    warmup_steps: int = 2000
    decay_at: list[float] = field(default_factory=lambda: [0.6, 0.9])
    decay_factor: float = 0.316
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # balance losses; groups / device_limit default to the model's n_group / topk_group
    expert_alpha: float = 0.003
    device_alpha: float = 0.05
    comm_alpha: float = 0.02
    device_groups: int | None = None
    device_limit: int | None = None
    # token dropping (training only): 0 turns it off
    capacity_factor: float = 0.0
    undropped_fraction: float = 0.1
    # runtime
    device: str = "auto"  # auto: cuda when available
    autocast: str = "auto"  # auto: bf16 on cuda, none (fp32) on cpu; or bf16 / none
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    # several processes (torchrun): the [parallel] table, train/parallel.py's ParallelConfig
    parallel: dict[str, Any] = field(default_factory=dict)
    # output
    out: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    progress: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _HINTS[f.name])
        positive = ("seq_len", "max_tokens", "batch_start", "batch_end", "micro_batch", "log_every",
                    "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train config {name!r} = {getattr(self, name)!r}: must be positive")
        for name in ("batch_start", "batch_end"):
            if getattr(self, name) % self.micro_batch:
                raise ValueError(f"train config {name!r} = {getattr(self, name)}: must be a multiple of "
                                 f"micro_batch ({self.micro_batch})")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"train config 'autocast' = {self.autocast!r}: expected auto, bf16 or none")
        if not 0 <= self.undropped_fraction <= 1:
            raise ValueError("train config 'undropped_fraction' must be in [0, 1]")
        from .parallel import ParallelConfig

        ParallelConfig.from_dict(self.parallel)  # its own errors, naming the key

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "TrainConfig":
        """Read a TOML file (top-level keys; [model_overrides] and [parallel] tables) and apply
        key=value strings (model_overrides.X=..., parallel.X=... for the tables)."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                values = tomllib.loads(Path(path).read_text())
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: invalid TOML: {e}") from None
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r}: expected key=value")
            target = values
            for table in ("model_overrides", "parallel"):
                if key.startswith(table + "."):
                    target = values.setdefault(table, {})
                    key = key.removeprefix(table + ".")
            target[key.strip()] = _parse_value(raw.strip())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown train config key(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_HINTS = typing.get_type_hints(TrainConfig)


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string such as a path


def _check_type(name: str, value: Any, hint: Any) -> None:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    for opt in options:
        base = typing.get_origin(opt) or opt
        if opt is type(None) and value is None:
            return
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if base in (str, bool, list, dict) and isinstance(value, base):
            return
        if base is Any:
            return
    raise ValueError(f"train config {name!r} = {value!r}: expected {hint}")
