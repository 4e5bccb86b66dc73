"""How `dsv2 serve` ends: a bounded graceful shutdown on SIGTERM, and an exit on a dead engine.

SIGTERM (or SIGINT): the server drains. New requests get 503 with Retry-After and /health says
503 "draining", so a load balancer takes the instance out; requests in flight may finish until
--shutdown-timeout. Then each one still open is cut: a stream gets a final error event and
`data: [DONE]`, a plain request a 503. The engine aborts what is left (every cache page free),
uvicorn closes the connections, and the process exits 0. A second signal stops at once.

A dead engine (AsyncLLM.on_dead): every waiting request has already been failed with 500; the
server stops the same way, at once, and exits 1 so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvicorn

from ..engine.async_llm import EngineDeadError


class ServeProcess(uvicorn.Server):
    """uvicorn's server with dsv2's shutdown; `run()` then `exit_code`."""

    def __init__(self, config: uvicorn.Config, server, shutdown_timeout: float):
        super().__init__(config)
        self.app_server, self.shutdown_timeout = server, shutdown_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0
        self._stopping: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        self.app_server.engine.on_dead = lambda e: self.loop.call_soon_threadsafe(self._engine_died, e)
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        """uvicorn calls this on SIGINT / SIGTERM (from a signal handler)."""
        if self._stopping is not None or self.loop is None:
            self.should_exit = self.force_exit = True  # a second signal, or one before startup
            return
        self.loop.call_soon_threadsafe(self._begin, self.shutdown_timeout, "signal")

    def _begin(self, timeout: float, why: str) -> None:
        if self._stopping is None:
            self._stopping = self.loop.create_task(self._drain(timeout, why))

    def _engine_died(self, error: EngineDeadError) -> None:
        print(f"dsv2 serve: {error}; stopping (exit 1 for a supervisor to restart)", file=sys.stderr, flush=True)
        self.exit_code = 1
        self._begin(0.0, "engine")

    async def _drain(self, timeout: float, why: str) -> None:
        server = self.app_server
        server.draining = True
        if why == "signal":
            print(f"dsv2 serve: draining {server.in_flight} requests (up to {timeout:g} s)", flush=True)
        deadline = time.monotonic() + timeout
        while server.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = server.cut_all()
        # the cut requests end as soon as their handlers see it; a client that does not read its
        # stream cannot hold the exit longer than this
        deadline = time.monotonic() + 5.0
        while server.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        server.cut_count = cut
        self.should_exit = True
