"""The OpenAI-compatible HTTP API over AsyncLLM, and the chat page.

Every error leaves as OpenAI's JSON error body. The gate reads a request's body within its limits
(limits.py) before any route sees it; the routes parse it, apply the chat template and tokenize in
a worker thread, so that the event loop (every other request's tokens, /health) never waits on
one large request. A prompt that cannot fit the context is refused before it is tokenized. A
request is admitted (counted in flight) before it reaches the engine and refused with 429 when
--max-pending are already in flight. Streams are Server-Sent Events ending in `data: [DONE]`; a
client that goes away mid-request has its engine requests aborted (their cache pages freed)
through the generators' cleanup. While the server drains (lifecycle.py) new requests get 503, and
at the drain's deadline every request still running is cut with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..engine.async_llm import AsyncLLM, EngineDeadError, EngineStoppedError
from ..engine.engine import RequestOutput, StepError
from ..engine.params import SamplingParams
from .limits import BodyRefused, ConnectionGuard, Limits, read_body, replay
from .metrics import Metrics
from .openai_format import ChoiceStream, TokenText, chat_logprobs, completion_logprobs, envelope, new_id, usage
from .protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingRequest, TokenizeRequest, parse,
)

def shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down; retry on another instance.", type="server_shutdown",
                    code="shutting_down", headers={"Retry-After": "1"})


class Server:
    """State shared by the routes: the engine, the served names, admission and metrics."""

    def __init__(self, engine: AsyncLLM, model_name: str | Sequence[str], api_key: str | None = None,
                 max_pending: int = 1024, limits: Limits | None = None):
        # several names, as vLLM's --served-model-name: requests may use any, responses echo theirs
        self.model_names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
        if not self.model_names:
            raise ValueError("at least one served model name")
        self.model_name = self.model_names[0]
        self.engine, self.api_key, self.max_pending = engine, api_key, max_pending
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model.config.vocab_size
        self.token_text = TokenText(engine.tokenizer)
        self.limits = limits or Limits()
        self.guard = ConnectionGuard(self.limits)
        self.metrics = Metrics()
        self.in_flight = 0
        self.created = int(time.time())
        self.draining = False  # lifecycle.py: new requests get 503
        self.cut_count = 0  # requests cut at the drain's deadline
        self._runs: set[asyncio.Queue] = set()  # the output queue of every request running

    def cut_all(self) -> int:
        """End every running request with shutting_down() (a stream's last event, or a 503); the
        number cut. Their engine requests are aborted as their handlers unwind."""
        for q in self._runs:
            q.put_nowait((None, shutting_down()))
        return len(self._runs)

    # --- checks ---------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            served = ", ".join(f"`{n}`" for n in self.model_names)
            raise ApiError(400, f"The model `{model}` does not exist; this server serves {served}.",
                           param="model", code="model_not_found")

    def fits(self, text: str) -> None:
        """Refuse a text that cannot fit the context, before paying to tokenize it."""
        at_least = self.engine.tokenizer.min_tokens(text)
        if at_least >= self.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has at least {at_least} ({len(text.encode())} bytes).", param="prompt",
                           code="context_length_exceeded")

    def params(self, req: SamplingRequest, ids: list[int], max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The request's SamplingParams for one prompt, after the context-length checks."""
        if not ids:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ApiError(400, f"Prompt token ids must be in [0, {self.vocab_size}).", param="prompt")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {len(ids)}, leaving no room for a completion.", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif not 1 <= max_tokens <= room:
            raise ApiError(400, f"max_tokens must be in [1, {room}]: this model's maximum context length is "
                                f"{self.max_model_len} tokens and the prompt has {len(ids)}.", param="max_tokens")
        spec, field = req.structured()
        params = req.sampling_params(max_tokens, logprobs, spec)
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise ApiError(400, f"logit_bias token ids must be in [0, {self.vocab_size}), got {max(params.logit_bias)}",
                           param="logit_bias")
        if spec is not None:
            # compiled here, in the request's worker thread: a malformed spec is a 400 before the
            # request is queued, and the engine thread finds the grammar in its cache
            try:
                self.engine.compile_grammar(params)
            except ValueError as e:
                raise ApiError(400, f"{field}: {e}", param=field) from None
        return params

    def admit(self) -> None:
        """Count a request in flight, or refuse it when --max-pending already are; release() it."""
        if self.in_flight >= self.max_pending:
            raise ApiError(429, f"The server has {self.in_flight} requests in flight (--max-pending); retry shortly.",
                           type="server_busy", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    async def answer(self, request: Request, outputs: AsyncIterator[tuple[int, RequestOutput]], n_prompts: int,
                     stream: bool, chunks) -> StreamingResponse | list[RequestOutput]:
        """Admit the request; then either the final outputs (non-streaming) or the SSE response
        built from chunks(), which keeps the request in flight until the stream ends."""
        self.admit()
        if stream:
            return _Stream(chunks(), self.release)
        try:
            return await _collect(request, outputs, n_prompts)
        finally:
            self.release()

    # --- running prompts ------------------------------------------------------------------------
    async def run(self, jobs: list[tuple[list[int], str | None, SamplingParams]], request_id: str,
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every prompt's outputs as (prompt index, RequestOutput), interleaved as produced. Closing
        the iterator early cancels the rest, which aborts their engine requests."""
        arrival = time.perf_counter()
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, ids: list[int], text: str | None, params: SamplingParams) -> None:
            try:
                async for out in self.engine.generate({"prompt_token_ids": ids, "prompt": text}, params,
                                                      f"{request_id}-{i}"):
                    q.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 -- handed to the consumer
                q.put_nowait((i, e))

        if self.draining:
            raise shutting_down()
        tasks = [asyncio.create_task(pump(i, *job)) for i, job in enumerate(jobs)]
        self._runs.add(q)
        last = [None] * len(jobs)
        remaining, finished_cleanly = len(jobs), False
        self.metrics.prompt_tokens += sum(len(ids) * params.n for ids, _, params in jobs)
        try:
            while remaining:
                i, out = await q.get()
                if isinstance(out, Exception):
                    raise _api_error(out)
                now = time.perf_counter()
                if last[i] is None:
                    self.metrics.ttft.observe(now - arrival)
                else:
                    self.metrics.itl.observe(now - last[i])
                last[i] = now
                if out.finished:
                    remaining -= 1
                    self.metrics.generation_tokens += sum(len(c.token_ids) for c in out.outputs)
                yield i, out
            finished_cleanly = True
            self.metrics.e2e.observe(time.perf_counter() - arrival)
        finally:
            self._runs.discard(q)
            if not finished_cleanly:
                self.metrics.aborted += 1
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _api_error(e: Exception) -> Exception:
    """What the engine's failures mean to the client."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    if isinstance(e, EngineDeadError):
        return ApiError(500, f"{e}; the server is exiting, to be restarted.", type="server_error", code="engine_dead")
    if isinstance(e, StepError):
        return ApiError(500, f"{e}; this request is lost, others go on.", type="server_error",
                        code="engine_step_failed")
    if isinstance(e, EngineStoppedError):
        return shutting_down()
    return e


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, outputs: AsyncIterator[tuple[int, RequestOutput]],
                   n_prompts: int) -> list[RequestOutput]:
    """The final output of every prompt; aborts them if the client leaves before they finish."""
    async def gather():
        final = [None] * n_prompts
        async for i, out in outputs:
            final[i] = out
        return final

    work, gone = asyncio.create_task(gather()), asyncio.create_task(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            await outputs.aclose()
    if work.cancelled():
        raise ApiError(499, "client disconnected")
    return work.result()


class _Stream(StreamingResponse):
    """An SSE response that releases its admission however it ends, even unstarted."""

    def __init__(self, chunks: AsyncIterator[dict], release):
        super().__init__(_event_stream(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._chunks, self._release = chunks, release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            await self._chunks.aclose()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _event_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield _sse(chunk)
    except ApiError as e:
        yield _sse(e.body())
    except Exception as e:  # noqa: BLE001 -- the headers are sent: the error travels in the stream
        yield _sse(ApiError(500, f"internal error: {e}", type="server_error").body())
    yield "data: [DONE]\n\n"


class _Gate:
    """Before any route, as plain ASGI (streams pass untouched): the connection's request deadline
    off and on again (limits.ConnectionGuard), 503 while draining, the API key, the body read
    within its size and time limits, and the request counts of /v1/*."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server, client = self.server, scope.get("client")
        server.guard.request_started(client)
        api = scope["path"].startswith("/v1/")
        status = 500

        async def tracked(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                server.guard.response_done(client)

        try:
            try:
                if api and server.draining:
                    raise shutting_down()
                if api:
                    server.check_key(Request(scope))
            except ApiError as e:
                headers = {**(e.headers or {}), **({"Connection": "close"} if e.status == 503 else {})}
                return await JSONResponse(e.body(), status_code=e.status, headers=headers)(scope, receive, tracked)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    receive = replay(await read_body(scope, receive, tracked, server.limits), receive)
                except BodyRefused as e:
                    server.metrics.refused[e.reason] += 1
                    status = e.status
                    return
            await self.app(scope, receive, tracked)
        finally:
            if api:
                server.metrics.requests[(scope["path"], status)] += 1


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # the drain (lifecycle.py) has ended or cut every request before this runs
        server.engine.shutdown()
        blocks = server.engine.engine.blocks
        print(f"dsv2 serve: stopped; {server.cut_count} requests cut at the deadline; KV cache: "
              f"{blocks.num_free_blocks} of {blocks.num_blocks} blocks free", flush=True)

    app = FastAPI(title="dsv2", description="OpenAI-compatible API of a DeepSeek-V2 model", lifespan=lifespan)
    app.state.server = server
    page = (files("dsv2.server") / "static" / "chat.html").read_text()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown path or method, unparsable body
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug, an engine failure: OpenAI's shape too
        return JSONResponse(ApiError(500, f"internal error: {e}", type="server_error").body(), status_code=500)

    app.add_middleware(_Gate, server=server)
    app.openapi = functools.partial(_openapi, app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        if server.engine.dead is not None:
            return JSONResponse({"status": "dead", "error": str(server.engine.dead)}, status_code=503)
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Connection": "close"})
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.in_flight, server.engine.stats(), server.guard),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created, "owned_by": "dsv2",
                                            "root": server.model_name, "max_model_len": server.max_model_len}
                                           for name in server.model_names]}

    @app.post("/tokenize", openapi_extra=_body(TokenizeRequest))
    async def tokenize(request: Request):
        return await run_in_threadpool(_tokenize, server, await request.body())

    @app.post("/detokenize", openapi_extra=_body(DetokenizeRequest))
    async def detokenize(request: Request):
        return await run_in_threadpool(_detokenize, server, await request.body())

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(request: Request):
        req, prompts, jobs = await run_in_threadpool(_prepare_completion, server, await request.body())
        rid, model, created = new_id("cmpl"), req.model, int(time.time())
        tokenizer = server.engine.tokenizer

        def echo(i: int) -> str:
            ids, text = prompts[i]
            return (text if text is not None else tokenizer.decode(ids)) if req.echo else ""

        def choice(i: int, c, text: str, start: int, finish: str | None, offset: int) -> dict:
            return {"index": i * req.n + c.index, "text": text,
                    "logprobs": completion_logprobs(c, start, server.token_text, offset) if c.logprobs is not None
                    else None, "finish_reason": finish, "stop_reason": c.stop_reason if finish else None}

        outputs = server.run(jobs, rid)

        async def chunks():
            streams = [ChoiceStream(req.n) for _ in jobs]
            sent_chars = [[0] * req.n for _ in jobs]
            final = [None] * len(jobs)
            async with contextlib.aclosing(outputs):
                async for i, out in outputs:
                    final[i] = out
                    for c, text, start, finish in streams[i].news(out):
                        if start == 0 and req.echo:
                            text = echo(i) + text
                        yield envelope(rid, "text_completion", model,
                                       [choice(i, c, text, start, finish, sent_chars[i][c.index])], created)
                        sent_chars[i][c.index] += len(text)
            if req.include_usage:
                yield envelope(rid, "text_completion", model, [], created, usage=_usage(final))

        answer = await server.answer(request, outputs, len(jobs), req.stream, chunks)
        if req.stream:
            return answer
        choices = [choice(i, c, echo(i) + c.text, 0, c.finish_reason, 0) for i, out in enumerate(answer)
                   for c in out.outputs]
        return envelope(rid, "text_completion", model, choices, created, usage=_usage(answer))

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req, jobs = await run_in_threadpool(_prepare_chat, server, await request.body())
        top_n = req.top_logprobs or 0
        rid, model, created = new_id("chatcmpl"), req.model, int(time.time())

        def logprobs(c, start: int):
            return chat_logprobs(c, start, top_n, server.token_text) if c.logprobs is not None else None

        outputs = server.run(jobs, rid)

        async def chunks():
            stream, out = ChoiceStream(req.n), None
            for k in range(req.n):  # the role first, as OpenAI's streams begin
                yield envelope(rid, "chat.completion.chunk", model, [
                    {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}], created)
            async with contextlib.aclosing(outputs):
                async for _, out in outputs:
                    for c, text, start, finish in stream.news(out):
                        yield envelope(rid, "chat.completion.chunk", model, [
                            {"index": c.index, "delta": {"content": text} if text else {},
                             "logprobs": logprobs(c, start), "finish_reason": finish,
                             "stop_reason": c.stop_reason if finish else None}], created)
            if req.include_usage:
                yield envelope(rid, "chat.completion.chunk", model, [], created, usage=_usage([out]))

        answer = await server.answer(request, outputs, 1, req.stream, chunks)
        if req.stream:
            return answer
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs(c, 0), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for c in answer[0].outputs]
        return envelope(rid, "chat.completion", model, choices, created, usage=_usage(answer))

    return app


def _usage(final: list[RequestOutput]) -> dict:
    return usage(sum(len(o.prompt_token_ids) for o in final),
                 sum(len(c.token_ids) for o in final for c in o.outputs))


# --- off the event loop: parsing, templating, tokenizing (run_in_threadpool) ------------------------

def _prepare_completion(server: Server, body: bytes):
    """(request, [(ids, text)] per prompt, jobs) of a /v1/completions body."""
    req = parse(CompletionRequest, body)
    server.check_model(req.model)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, "best_of other than n is not supported", param="best_of")
    if req.echo and req.logprobs is not None:
        raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
    prompts = _completion_prompts(server, req.prompt)
    return req, prompts, [(ids, text, server.params(req, ids, req.max_tokens, req.logprobs)) for ids, text in prompts]


def _completion_prompts(server: Server, prompt) -> list[tuple[list[int], str | None]]:
    """(token ids, text) of each prompt: a string, strings, token ids, or lists of token ids."""
    tokenizer = server.engine.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    texts = [p for p in prompt if isinstance(p, str)]
    for text in texts:
        server.fits(text)
    encoded = iter(tokenizer.encode_batch(texts, add_bos=tokenizer.bos_token_id is not None))
    return [(next(encoded), p) if isinstance(p, str) else (list(p), None) for p in prompt]


def _prepare_chat(server: Server, body: bytes):
    """(request, jobs) of a /v1/chat/completions body."""
    req = parse(ChatCompletionRequest, body)
    server.check_model(req.model)
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tokenizer = server.engine.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    server.fits(text)
    ids = tokenizer.encode_batch([text])[0]  # the template writes BOS itself
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return req, [(ids, None, server.params(req, ids, max_tokens, logprobs))]


def _tokenize(server: Server, body: bytes) -> dict:
    """vLLM's /tokenize answer: the ids the completion or chat endpoint would feed the model."""
    req = parse(TokenizeRequest, body)
    if req.model is not None:
        server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
    tokenizer = server.engine.tokenizer
    if req.prompt is not None:
        server.fits(req.prompt)
        ids = tokenizer.encode(req.prompt, add_bos=req.add_special_tokens and tokenizer.bos_token_id is not None)
    else:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                 tokenize=False)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        server.fits(text)
        ids = tokenizer.encode_batch([text])[0]  # the template writes BOS itself
    return {"tokens": ids, "count": len(ids), "max_model_len": server.max_model_len}


def _detokenize(server: Server, body: bytes) -> dict:
    req = parse(DetokenizeRequest, body)
    if req.model is not None:
        server.check_model(req.model)
    bad = next((t for t in req.tokens if t >= server.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (size {server.vocab_size})", param="tokens")
    return {"prompt": server.engine.tokenizer.decode(req.tokens)}


# --- the OpenAPI schema of bodies the routes parse themselves ------------------------------------------

def _body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema with the request models under components (the routes read raw bodies, so
    FastAPI does not see them), for clients and for the fuzz tests that read it."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema
