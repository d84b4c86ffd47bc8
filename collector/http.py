"""A small asyncio HTTP/1.1 server for /metrics, /healthz and /readyz.

GET and HEAD only, keep-alive, gzip when the client accepts it. Enough for
Prometheus, load balancers and curl, without another dependency. A body can be
bytes or a ``Payload``: pieces written one after the other, with a gzip form of
its own (the exposition keeps gzip members of what did not change).

It stays in step behind proxies that reuse connections: a request body is read
past (when small and framed by Content-Length) or refused with the connection
closed, never parsed as the next request. Timeouts and connection caps keep slow
or idle clients from holding the port, and with it the process's file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
# Request bodies are never used: one at most this big is read and dropped to stay in step.
MAX_BODY_BYTES = 64 * 1024
# The request line, headers and any body must all arrive within this (against slowloris).
HEADER_TIMEOUT_S = 10.0
# Between requests on a kept-alive connection. Prometheus scrapes a target every 15-60 s
# and reuses its connection: 75 s outlasts a 60 s interval with room for jitter and a
# slow scrape, while a client that went away gives its slot back in about a minute.
IDLE_TIMEOUT_S = 75.0
MAX_CONNECTIONS = 256
MAX_CONNECTIONS_PER_PEER = 32
# Sent with the 503 that refuses a connection over the caps.
RETRY_AFTER_S = 5
# How long stop() lets requests in progress finish before closing their connections.
STOP_GRACE_S = 2.0
GZIP_LEVEL = 1  # ~300 MB/s per core; level 6 costs 2x for a few percent less
# Bodies at most this big are sent as they are: gzip would save next to nothing.
GZIP_MIN_BYTES = 1024
# Compressing more than this goes to a worker thread, off the event loop. Less
# is done on the loop: a worker thread waits for the GIL (held by the loop)
# each time zlib gives it back, which costs more than it saves on a busy loop.
GZIP_OFFLOAD_BYTES = 16 * 1024 * 1024
GZIP_PIECE_BYTES = 1024 * 1024
# Pieces of a body are written in blocks of about this size, draining in between.
WRITE_BLOCK_BYTES = 256 * 1024

# zlib lets go of the GIL while it compresses: pieces are compressed side by side.
_compressors = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="http-gzip")


class Payload(Protocol):
    """A body in pieces that knows its own gzip form."""

    def __len__(self) -> int: ...

    def chunks(self) -> Iterable[bytes]:
        """The body, piece by piece (taken on the event loop while the body is written)."""
        ...

    def gzip_pending(self) -> int:
        """Bytes that ``gzip_chunks`` would have to compress (the rest it has already)."""
        ...

    def gzip_chunks(self) -> Sequence[bytes]:
        """The body gzip-compressed, as one or more gzip members (may be called in a worker thread)."""
        ...


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    version: str = "HTTP/1.1"

    def accepts_gzip(self) -> bool:
        """Whether Accept-Encoding allows gzip (an explicit q=0 refuses it)."""
        qualities: dict[str, float] = {}
        for item in self.headers.get("accept-encoding", "").split(","):
            coding, _, params = item.partition(";")
            quality = 1.0
            name, _, value = params.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
            qualities[coding.strip().lower()] = quality
        for coding in ("gzip", "x-gzip", "*"):
            if coding in qualities:
                return qualities[coding] > 0
        return False

    def keep_alive(self) -> bool:
        """Whether the client lets the connection stay open: HTTP/1.1 unless it says close, 1.0 if it asks."""
        options = {option.strip().lower() for option in self.headers.get("connection", "").split(",")}
        if "close" in options:
            return False
        return self.version != "HTTP/1.0" or "keep-alive" in options


@dataclass
class Response:
    status: int = 200
    body: bytes | Payload = b""
    content_type: str = "text/plain; charset=utf-8"
    # Set when the body is already gzip-compressed.
    gzipped: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    # A body sent as it comes (server-sent events), until it ends; the connection closes after.
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[Response]]

REASONS = {status.value: status.phrase for status in HTTPStatus}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/([0-9]+)(?:\.([0-9]+))?")
# Headers that say where a request ends: repeats are joined, so that a conflict is refused.
_FRAMING = ("content-length", "transfer-encoding")


class _Refusal(Exception):
    """A request answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        # What on_refused is told, where this is a refusal it counts.
        self.reason = reason


class _Connection:
    """A client connection; ``waiting_since`` (loop time) is set while it waits for a request."""

    __slots__ = ("peer", "task", "waiting_since", "writer")

    def __init__(self, peer: str, writer: asyncio.StreamWriter, task: asyncio.Task[Any] | None) -> None:
        self.peer = peer
        self.writer = writer
        self.task = task
        self.waiting_since: float | None = None


class HttpServer:
    """Serves ``routes`` (path to handler) over HTTP/1.1, optionally with TLS.

    At most ``max_connections`` connections in all and ``max_connections_per_peer`` from one
    IP address. When the total is reached, the connection that has waited longest for a
    request (kept alive between requests, or open and still silent) is closed to make room;
    when none is waiting, or the peer is at its own cap, the new connection gets 503 with
    Retry-After and is closed. ``on_refused`` hears of each refusal: "connections",
    "connections_per_peer", "header_timeout" (a request that took over ``header_timeout_s``
    to arrive) or "body" (a request body that is too big or not framed by Content-Length).
    A connection idle for ``idle_timeout_s`` between requests is closed without a word.
    """

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        if header_timeout_s <= 0 or idle_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if max_connections < 1 or max_connections_per_peer < 1:
            raise ValueError("connection caps must be at least 1")
        self._routes = dict(routes)
        self._header_timeout_s = header_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._max_connections_per_peer = max_connections_per_peer
        self._on_refused = on_refused
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._per_peer: dict[str, int] = {}
        self._closing = False

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen; return the port (useful with port 0)."""
        self._closing = False
        # A TLS handshake happens before a connection is counted: it gets the header timeout too.
        handshake_timeout = self._header_timeout_s if ssl_context is not None else None
        self._server = await asyncio.start_server(
            self._connection,
            host,
            port,
            limit=MAX_HEADER_LINE,
            ssl=ssl_context,
            ssl_handshake_timeout=handshake_timeout,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting; close idle connections now, busy ones once answered or after STOP_GRACE_S."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        for connection in list(self._connections):
            if connection.waiting_since is not None:
                connection.writer.close()
        tasks = {connection.task for connection in self._connections if connection.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for connection in list(self._connections):
                connection.writer.transport.abort()
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        refused = self._admit(peer)
        if refused is not None:
            self._refused(refused)
            await _send_error(writer, 503, "too many connections; try again later\n", RETRY_AFTER_S)
            writer.close()
            return
        connection = _Connection(peer, writer, asyncio.current_task())
        self._connections.add(connection)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        try:
            await self._serve(connection, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("HTTP connection from %s failed", peer)
        finally:
            self._forget(connection)
            writer.close()

    async def _serve(
        self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests until the client or a refusal ends the connection."""
        loop = asyncio.get_running_loop()
        # A new connection must send its first request within the header timeout.
        deadline = loop.time() + self._header_timeout_s
        served = 0
        while not self._closing:
            connection.waiting_since = loop.time()
            wait_s = self._idle_timeout_s if served else deadline - loop.time()
            try:
                first = await asyncio.wait_for(reader.readexactly(1), wait_s)
            except asyncio.TimeoutError:
                if not served:
                    await self._refuse(writer, _Refusal(408, "no request in time", "header_timeout"))
                return
            connection.waiting_since = None
            if served:
                deadline = loop.time() + self._header_timeout_s
            try:
                request, drained = await asyncio.wait_for(
                    _read_request(reader, first), deadline - loop.time()
                )
            except asyncio.TimeoutError:
                await self._refuse(writer, _Refusal(408, "the request took too long", "header_timeout"))
                return
            except _Refusal as refusal:
                await self._refuse(writer, refusal)
                return
            response = await self._respond(request)
            # A method that may carry a body keeps the connection only if its body was read past.
            in_step = drained or request.method in ("GET", "HEAD")
            keep_alive = in_step and request.keep_alive() and not self._closing
            await _write_response(writer, request, response, keep_alive)
            if not keep_alive or response.stream is not None:
                return
            served += 1

    def _admit(self, peer: str) -> str | None:
        """None to serve a new connection from ``peer``, or the reason it is refused."""
        if self._per_peer.get(peer, 0) >= self._max_connections_per_peer:
            return "connections_per_peer"
        if len(self._connections) >= self._max_connections and not self._make_room():
            return "connections"
        return None

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False if none is waiting."""
        waiting = [(c.waiting_since, c) for c in self._connections if c.waiting_since is not None]
        if not waiting:
            return False
        _, oldest = min(waiting, key=lambda item: item[0])
        self._forget(oldest)
        oldest.writer.close()
        return True

    def _forget(self, connection: _Connection) -> None:
        if connection not in self._connections:
            return
        self._connections.remove(connection)
        left = self._per_peer[connection.peer] - 1
        if left:
            self._per_peer[connection.peer] = left
        else:
            del self._per_peer[connection.peer]

    def _refused(self, reason: str) -> None:
        log.debug("HTTP refused: %s", reason)
        if self._on_refused is None:
            return
        try:
            self._on_refused(reason)
        except Exception:
            log.exception("on_refused(%r) failed", reason)

    async def _refuse(self, writer: asyncio.StreamWriter, refusal: _Refusal) -> None:
        if refusal.reason is not None:
            self._refused(refusal.reason)
        await _send_error(writer, refusal.status, f"{refusal}\n")

    async def _respond(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", headers={"Allow": "GET, HEAD"})
        handler = self._routes.get(request.path)
        if handler is None:
            known = "\n".join(sorted(self._routes))
            return Response(404, f"not found; try:\n{known}\n".encode())
        try:
            return await handler(request)
        except ValueError as exc:
            return Response(400, f"{exc}\n".encode())
        except Exception:
            log.exception("HTTP handler for %s failed", request.path)
            return Response(500, b"internal error; see the collector's log\n")


async def _send_error(
    writer: asyncio.StreamWriter, status: int, message: str, retry_after_s: int | None = None
) -> None:
    """An error response that closes the connection (the client may be gone already)."""
    headers = {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    with contextlib.suppress(OSError):  # ConnectionError, or TLS failing as the client goes
        await _write_response(writer, None, Response(status, message.encode(), headers=headers), False)


async def _read_request(reader: asyncio.StreamReader, first: bytes) -> tuple[Request, bool]:
    """The request that starts with byte ``first``, and whether a body was read past (it is dropped)."""
    line = first + await _readline(reader)
    if not line.strip():  # an empty line before the request line is allowed
        line = await _readline(reader)
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _Refusal(400, "malformed request line")
    method, target, version = parts
    headers = await _read_headers(reader)
    match = _VERSION.fullmatch(version)
    if match is None:
        raise _Refusal(400, "malformed HTTP version")
    if match[1] != "1":
        raise _Refusal(505, f"{version} is not supported; use HTTP/1.1")
    if match[2] is None:
        raise _Refusal(400, "malformed HTTP version")
    drained = await _read_body(reader, headers)
    url = urlsplit(target)
    # Any later 1.x is answered as 1.1; only 1.0 differs (no keep-alive unless asked).
    version = "HTTP/1.0" if int(match[2]) == 0 else "HTTP/1.1"
    return Request(method, url.path, parse_qs(url.query), headers, version), drained


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError as exc:  # longer than MAX_HEADER_LINE
        raise _Refusal(400, "request line or header too long") from exc


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await _readline(reader)
        if line in (b"\r\n", b"\n", b""):
            return headers
        text = line.decode("latin-1").removesuffix("\n").removesuffix("\r")
        name, sep, value = text.partition(":")
        # No space before the colon, no folded lines, no bare CR: proxies read those differently.
        if not sep or not _TOKEN.fullmatch(name) or "\r" in value or "\0" in value:
            raise _Refusal(400, "malformed header")
        key = name.lower()
        value = value.strip(" \t")
        if key in _FRAMING and key in headers:
            value = f"{headers[key]}, {value}"
        headers[key] = value
    raise _Refusal(400, "too many headers")


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bool:
    """Read past a request body framed by Content-Length; refuse any other kind. Whether it read one."""
    length = headers.get("content-length")
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if length is not None:
            raise _Refusal(400, "both Content-Length and Transfer-Encoding", "body")
        if coding.rpartition(",")[2].strip().lower() != "chunked":
            raise _Refusal(400, "malformed Transfer-Encoding", "body")
        raise _Refusal(411, "request bodies need a Content-Length", "body")
    if length is None:
        return False
    if not (length.isascii() and length.isdigit()) or len(length) > 18:
        raise _Refusal(400, "invalid Content-Length", "body")
    size = int(length)
    if size > MAX_BODY_BYTES:
        raise _Refusal(413, f"request bodies over {MAX_BODY_BYTES} bytes are refused", "body")
    if size:
        await reader.readexactly(size)
    return True


def gzip_member(data: bytes | memoryview) -> bytes:
    """``data`` as one complete gzip member."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def gzip_pieces(body: bytes) -> list[bytes]:
    """``body`` as gzip members of about GZIP_PIECE_BYTES each, compressed side by side."""
    view = memoryview(body)
    pieces = [view[start : start + GZIP_PIECE_BYTES] for start in range(0, len(body), GZIP_PIECE_BYTES)]
    return list(_compressors.map(gzip_member, pieces))


async def _encode(request: Request | None, response: Response) -> tuple[Iterable[bytes], int, bool]:
    """The pieces to send, their length in all, and whether they are gzip-compressed."""
    body = response.body
    if response.gzipped or request is None or len(body) <= GZIP_MIN_BYTES or not request.accepts_gzip():
        return ([body] if isinstance(body, bytes) else body.chunks()), len(body), response.gzipped
    if isinstance(body, bytes):
        if len(body) <= GZIP_OFFLOAD_BYTES:
            pieces: Sequence[bytes] = [gzip_member(body)]
        else:
            pieces = await asyncio.to_thread(gzip_pieces, body)
    elif body.gzip_pending() <= GZIP_OFFLOAD_BYTES:
        pieces = body.gzip_chunks()
    else:
        pieces = await asyncio.to_thread(body.gzip_chunks)
    return pieces, sum(len(piece) for piece in pieces), True


async def _write_stream(writer: asyncio.StreamWriter, response: Response) -> None:
    """Headers, then each piece as the stream yields it, until it ends or the client goes."""
    assert response.stream is not None
    headers = {"Content-Type": response.content_type, "Cache-Control": "no-cache", **response.headers}
    headers["Connection"] = "close"
    head = f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}\r\n"
    writer.write((head + "".join(f"{k}: {v}\r\n" for k, v in headers.items())).encode("latin-1") + b"\r\n")
    try:
        async for piece in response.stream:
            writer.write(piece)
            await writer.drain()
    finally:
        await response.stream.aclose()  # type: ignore[attr-defined]


async def _write_response(
    writer: asyncio.StreamWriter, request: Request | None, response: Response, keep_alive: bool
) -> None:
    if response.stream is not None and request is not None and request.method == "GET":
        await _write_stream(writer, response)
        return
    pieces, length, gzipped = await _encode(request, response)
    headers = {"Content-Type": response.content_type, **response.headers}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    if len(response.body) > GZIP_MIN_BYTES:
        headers["Vary"] = "Accept-Encoding"
    headers["Content-Length"] = str(length)
    headers["Connection"] = "keep-alive" if keep_alive else "close"
    reason = REASONS.get(response.status, "")
    head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(head.encode("latin-1") + b"\r\n")
    if request is None or request.method != "HEAD":
        await _write_pieces(writer, pieces)
    await writer.drain()


async def _write_pieces(writer: asyncio.StreamWriter, pieces: Iterable[bytes]) -> None:
    """Write pieces as they come (small ones joined into blocks), draining between blocks."""
    block: list[bytes] = []
    size = 0
    for piece in pieces:
        block.append(piece)
        size += len(piece)
        if size >= WRITE_BLOCK_BYTES:
            writer.write(block[0] if len(block) == 1 else b"".join(block))
            block, size = [], 0
            await writer.drain()
    if block:
        writer.write(b"".join(block))
