"""The HTTP server: gzip when asked (and only then), pieces and members that decode to the same text."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import zlib
from collections.abc import AsyncIterator

import pytest

from agent.sources.sim import SimulatedSource
from collector.exposition import Exposition
from collector.http import GZIP_PIECE_BYTES, HttpServer, Request, Response, gzip_pieces
from collector.service import Collector
from collector.state import FleetState
from tests.fleet import add_node, simulated_fleet
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
    exposition = Exposition(state)

    async def small(request: Request) -> Response:
        return Response(body=b"tiny\n")

    async def large(request: Request) -> Response:
        return Response(body=LARGE)

    async def payload(request: Request) -> Response:
        return Response(body=exposition.everything())

    http_server = HttpServer({"/small": small, "/large": large, "/payload": payload})
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
