"""AsyncLLM: the engine behind asyncio, streaming each request's outputs as they are produced.

The engine runs in its own thread (a model step blocks), fed through a command queue, so it is
only ever touched by that thread; outputs are handed to each request's asyncio queue. A consumer
that stops listening (a client that disconnects, a cancelled task) aborts its request and its
pages are freed on the engine thread's next pass.

Failures come in two kinds. A step that fails while running its batch (engine.StepError: out of
memory in the model, say) fails the requests it carried, which are aborted, and is counted; the
engine goes on with the rest. Anything else that escapes the loop (the scheduler, adding a
request) leaves the engine in a state nobody can vouch for: it is dead, every waiting request and
every later one gets EngineDeadError, and `on_dead` is called so that a server can exit and be
restarted, as vLLM's does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .engine import RequestOutput, StepError
from .llm import LLM
from .params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an unexpected exception; nothing more can be served."""


class EngineStoppedError(RuntimeError):
    """The engine was shut down (AsyncLLM.shutdown) before or while this request ran."""


class AsyncLLM:
    def __init__(self, model: str | Path, warmup: bool | None = None, **llm_kwargs):
        """warmup: run the engine through its step kinds before serving (LLMEngine.warmup);
        None = when its steps are compiled and captured (on CUDA), where a first request would
        otherwise wait for them."""
        self._llm = LLM(model, **llm_kwargs)
        self.engine = self._llm.engine
        self.warmup_report = None
        if warmup or (warmup is None and self.engine.runner.use_graphs):
            self.warmup_report = self.engine.warmup()
        self.tokenizer = self._llm.tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self.dead: EngineDeadError | None = None
        self.on_dead: Callable[[EngineDeadError], None] | None = None  # called on the engine thread
        self.step_errors = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv2-engine", daemon=True)
        self._thread.start()

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 -- whatever it was, the engine is gone
            log.exception("the engine loop stopped")
            self.dead = EngineDeadError(f"the engine stopped: {type(e).__name__}: {e}")
            for rid in list(self._streams):
                self._deliver(rid, self.dead)
            if self.on_dead is not None:
                self.on_dead(self.dead)
        finally:
            self._stopped.set()

    def _loop(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            try:
                cmd = self._commands.get(block=not busy, timeout=None if busy else 0.05)
                while True:  # everything else already queued, before the next step
                    if self._apply(cmd):
                        return
                    cmd = self._commands.get_nowait()
            except queue.Empty:
                pass
            if self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except StepError as e:
                    self.step_errors += 1
                    log.error("%s; failing requests %s", e, e.request_ids, exc_info=e.cause)
                    for rid in e.request_ids:
                        self.engine.abort_request(rid)
                        self._deliver(rid, e)
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)

    def _apply(self, cmd: tuple) -> bool:
        """Carry out one command; True for "stop" (every request aborted, its pages freed)."""
        kind, rid, *args = cmd
        if kind == "add":
            try:
                self.engine.add_request(rid, *args)
            except ValueError as e:
                self._deliver(rid, e)
        elif kind == "abort":
            self.engine.abort_request(rid)
        elif kind == "stop":
            for rid in list(self.engine.requests):
                self.engine.abort_request(rid)
            for rid in list(self._streams):
                self._deliver(rid, EngineStoppedError("the engine is shut down"))
            return True
        return False

    def _deliver(self, rid: str, item) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    # --- the asyncio side -----------------------------------------------------------------------
    async def generate(self, prompt: str | dict, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutput after every step that advanced it; the last one has
        finished=True. Leaving the loop early aborts the request."""
        ids, text = self._llm.encode(prompt)
        params = params or SamplingParams()
        if params.structured_outputs is not None:  # compiled here, not on the engine thread
            await asyncio.to_thread(self.compile_grammar, params)
        rid = request_id or f"req-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        # checked after registering: a death from now on reaches this stream through _run
        if self.dead is not None or self._stopped.is_set():
            self._streams.pop(rid, None)
            raise self.dead or EngineStoppedError("the engine is shut down")
        self._commands.put(("add", rid, ids, params, text))
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._commands.put(("abort", rid))

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile params' structured outputs into the engine's grammar cache in the calling thread
        (a ValueError naming the problem for a spec that does not compile). Compiling a large schema
        can take a second; done here, it never stalls the engine thread, which serves every
        request's steps, and a server refuses a bad spec before queuing the request."""
        if params.structured_outputs is not None:
            if self.engine.grammars is None:
                raise ValueError("structured outputs need a tokenizer; this engine has none")
            self.engine.grammars.compile(params.structured_outputs)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> dict:
        """A snapshot for metrics (read without locking: counters only)."""
        blocks = self.engine.blocks
        return {"running": len(self.engine.scheduler.running), "waiting": len(self.engine.scheduler.waiting),
                "cache_usage": blocks.usage, "free_blocks": blocks.num_free_blocks, "num_blocks": blocks.num_blocks,
                "num_preemptions": self.engine.scheduler.num_preemptions, "step_errors": self.step_errors}

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread once it has applied the commands before this one and aborted
        whatever is left (every cache page free)."""
        self._commands.put(("stop", None))
        self._thread.join(timeout=timeout)
        if not self._thread.is_alive():  # a step still running holds the workers
            self._llm.close()
