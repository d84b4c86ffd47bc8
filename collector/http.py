"""A small asyncio HTTP/1.1 server for /metrics, /healthz and /readyz.

GET and HEAD only, keep-alive, gzip when the client accepts it. Enough for
Prometheus, load balancers and curl, without another dependency. A body can be
bytes or a ``Payload``: pieces written one after the other, with a gzip form of
its own (the exposition keeps gzip members of what did not change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
IDLE_TIMEOUT_S = 120.0
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


@dataclass
class Response:
    status: int = 200
    body: bytes | Payload = b""
    content_type: str = "text/plain; charset=utf-8"
    # Set when the body is already gzip-compressed.
    gzipped: bool = False
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpServer:
    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen; return the port (useful with port 0)."""
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=MAX_HEADER_LINE, ssl=ssl_context
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await asyncio.wait_for(_read_request(reader), IDLE_TIMEOUT_S)
                if request is None:
                    return
                response = await self._respond(request)
                keep_alive = request.headers.get("connection", "").lower() != "close"
                await _write_response(writer, request, response, keep_alive)
                if not keep_alive:
                    return
        except (
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            return
        except ValueError as exc:
            with contextlib.suppress(ConnectionError):
                await _write_response(writer, None, Response(400, f"{exc}\n".encode()), False)
        finally:
            writer.close()

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


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("malformed request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, sep, value = header.decode("latin-1").partition(":")
        if not sep:
            raise ValueError("malformed header")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ValueError("too many headers")
    url = urlsplit(target)
    return Request(method, url.path, parse_qs(url.query), headers)


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


async def _write_response(
    writer: asyncio.StreamWriter, request: Request | None, response: Response, keep_alive: bool
) -> None:
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
