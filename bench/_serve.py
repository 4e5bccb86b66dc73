"""A `dsv2 serve` of the benchmarks' own: started on a free local port (optionally with random
weights of a released shape), stopped at the end; and what its token stream means to a client.
Shared by bench/server_bench.py, bench/serving_bench.py and bench/hostile_bench.py."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from bench._log import stamped

from dsv2.cli import bundled_model_dir
from dsv2.config import PRESETS, preset

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
log = stamped("serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preset_name(name: str) -> str:
    """A --model-shape argument as a preset name (`v2-lite` for `deepseek-v2-lite`)."""
    if name in PRESETS:
        return name
    if f"deepseek-{name}" in PRESETS:
        return f"deepseek-{name}"
    raise SystemExit(f"--model-shape {name!r}: expected one of {', '.join(PRESETS)}")


def shape_model_dir(name: str, directory: Path) -> Path:
    """A model directory of preset `name`'s config.json (bf16) and the bundled tokenizer, for
    --load-format dummy."""
    config = preset(name).to_hf()
    config["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        shutil.copy(bundled_model_dir() / f, directory / f)
    return directory


def shape_serve_args(model_shape: str, serve_args: list[str], directory: Path) -> list[str]:
    """`serve_args` serving random bf16 weights of a preset's shape from `directory` (a released
    shape without its checkpoint; generated ids past the bundled tokenizer decode to no text, but
    each still travels as its own chunk)."""
    shape = preset_name(model_shape)
    model_dir = shape_model_dir(shape, directory)
    return ["--model", str(model_dir), "--load-format", "dummy", "--served-model-name", shape, *serve_args]


def start_server(serve_args: list[str], log_path: Path, timeout_s: float,
                 launcher: list[str] | None = None) -> tuple[str, subprocess.Popen]:
    """`python -m dsv2 serve` (or `launcher` + `serve`, e.g. a prelude through python -c) on a free
    local port; (its URL, its process) once /health answers. Its output goes to log_path (a pipe
    nobody reads could fill and stall it)."""
    port = free_port()
    cmd = [*(launcher or [sys.executable, "-m", "dsv2"]), "serve", "--host", "127.0.0.1", "--port", str(port),
           *serve_args]
    log(f"starting: {shlex.join(cmd[1:])[:200]}")
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"dsv2 serve did not come up (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    log(f"serving at {url}")
    return url, proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serving(serve_args: list[str], log_path: Path, timeout_s: float) -> Iterator[str]:
    """start_server until the block ends; yields its URL."""
    url, proc = start_server(serve_args, log_path, timeout_s)
    try:
        yield url
    finally:
        stop_server(proc)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def flag(args: list[str], name: str) -> str | None:
    """The value of `name` in a command line (`--name value` or `--name=value`), the last one
    winning."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def local_vocab(serve_args: list[str]) -> int:
    """The vocabulary of the model a started server loads (--model, else the bundled one)."""
    model = Path(flag(serve_args, "--model") or bundled_model_dir())
    return json.loads((model / "config.json").read_text())["vocab_size"]


def local_device(serve_args: list[str]) -> str:
    """The device a started server runs on, by name (the GPU's model on CUDA)."""
    import torch

    device = flag(serve_args, "--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else device


def is_token_chunk(choice: dict, chat: bool) -> bool:
    """Whether a streamed choice stands for one generated token.

    The server sends one chunk per engine step that advanced a sample (ChoiceStream.news), and a
    step advances a sample by exactly one token, so token chunks == generated tokens. Chunks are
    counted rather than text pieces because incremental detokenization holds back the text of a
    token that ends mid-character (its chunk has empty text) and ids past the tokenizer have none.
    Requesting logprobs would list each chunk's tokens explicitly, but it makes the engine run every
    step synchronously, changing what is measured. A chat stream's first chunk only names the role."""
    return not (chat and "role" in choice.get("delta", {}))
