"""A small asyncio HTTP/1.1 server for /metrics, /healthz and /readyz.

GET and HEAD only, keep-alive, gzip when the client accepts it. Enough for
Prometheus, load balancers and curl, without another dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
IDLE_TIMEOUT_S = 120.0
GZIP_LEVEL = 1  # ~300 MB/s per core; level 6 costs 2x for a few percent less


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    def accepts_gzip(self) -> bool:
        return "gzip" in self.headers.get("accept-encoding", "")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
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

    async def start(self, host: str, port: int) -> int:
        """Listen; return the port (useful with port 0)."""
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEADER_LINE)
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


async def _write_response(
    writer: asyncio.StreamWriter, request: Request | None, response: Response, keep_alive: bool
) -> None:
    body = response.body
    headers = {"Content-Type": response.content_type, **response.headers}
    if response.gzipped:
        headers["Content-Encoding"] = "gzip"
    elif request is not None and request.accepts_gzip() and len(body) > 1024:
        body = gzip.compress(body, GZIP_LEVEL)
        headers["Content-Encoding"] = "gzip"
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "keep-alive" if keep_alive else "close"
    reason = REASONS.get(response.status, "")
    head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(head.encode("latin-1") + b"\r\n")
    if request is None or request.method != "HEAD":
        writer.write(body)
    await writer.drain()
