"""Stream or unary? Server CPU per 8-GPU report, both ways, on the same payload.

`python -m bench.transport` starts a gRPC server process offering both a
bidirectional stream (one per node, a report and an ack per message) and a unary
call (one call per report), drives it from many separate connections, and
reports the server's CPU seconds per report for each. The collector uses what
this shows is cheaper (docs/architecture.md has the numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.ports import free_port
from gpufleet.v1 import ingest_pb2

SERVICE = "bench.Transport"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serve(port: int) -> None:
    ack = ingest_pb2.CollectorMessage(report_ack=ingest_pb2.ReportAck(sequence=1)).SerializeToString()

    async def stream(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for raw in requests:
            ingest_pb2.AgentMessage.FromString(raw)
            yield ack

    async def unary(raw: bytes, context: object) -> bytes:
        ingest_pb2.AgentMessage.FromString(raw)
        return ack

    server = grpc.aio.server(options=wire.SERVER_OPTIONS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Stream": grpc.stream_stream_rpc_method_handler(stream),
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                },
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def drive(port: int, mode: str, nodes: int, reports: int) -> None:
    source = SimulatedSource("H100", 8)
    payload = ingest_pb2.AgentMessage(
        report=ingest_pb2.Report(sequence=1, gpus=source.sample(with_processes=False))
    )
    raw = payload.SerializeToString()
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=wire.CLIENT_OPTIONS) for _ in range(nodes)
    ]

    async def one_node(channel: grpc.aio.Channel) -> None:
        if mode == "stream":
            call = channel.stream_stream(f"/{SERVICE}/Stream")()
            for _ in range(reports):
                await call.write(raw)
                await call.read()
            await call.done_writing()
        else:
            method = channel.unary_unary(f"/{SERVICE}/Unary")
            for _ in range(reports):
                await method(raw)

    await asyncio.gather(*(one_node(c) for c in channels))
    for channel in channels:
        await channel.close()


def measure(mode: str, nodes: int, reports: int) -> float:
    """Server CPU microseconds per report."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.transport", "--serve", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        asyncio.run(drive(port, mode, nodes, 1))  # connect and warm up
        before = cpu_seconds(server.pid)
        asyncio.run(drive(port, mode, nodes, reports))
        return (cpu_seconds(server.pid) - before) / (nodes * reports) * 1e6
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--reports", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    results: dict[str, list[float]] = {"stream": [], "unary": []}
    for _ in range(args.runs):
        for mode, values in results.items():
            values.append(measure(mode, args.nodes, args.reports))
    started = time.strftime("%Y-%m-%d")
    print(f"{started}: {args.nodes} connections x {args.reports} reports of 8 GPUs, {args.runs} runs")
    for mode, values in results.items():
        print(
            f"  {mode:6}: server CPU per report, median {sorted(values)[len(values) // 2]:.0f} us "
            f"(runs: {', '.join(f'{v:.0f}' for v in values)})"
        )
    stream, unary = (sorted(v)[len(v) // 2] for v in results.values())
    print(f"  unary costs {unary / stream:.2f}x the stream's server CPU")


if __name__ == "__main__":
    main()
