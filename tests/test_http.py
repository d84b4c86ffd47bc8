"""The HTTP server: gzip when asked (and only then), pieces and members that decode to the same text;
bodies read past or refused, never taken for the next request; reason phrases; HTTP/1.0 and versions."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import zlib
from collections.abc import AsyncIterator

import pytest

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.http import GZIP_PIECE_BYTES, HttpServer, Request, Response, gzip_pieces
from gpufleet.collector.service import Collector
from gpufleet.collector.state import FleetState
from tests.fleet import add_node, exposition_of, simulated_fleet
from tests.promtool import check_metrics

LARGE = b"".join(b"line %d of a large body\n" % n for n in range(60_000))


def request(accept_encoding: str | None) -> Request:
    headers = {} if accept_encoding is None else {"accept-encoding": accept_encoding}
    return Request("GET", "/", {}, headers)


@pytest.mark.parametrize(
    ("header", "gzip_ok"),
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0, identity", False),
        ("identity", False),
        ("*", True),
        ("*;q=0", False),
        ("gzip;q=0, *", False),
        ("br, *;q=0.1", True),
        ("x-gzip", True),
    ],
)
def test_accept_encoding_is_honoured(header: str | None, gzip_ok: bool) -> None:
    assert request(header).accepts_gzip() is gzip_ok


def test_large_bytes_are_compressed_in_pieces() -> None:
    body = LARGE * 3
    pieces = gzip_pieces(body)
    assert len(pieces) == -(-len(body) // GZIP_PIECE_BYTES)
    assert gzip.decompress(b"".join(pieces)) == body


def gzip_members(data: bytes) -> int:
    members = 0
    while data:
        decompressor = zlib.decompressobj(31)
        decompressor.decompress(data)
        assert decompressor.eof
        data = decompressor.unused_data
        members += 1
    return members


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, FleetState]]:
    state, _ = simulated_fleet(30)
    exposition = exposition_of(state)

    async def small(request: Request) -> Response:
        return Response(body=b"tiny\n")

    async def large(request: Request) -> Response:
        return Response(body=LARGE)

    async def payload(request: Request) -> Response:
        return Response(body=exposition.everything())

    async def status(request: Request) -> Response:
        return Response(int(request.query["code"][0]), b"as asked\n")

    http_server = HttpServer({"/small": small, "/large": large, "/payload": payload, "/status": status})
    port = await http_server.start("127.0.0.1", 0)
    yield port, state
    await http_server.stop()


def fetch(
    port: int, path: str, accept_encoding: str | None = None, method: str = "GET", requests: int = 1
) -> list[tuple[int, bytes, dict[str, str]]]:
    """Requests on one kept-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {} if accept_encoding is None else {"Accept-Encoding": accept_encoding}
    answers = []
    try:
        for _ in range(requests):
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            answers.append((response.status, response.read(), dict(response.getheaders())))
    finally:
        connection.close()
    return answers


async def test_gzip_only_when_asked_and_worth_it(server: tuple[int, FleetState]) -> None:
    port, _ = server
    for path in ("/large", "/payload"):
        plain = (await asyncio.to_thread(fetch, port, path))[0]
        assert plain[0] == 200
        assert "Content-Encoding" not in plain[2]
        assert int(plain[2]["Content-Length"]) == len(plain[1])
        assert plain[2]["Vary"] == "Accept-Encoding"
        assert path != "/large" or plain[1] == LARGE
        for refused in ("identity", "gzip;q=0"):
            assert "Content-Encoding" not in (await asyncio.to_thread(fetch, port, path, refused))[0][2]
        status, body, headers = (await asyncio.to_thread(fetch, port, path, "gzip"))[0]
        assert status == 200
        assert headers["Content-Encoding"] == "gzip"
        assert int(headers["Content-Length"]) == len(body)
        assert gzip.decompress(body) == plain[1]
        assert path != "/payload" or gzip_members(body) > 1  # a member per block of the exposition
    small = (await asyncio.to_thread(fetch, port, "/small", "gzip"))[0]
    assert small[1] == b"tiny\n"
    assert "Content-Encoding" not in small[2]


async def test_payload_gzip_decodes_to_the_plain_text_as_nodes_change(server: tuple[int, FleetState]) -> None:
    port, state = server
    sources = [SimulatedSource("H100", 8, seed=0, node_index=i) for i in range(30)]
    for change in range(3):
        plain = (await asyncio.to_thread(fetch, port, "/payload"))[0][1]
        compressed = (await asyncio.to_thread(fetch, port, "/payload", "gzip"))[0][1]
        # Only the collector's own lines may differ between two scrapes; here there are none.
        assert gzip.decompress(compressed) == plain
        assert not check_metrics(plain)
        for index in range(change, 30, 4):
            add_node(state, sources[index], index, cluster=f"c{index % 3}")


async def test_head_keep_alive_and_errors(server: tuple[int, FleetState]) -> None:
    port, _ = server
    get = (await asyncio.to_thread(fetch, port, "/payload", "gzip"))[0]
    head = (await asyncio.to_thread(fetch, port, "/payload", "gzip", "HEAD"))[0]
    assert head[1] == b""
    assert head[2]["Content-Length"] == get[2]["Content-Length"]
    answers = await asyncio.to_thread(fetch, port, "/large", None, "GET", 3)
    assert [a[1] == LARGE for a in answers] == [True, True, True]
    assert (await asyncio.to_thread(fetch, port, "/nowhere"))[0][0] == 404
    assert (await asyncio.to_thread(fetch, port, "/small", None, "POST"))[0][0] == 405


async def test_collector_shards_and_gzip_over_http(collector: Collector) -> None:
    for index in range(24):
        add_node(collector.state, SimulatedSource("H100", 8, seed=1, node_index=index), index)
    port = collector.http_port

    def node_lines(body: bytes) -> list[bytes]:
        return sorted(line for line in body.splitlines() if b'node="' in line and not line.startswith(b"#"))

    whole = (await asyncio.to_thread(fetch, port, "/metrics"))[0][1]
    compressed = (await asyncio.to_thread(fetch, port, "/metrics", "gzip"))[0][1]
    assert node_lines(gzip.decompress(compressed)) == node_lines(whole)
    shards = []
    for shard in range(3):
        for accept in (None, "gzip"):
            status, body, headers = (
                await asyncio.to_thread(fetch, port, f"/metrics/nodes?shard={shard}&shards=3", accept)
            )[0]
            assert status == 200
            if accept:
                assert headers["Content-Encoding"] == "gzip"
                body = gzip.decompress(body)
            else:
                shards += node_lines(body)
            assert not check_metrics(body), shard
    assert sorted(shards) == node_lines(whole)
    status, body, _ = (await asyncio.to_thread(fetch, port, "/metrics/nodes?shard=3&shards=3"))[0]
    assert status == 400


async def read_response(
    reader: asyncio.StreamReader, head: bool = False
) -> tuple[int, str, dict[str, str], bytes]:
    """One response off a raw connection: status, reason phrase, headers (lower-case names), body.

    ``head``: the answer to a HEAD, with a Content-Length but no body.
    """

    async def read() -> tuple[int, str, dict[str, str], bytes]:
        _, status, reason = (await reader.readline()).decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b"" if head else await reader.readexactly(int(headers.get("content-length", "0")))
        return int(status), reason, headers, body

    return await asyncio.wait_for(read(), 10.0)


async def closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """Whether the server closes the connection within ``timeout`` (sending nothing more)."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


async def exchange(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection that has sent ``data``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize(
    ("code", "phrase"),
    [
        (200, "OK"),
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (429, "Too Many Requests"),
        (503, "Service Unavailable"),
    ],
)
async def test_every_status_has_its_reason_phrase(
    server: tuple[int, FleetState], code: int, phrase: str
) -> None:
    reader, writer = await exchange(server[0], f"GET /status?code={code} HTTP/1.1\r\n\r\n".encode())
    assert (await read_response(reader))[:2] == (code, phrase)
    writer.close()


SMUGGLED = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(("method", "status"), [("POST", 405), ("GET", 200), ("HEAD", 200), ("DELETE", 405)])
async def test_a_body_is_read_past_not_taken_for_the_next_request(
    server: tuple[int, FleetState], method: str, status: int
) -> None:
    head = f"{method} /small HTTP/1.1\r\nHost: x\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n".encode()
    reader, writer = await exchange(server[0], head + SMUGGLED + b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await read_response(reader, head=method == "HEAD")
    assert (answer[0], answer[2]["connection"]) == (status, "keep-alive")
    assert (await read_response(reader))[::3] == (200, b"tiny\n")  # not the smuggled 404
    assert not await closed(reader, 0.2)
    writer.close()


async def test_a_method_with_a_body_and_no_content_length_gets_405_and_close(
    server: tuple[int, FleetState],
) -> None:
    reader, writer = await exchange(server[0], b"DELETE /small HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED)
    status, _, headers, _ = await read_response(reader)
    assert (status, headers["connection"], headers["allow"]) == (405, "close", "GET, HEAD")
    assert await closed(reader)
    writer.close()


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        ("Content-Length: 5\r\nTransfer-Encoding: chunked", 400),
        ("Transfer-Encoding: chunked\r\nContent-Length: 5", 400),
        ("Transfer-Encoding: chunked", 411),
        ("Transfer-Encoding: gzip, chunked", 411),
        ("Transfer-Encoding: gzip", 400),
        ("Content-Length: abc", 400),
        ("Content-Length: -1", 400),
        ("Content-Length: +5", 400),
        ("Content-Length: \u00b2", 400),
        ("Content-Length: ", 400),
        ("Content-Length: 5\r\nContent-Length: 6", 400),
        ("Content-Length: 5, 5", 400),
        ("Content-Length : 5", 400),
        ("X-Folded: a\r\n Content-Length: 5", 400),
    ],
)
async def test_an_unframed_or_ambiguous_body_is_refused_and_the_connection_closed(
    server: tuple[int, FleetState], framing: str, status: int
) -> None:
    head = f"GET /small HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode("latin-1")
    reader, writer = await exchange(server[0], head + b"0\r\n\r\n" + SMUGGLED)
    answer = await read_response(reader)
    assert (answer[0], answer[2]["connection"]) == (status, "close")
    assert await closed(reader)
    writer.close()


@pytest.mark.parametrize(
    ("version", "connection", "kept"),
    [
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "keep-alive", True),
        ("HTTP/1.0", "Keep-Alive, TE", True),
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "keep-alive", True),
        ("HTTP/1.1", "TE, close", False),
    ],
)
async def test_keep_alive_follows_the_version_and_connection_header(
    server: tuple[int, FleetState], version: str, connection: str | None, kept: bool
) -> None:
    header = "" if connection is None else f"Connection: {connection}\r\n"
    request = f"GET /small {version}\r\n{header}\r\n".encode()
    reader, writer = await exchange(server[0], request)
    status, _, headers, body = await read_response(reader)
    assert (status, body, headers["connection"]) == (200, b"tiny\n", "keep-alive" if kept else "close")
    if kept:
        writer.write(request)
        assert (await read_response(reader))[0] == 200
        assert not await closed(reader, 0.2)
    else:
        assert await closed(reader)
    writer.close()


@pytest.mark.parametrize(
    ("version", "status"),
    [
        ("HTTP/2.0", 505),
        ("HTTP/3", 505),
        ("HTTP/0.9", 505),
        ("HTTP/1", 400),
        ("HTTP/x.y", 400),
        ("HTTP/1.1x", 400),
    ],
)
async def test_an_unknown_major_version_gets_505(
    server: tuple[int, FleetState], version: str, status: int
) -> None:
    reader, writer = await exchange(server[0], f"GET /small {version}\r\n\r\n".encode())
    answer = await read_response(reader)
    assert (answer[0], answer[2]["connection"]) == (status, "close")
    assert await closed(reader)
    writer.close()


async def test_pipelined_requests_are_answered_in_order(server: tuple[int, FleetState]) -> None:
    requests = b"GET /small HTTP/1.1\r\n\r\n\r\nGET /nowhere HTTP/1.1\r\n\r\nHEAD /small HTTP/1.1\r\n\r\n"
    reader, writer = await exchange(server[0], requests + b"GET /status?code=429 HTTP/1.1\r\n\r\n")
    assert (await read_response(reader))[::3] == (200, b"tiny\n")
    assert (await read_response(reader))[0] == 404
    assert (await read_response(reader, head=True))[::3] == (200, b"")
    assert (await read_response(reader))[:2] == (429, "Too Many Requests")
    writer.close()


@pytest.mark.parametrize(
    "request_head",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /small HTTP/1.1\r\nX-Long: " + b"x" * 9000 + b"\r\n\r\n",
        b"GET /small HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /small HTTP/1.1\r\nX-Bare: a\rb\r\n\r\n",
        b"GET /small HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(101)) + b"\r\n",
    ],
)
async def test_a_malformed_request_gets_400_and_close(
    server: tuple[int, FleetState], request_head: bytes
) -> None:
    reader, writer = await exchange(server[0], request_head)
    answer = await read_response(reader)
    assert (answer[0], answer[1], answer[2]["connection"]) == (400, "Bad Request", "close")
    assert await closed(reader)
    writer.close()
