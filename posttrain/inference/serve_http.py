"""How ``posttrain serve`` meets the network: who may ask (``Access``, enforced by ``Guard``), how a
body is read (``read_body``: size and time bounded), how a stream is written (``TimedStream``), and
uvicorn with a deadline for request headers and JSON answers to malformed HTTP (``protocol``).

Access: with an API key (``--api-key`` or ``POSTTRAIN_API_KEY``) every route but the chat page's own
file needs ``Authorization: Bearer <key>`` (401 otherwise, compared in constant time). Without a
key the server binds only to a loopback address and answers only requests whose ``Host`` is a
loopback name, so a web page on another site cannot reach it through DNS rebinding; ``--accept-weights``
and any other bind need a key. A request that carries an ``Origin`` (a browser's) is refused (403)
unless the origin is the server's own (the chat page) or named by ``--allowed-origins``, which also
get CORS headers.

Timeouts: a connection must deliver each request's headers within ``Timeouts.request`` (408, then
closed; sending a byte at a time does not extend it) and a JSON body within the same time again; a
weights upload may not pause longer than that between chunks. A stream's client must take each write
within ``Timeouts.write``. An idle kept-alive connection is closed after ``Timeouts.keep_alive``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import h11
from starlette.responses import JSONResponse, StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from posttrain.errors import UserError
from posttrain.inference.api import KEY_ENV, Limits, parse_json

PAGE_PATHS = ("/", "/chat", "/index.html")  # the chat page: the one route that needs no key
LOOPBACK_NAMES = ("localhost",)
CLOSE = {"Connection": "close"}  # an answer before the whole body was read: the connection cannot be reused
logger = logging.getLogger("posttrain.serve")


@dataclass(frozen=True)
class Access:
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # besides the server's own; "*": any
    accept_weights: bool = False
    loopback: bool = True  # bound to a loopback address: the Host header must name one


@dataclass(frozen=True)
class Timeouts:
    request: float = 30.0  # a request's headers, then its JSON body; a weights upload's pauses between chunks
    write: float = 60.0  # one chunk of a streamed reply the client does not read
    keep_alive: int = 5  # an idle connection between requests


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(host: str, access: Access) -> None:
    """Refuse to start a server that would be open to strangers."""
    if access.accept_weights and not access.api_key:
        raise UserError(f"--accept-weights needs an API key (--api-key or {KEY_ENV}): whoever can reach the port "
                        "could replace the model")
    if not is_loopback(host) and not access.api_key:
        raise UserError(f"--host {host}: serving beyond this machine needs an API key (--api-key or {KEY_ENV})")
    if access.api_key is not None and len(access.api_key) < 8:
        raise UserError("the API key must have at least 8 characters")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Refused(Exception):
    """An HTTP error answer: ``status`` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers


class Guard:
    """ASGI middleware: the Host, Origin and API-key checks of ``Access`` (module docstring)."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access
        self.key = access.api_key.encode() if access.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        await JSONResponse(refusal.body, refusal.status, headers=refusal.headers)(scope, receive, send)

    def refusal(self, scope, headers: dict) -> Refused | None:
        host = headers.get("host", "")
        if self.access.loopback and not is_loopback(host.rsplit(":", 1)[0] if not host.endswith("]") else host):
            return Refused(403, f"Host {host!r} is not a loopback name: this server answers this machine only",
                           "forbidden", "Host")
        origin = headers.get("origin")
        if origin is not None:
            own = origin.lower() == f"{scope.get('scheme', 'http')}://{host}".lower()
            if not (own or origin in self.access.allowed_origins or "*" in self.access.allowed_origins):
                return Refused(403, f"requests from Origin {origin} are refused (serve --allowed-origins names the "
                                    "ones to accept)", "forbidden", "Origin")
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return None  # a CORS preflight of an allowed origin: CORSMiddleware answers it
        if scope["method"] in ("GET", "HEAD") and scope["path"] in PAGE_PATHS:
            return None  # the chat page's own file: it asks for the key itself
        if self.key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key):
                return Refused(401, "a valid API key is needed (Authorization: Bearer <key>)", "authentication_error",
                               "Authorization", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return None


async def read_body(request, limit: int, timeout: float, idle: bool = False) -> bytes:
    """The request body, at most ``limit`` bytes (413), within ``timeout`` seconds in all (408) or, with
    ``idle``, with no pause longer than ``timeout``."""
    length = request.headers.get("content-length")
    if length is not None and int(length) > limit:  # uvicorn has already refused a malformed one
        raise Refused(413, f"the body is {int(length)} bytes; this server takes at most {limit}", param="Content-Length",
                      headers=CLOSE)
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    deadline = time.monotonic() + timeout
    while True:
        wait = timeout if idle else deadline - time.monotonic()
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.0))
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError:
            raise Refused(408, f"the body did not arrive within {timeout:g} s", param="body", headers=CLOSE) from None
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is over {limit} bytes, the most this server takes", param="body", headers=CLOSE)
        chunks.append(chunk)


async def json_body(request, limits: Limits, timeouts: Timeouts) -> dict:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(415, f"the body must be application/json, not {kind or 'unnamed'}", param="Content-Type")
    return parse_json(await read_body(request, limits.max_body_bytes, timeouts.request), limits)


class TimedStream(StreamingResponse):
    """A stream whose every write the client must take within ``write_timeout`` seconds; past that the
    connection is closed (the generation itself never waits for the client)."""

    def __init__(self, content, write_timeout: float, **kwargs):
        super().__init__(content, **kwargs)
        self.write_timeout = write_timeout

    async def __call__(self, scope, receive, send):
        async def timed_send(message):
            await asyncio.wait_for(send(message), self.write_timeout)

        try:
            await super().__call__(scope, receive, timed_send)
        except* TimeoutError:
            logger.warning("a client stopped reading its stream for %g s: connection closed", self.write_timeout)


def protocol(request_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request's headers (a client that connects and
    sends nothing, or a byte at a time, is answered 408 and cut off) and protocol errors (a malformed
    request line, header or Content-Length) answered in JSON."""

    def raw_answer(status: int, reason: str, message: str) -> bytes:
        body = json.dumps(error_body(message)).encode()
        return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\n\r\n").encode() + body

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._partial = False  # bytes of a request whose headers are not all in
            self._headers_due = self.loop.call_later(request_timeout, self._headers_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._partial = self.conn.their_state is h11.IDLE
            if self._headers_due is not None and not self._partial:
                self._headers_due.cancel()  # the request's headers are in: the body has its own deadline
                self._headers_due = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._headers_due is None:
                self._headers_due = self.loop.call_later(request_timeout, self._headers_late)

        def connection_lost(self, exc):
            if self._headers_due is not None:
                self._headers_due.cancel()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._headers_due = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self._partial:  # half a request: say why; a silent connection is just closed
                self.transport.write(raw_answer(408, "Request Timeout", f"no request within {request_timeout:g} s"))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(raw_answer(400, "Bad Request", "malformed HTTP request (its request line, a header "
                                                                "or Content-Length)"))
            self.transport.close()

    return Protocol


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: {os.strerror(e.errno) if e.errno else e}") from None


def uvicorn_server(app, timeouts: Timeouts, limit_concurrency: int):
    import uvicorn

    config = uvicorn.Config(app, http=protocol(timeouts.request), lifespan="off", log_level="warning", log_config=None,
                            access_log=False, timeout_keep_alive=timeouts.keep_alive,
                            limit_concurrency=limit_concurrency, ws="none")
    return uvicorn.Server(config)


class RunningServer:
    """A server in this process, on its own thread and event loop (tests, judges): ``.url``, ``.port``,
    ``.served`` (completions and the weights version), ``.close()``."""

    def __init__(self, app, host: str, port: int, timeouts: Timeouts, limit_concurrency: int):
        self.socket = listening_socket(host, port)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        self.served = app.state.served
        self._server = uvicorn_server(app, timeouts, limit_concurrency)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.socket.close()
