"""Files shipped inside the package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def bundled_model_dir() -> Path:
    """The small model shipped in the package, trained on the built-in corpus (configs/bundled.toml)."""
    return Path(str(files("dsv2") / "bundled"))
