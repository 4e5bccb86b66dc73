"""What one client may cost the server: bounded request bodies, deadlines and a connection cap.

Two layers. Per request (plain ASGI, in the server's gate): a body over --max-request-bytes is
refused with 413 as soon as its Content-Length, or its bytes so far, say so, before anything is
parsed; a body not fully received within --body-timeout gets 408. Per connection (a thin wrapper
around uvicorn's own HTTP protocol, which has neither): beyond --max-connections open connections
a new one is answered 503 with Retry-After and closed; a connection whose request has not begun
(its headers complete) within --header-timeout of connecting, or of its previous response, is
closed, so idle sockets and clients dripping headers cannot pile up.

A 413 is sent before the unread rest of the body, and that rest is then read and dropped (up to
the body deadline) rather than left on the socket: closing a socket with unread input resets the
connection, and the client would see the reset instead of the 413 (nginx's lingering close).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from dataclasses import dataclass

from uvicorn.protocols.http.auto import AutoHTTPProtocol

MIB = 1 << 20


def default_max_request_bytes(max_model_len: int) -> int:
    """64 bytes a token of context, at least 1 MiB: a prompt filling the context as escaped JSON
    text (up to 6 bytes a character, several characters a token) or as token ids fits with room."""
    return max(MIB, 64 * max_model_len)


@dataclass
class Limits:
    max_request_bytes: int = MIB
    body_timeout: float = 30.0  # the whole body, from the request's start
    header_timeout: float = 10.0  # from connecting, or from the previous response, to a request
    max_connections: int = 4096

    def __post_init__(self):
        for name in ("max_request_bytes", "body_timeout", "header_timeout", "max_connections"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


class BodyRefused(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


async def read_body(scope, receive, send, limits: Limits) -> bytes:
    """The request's whole body, or BodyRefused after its refusal has been answered (413: over
    the size limit; 408: not received within the body deadline)."""
    deadline = time.monotonic() + limits.body_timeout
    declared = dict(scope["headers"]).get(b"content-length")
    too_large = (f"The request body is larger than this server's limit of {limits.max_request_bytes} bytes "
                 "(--max-request-bytes).")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        await _refuse_then_drain(receive, send, 413, too_large, "request_too_large", deadline)
        raise BodyRefused(413, "too_large", too_large)
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            slow = f"The request body did not arrive within {limits.body_timeout:g} s (--body-timeout)."
            await _respond(send, 408, _error_body(slow, "request_timeout"))
            raise BodyRefused(408, "body_timeout", slow) from None
        if message["type"] == "http.disconnect":
            raise BodyRefused(499, "disconnected", "the client went away while sending its body")
        size += len(message.get("body", b""))
        if size > limits.max_request_bytes:
            await _refuse_then_drain(receive, send, 413, too_large, "request_too_large", deadline)
            raise BodyRefused(413, "too_large", too_large)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive() that gives the buffered body first, then the connection's own messages (a
    disconnect, for the routes that watch for one)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _respond(send, status: int, body: bytes, more: bool = False) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def _refuse_then_drain(receive, send, status: int, message: str, code: str, deadline: float) -> None:
    """Answer now, then read and drop what the client still sends, until its body ends or the
    deadline passes; the response completes after that, and the connection closes."""
    await _respond(send, status, _error_body(message, code), more=True)
    try:
        while True:
            msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                break
    except TimeoutError:
        pass
    await send({"type": "http.response.body", "body": b"", "more_body": False})


# --- connections ------------------------------------------------------------------------------

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
         b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class ConnectionGuard:
    """The open connections, their request deadlines and the cap; shared by every connection's
    protocol (guarded_http) and told by the gate when a request starts and when its response ends."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.open: set[_Guarded] = set()
        self.by_client: dict[tuple, _Guarded] = {}  # (host, port), as ASGI scopes name the client
        self.refused = 0  # connections answered 503 at the cap
        self.timed_out = 0  # connections closed at the header deadline

    def request_started(self, client) -> None:
        conn = self.by_client.get(tuple(client)) if client else None
        if conn is not None:
            conn.disarm()

    def response_done(self, client) -> None:
        conn = self.by_client.get(tuple(client)) if client else None
        if conn is not None:
            conn.arm()


class _Guarded(asyncio.Protocol):
    """One connection: uvicorn's protocol inside, the cap and the header deadline outside."""

    guard: ConnectionGuard  # set on the subclass that guarded_http makes

    def __init__(self, **uvicorn_kwargs):
        self.inner = AutoHTTPProtocol(**uvicorn_kwargs)
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.client = None
        self.admitted = False
        self.timer: asyncio.TimerHandle | None = None
        self.partial = False  # bytes of a request arrived since the deadline was armed

    def connection_made(self, transport) -> None:
        self.transport, guard = transport, self.guard
        if len(guard.open) >= guard.limits.max_connections:
            guard.refused += 1
            body = _error_body(f"The server has {len(guard.open)} connections open (--max-connections); "
                                    "retry shortly.", "server_busy")
            transport.write(_BUSY % (len(body), body))
            transport.close()
            return
        self.admitted = True
        guard.open.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = tuple(peer[:2])
            guard.by_client[self.client] = self
        self.arm()
        self.inner.connection_made(transport)

    def arm(self) -> None:
        self.disarm()
        self.partial = False
        self.timer = self.loop.call_later(self.guard.limits.header_timeout, self._expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        self.guard.timed_out += 1
        if self.partial:  # a request began and its headers never completed
            self.transport.write(_TIMEOUT)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.partial = True
            self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received() if self.admitted else None

    def connection_lost(self, exc) -> None:
        self.disarm()
        if self.admitted:
            self.guard.open.discard(self)
            if self.client is not None and self.guard.by_client.get(self.client) is self:
                del self.guard.by_client[self.client]
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()


def guarded_http(guard: ConnectionGuard) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (Config(http=...)): its own, behind `guard`."""
    return type("GuardedHTTP", (_Guarded,), {"guard": guard})


def raise_open_files_limit(needed: int) -> int:
    """Lift this process's soft limit on open files towards `needed` (the hard limit caps it);
    the limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft
