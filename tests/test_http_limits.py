"""The HTTP server's limits: request bodies, header and idle timeouts, connection caps, stop, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.cli import certs
from gpufleet.collector.http import MAX_BODY_BYTES, RETRY_AFTER_S, HttpServer, Request, Response
from tests.test_http import closed, exchange, read_response

GET = b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"


async def small(request: Request) -> Response:
    return Response(body=b"tiny\n")


@contextlib.asynccontextmanager
async def serving(
    ssl_context: ssl.SSLContext | None = None, **options: Any
) -> AsyncIterator[tuple[HttpServer, int, list[str]]]:
    """A server on a free port with ``options``; the list collects what on_refused is told."""
    refusals: list[str] = []
    server = HttpServer({"/small": small}, on_refused=refusals.append, **options)
    port = await server.start("127.0.0.1", 0, ssl_context)
    try:
        yield server, port, refusals
    finally:
        await server.stop()


async def served(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A kept-alive connection that has had one answer and now waits for the next request."""
    reader, writer = await exchange(port, GET)
    assert (await read_response(reader))[::3] == (200, b"tiny\n")
    return reader, writer


async def served_once_there_is_room(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like served(), trying again while the server has yet to see a connection close."""
    for _ in range(100):
        reader, writer = await exchange(port, GET)
        if (await read_response(reader))[0] == 200:
            return reader, writer
        writer.close()
        await asyncio.sleep(0.02)
    raise AssertionError("no room after a connection closed")


async def test_a_body_up_to_the_limit_is_read_past_and_a_bigger_one_refused() -> None:
    async with serving() as (_, port, refusals):
        head = f"GET /small HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n".encode()
        reader, writer = await exchange(port, head + b"x" * MAX_BODY_BYTES + GET)
        assert [(await read_response(reader))[0] for _ in range(2)] == [200, 200]
        writer.close()
        head = f"POST /small HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
        reader, writer = await exchange(port, head)
        status, _, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (413, "close")
        assert await closed(reader)
        writer.close()
        assert refusals == ["body"]


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # a connection that says nothing
        b"GET /small HTTP/1.1\r\nX-Slow: ",  # headers that never end
        b"GET /small HTTP/1.1\r\nContent-Length: 10\r\n\r\nab",  # a body that never ends
    ],
)
async def test_a_request_that_does_not_arrive_in_time_gets_408(sent: bytes) -> None:
    async with serving(header_timeout_s=0.3) as (_, port, refusals):
        started = time.monotonic()
        reader, writer = await exchange(port, sent)
        status, _, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (408, "close")
        assert await closed(reader)
        assert time.monotonic() - started < 3.0
        assert refusals == ["header_timeout"]
        writer.close()


async def test_the_header_timeout_covers_the_whole_head_not_each_line() -> None:
    async with serving(header_timeout_s=0.5) as (_, port, refusals):
        reader, writer = await exchange(port, b"GET /small HTTP/1.1\r\n")
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for n in range(100):  # a header line every 50 ms: each in time, the whole never
                    writer.write(b"X-Slow-%d: 1\r\n" % n)
                    await writer.drain()
                    await asyncio.sleep(0.05)

        slowloris = asyncio.create_task(trickle(), name="slowloris")
        assert (await read_response(reader))[0] == 408
        assert time.monotonic() - started < 3.0
        slowloris.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slowloris
        assert refusals == ["header_timeout"]
        writer.close()


async def test_a_kept_alive_connection_waits_the_idle_timeout_not_the_header_timeout() -> None:
    async with serving(header_timeout_s=0.3, idle_timeout_s=1.5) as (_, port, refusals):
        reader, writer = await served(port)
        await asyncio.sleep(0.8)  # past the header timeout, within the idle one
        writer.write(GET)
        assert (await read_response(reader))[0] == 200
        started = time.monotonic()
        assert await closed(reader, 10.0)
        assert 1.0 < time.monotonic() - started < 5.0
        assert refusals == []  # an idle connection closing is no refusal
        writer.close()


async def test_connections_over_the_per_peer_cap_get_503() -> None:
    async with serving(max_connections_per_peer=2) as (_, port, refusals):
        first, second = await served(port), await served(port)
        reader, writer = await exchange(port, GET)
        status, _, headers, _ = await read_response(reader)
        assert (status, headers["connection"], headers["retry-after"]) == (503, "close", str(RETRY_AFTER_S))
        assert await closed(reader)
        assert refusals == ["connections_per_peer"]
        first[1].close()
        assert await closed(first[0])
        third = await served_once_there_is_room(port)
        second[1].write(GET)
        assert (await read_response(second[0]))[0] == 200
        for _, kept in (second, third):
            kept.close()
        writer.close()


async def test_at_the_total_cap_the_longest_idle_connection_makes_room() -> None:
    async with serving(max_connections=3) as (_, port, refusals):
        oldest, *others = [await served(port) for _ in range(3)]
        newest = await served(port)
        assert await closed(oldest[0])
        for reader, writer in [*others, newest]:
            writer.write(GET)
            assert (await read_response(reader))[0] == 200
            writer.close()
        oldest[1].close()
        assert refusals == []


async def test_at_the_total_cap_with_every_connection_busy_a_new_one_gets_503() -> None:
    async with serving(max_connections=2) as (_, port, refusals):
        busy = [await exchange(port, b"GET /small HTTP/1.1\r\n") for _ in range(2)]
        await asyncio.sleep(0.2)  # the server has started reading both requests
        reader, writer = await exchange(port, b"")
        status, _, headers, _ = await read_response(reader)
        assert (status, headers["connection"], "retry-after" in headers) == (503, "close", True)
        assert await closed(reader)
        assert refusals == ["connections"]
        for busy_reader, busy_writer in busy:
            busy_writer.write(b"\r\n")
            assert (await read_response(busy_reader))[0] == 200
            busy_writer.close()
        writer.close()


async def test_stop_closes_idle_connections_at_once() -> None:
    async with serving() as (server, port, _):
        reader, writer = await served(port)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 1.0
        assert await closed(reader, 1.0)
        writer.close()


async def test_stop_lets_a_request_in_progress_finish_then_closes() -> None:
    async with serving() as (server, port, _):
        reader, writer = await exchange(port, b"GET /small HTTP/1.1\r\n")
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(server.stop(), name="stop")
        await asyncio.sleep(0.1)
        writer.write(b"\r\n")
        status, _, headers, body = await read_response(reader)
        assert (status, body, headers["connection"]) == (200, b"tiny\n", "close")
        assert await closed(reader)
        await asyncio.wait_for(stopping, 5.0)
        writer.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.issue(
        directory, server_names=["localhost"], server_ips=["127.0.0.1"], agents=[], clients=[], days=1
    )
    return directory


async def test_tls_keeps_alive_and_a_silent_handshake_times_out(pki: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pki / "server.pem", pki / "server.key")
    client_context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    async with serving(server_context, header_timeout_s=0.5) as (_, port, _):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
        )
        for _ in range(2):
            writer.write(GET)
            assert (await read_response(reader))[::3] == (200, b"tiny\n")
        writer.close()
        silent, silent_writer = await asyncio.open_connection("127.0.0.1", port)  # no handshake
        assert await closed(silent, 5.0)
        silent_writer.close()
