"""HTTP and gRPC cannot starve each other: idle HTTP connections past the open-files limit.

A real collector process whose open-files limit is 1,024, and 1,100 idle HTTP connections
from one test: before the connection caps, /metrics stopped answering and new gRPC
connections were refused. Now the caps keep file descriptors for gRPC, and the longest idle
connection makes room for a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import resource
import socket
import subprocess
import sys

import grpc

from gpufleet.ports import free_port
from gpufleet.v1 import ingest_pb2
from tests.conftest import ROOT, http_get, wait_until
from tests.test_ingest import METHOD, hello, report

IDLE_CONNECTIONS = 1_100
FILE_LIMIT = 1_024


def test_idle_http_connections_starve_neither_metrics_nor_agents(tmp_path: object) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * IDLE_CONNECTIONS)), hard))
    grpc_port, http_port = free_port(), free_port()
    collector = subprocess.Popen(
        [
            "bash",
            "-c",
            f"ulimit -n {FILE_LIMIT} && exec {sys.executable} -m gpufleet.collector.main --db none "
            f"--grpc-listen 127.0.0.1:{grpc_port} --http-listen 127.0.0.1:{http_port}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    idle: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: http_get(f"{base}/readyz", timeout=1)[0] == 200, what="collector ready")
        # From many addresses (all loopback), so the total cap is what they meet, not one peer's.
        for index in range(IDLE_CONNECTIONS):
            source = (f"127.0.{1 + index // 30}.{10 + index % 30}", 0)
            with contextlib.suppress(OSError):
                idle.append(
                    socket.create_connection(("127.0.0.1", http_port), timeout=5, source_address=source)
                )
        scrape = http.client.HTTPConnection(
            "127.0.0.1", http_port, timeout=10, source_address=("127.0.0.2", 0)
        )
        scrape.request("GET", "/metrics")
        answer = scrape.getresponse()
        assert answer.status == 200 and b"gpufleet_collector_agent_streams" in answer.read()
        assert asyncio.run(agent_is_acknowledged(f"127.0.0.1:{grpc_port}"))
        _, fleet, _ = http_get(f"{base}/metrics/fleet", timeout=10)
        assert b"gpufleet_collector_http_refused_connections_total" in fleet
    finally:
        for sock in idle:
            sock.close()
        collector.kill()
        collector.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def agent_is_acknowledged(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=ingest_pb2.CollectorMessage.FromString
        )(iter([hello(0), report(1)]))
        answers = [answer async for answer in call]
    return bool(answers[-1].report_ack.sequence == 1)
