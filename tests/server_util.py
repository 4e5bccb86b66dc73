"""A real `dsv2 serve` process on localhost for the server tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx

from bench.server_bench import stop_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess(subprocess.Popen):
    """The server's process, its stdout and stderr read as they come (a server logging tracebacks
    would otherwise block on a full pipe) and kept in `output`."""

    def __init__(self, cmd: list[str], env: dict):
        super().__init__(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        """Everything printed so far; all of it once the process has exited."""
        if self.poll() is not None:
            self._reader.join(timeout=5)
        return "".join(self.lines)


@contextlib.contextmanager
def running_server(*args: str, env: dict | None = None, timeout: float = 120.0,
                   launcher: list[str] | None = None) -> Iterator[tuple[str, ServerProcess]]:
    """Start `python -m dsv2 serve --port P *args` (the bundled model unless --model is given; with
    `launcher` in place of `python -m dsv2`) on CPU and yield (base URL, process) once /health
    answers; stop it (SIGTERM) afterwards."""
    port = free_port()
    cmd = [*(launcher or [sys.executable, "-m", "dsv2"]), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", *args]
    proc = ServerProcess(cmd, {**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dsv2 serve exited with {proc.returncode}:\n{proc.output}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("dsv2 serve did not come up")
            time.sleep(0.2)
        yield url, proc
    finally:
        stop_server(proc)
