"""A load generator light enough to drive 100,000 simulated GPUs from one small machine.

`python -m bench.load --collector HOST:PORT --nodes N` opens one gRPC connection
and one agent stream per node, exactly as agents do (Hello, then Reports, each
acknowledged), but replays pre-built reports (bench/fleet.py) instead of
simulating GPUs: a report costs a few microseconds to produce. Every node
reports once per --interval, the fleet spread evenly over it.

It reads commands on stdin, one per line: `round` makes every node report at
once (so that every node has changed), `quit` stops. Once a second it prints a
JSON status line: {"connected": ..., "sent": ..., "acked": ..., "errors": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time

import grpc

from bench import fleet
from gpufleet import wire
from gpufleet.v1 import ingest_pb2

METHOD = "/gpufleet.v1.IngestService/Connect"
# Trailing metadata of a RESOURCE_EXHAUSTED answer (admission control): when to retry.
RETRY_AFTER_KEY = "retry-after-ms"


class Counters:
    def __init__(self) -> None:
        self.connected = 0
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.last_error = ""


class Node:
    """One simulated node: its connection, its stream, its sequence numbers."""

    def __init__(
        self, messages: fleet.NodeMessages, target: str, counters: Counters, method: str = METHOD
    ) -> None:
        self.messages = messages
        self.target = target
        self.counters = counters
        self.method = method
        self.sequence = 0
        self._call: grpc.aio.StreamStreamCall | None = None
        self._lock = asyncio.Lock()
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the stream open (reconnecting when it breaks) until ``stop``."""
        delay = 0.5
        while not stop.is_set():
            wait_s = await self._session(stop)
            if stop.is_set():
                return
            if wait_s is None:
                wait_s = random.uniform(0, delay)
                delay = min(delay * 2, 10.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait_s)

    async def _session(self, stop: asyncio.Event) -> float | None:
        """One stream; returns how long to wait before the next try (None: back off)."""
        async with grpc.aio.insecure_channel(self.target, options=wire.CLIENT_OPTIONS) as channel:
            call = channel.stream_stream(self.method, request_serializer=None, response_deserializer=None)()
            try:
                await call.write(self.messages.hello)
                answer = await call.read()
                if answer is grpc.aio.EOF:
                    await call
                    return None
                ack = ingest_pb2.CollectorMessage.FromString(answer)
                self.sequence = max(self.sequence, ack.hello_ack.last_acked_sequence)
                self._call = call
                self.counters.connected += 1
                self.ready.set()
                try:
                    while (answer := await call.read()) is not grpc.aio.EOF:
                        self.counters.acked += 1
                    await call
                finally:
                    self._call = None
                    self.counters.connected -= 1
            except grpc.aio.AioRpcError as exc:
                if stop.is_set():
                    return None
                self.counters.errors += 1
                self.counters.last_error = f"{exc.code().name}: {exc.details()}"
                for key, value in exc.trailing_metadata() or ():
                    if key == RETRY_AFTER_KEY:
                        return int(value) / 1000 * random.uniform(1.0, 1.5)
            finally:
                call.cancel()
        return None

    async def send(self) -> None:
        """Send the next report, if the stream is up."""
        async with self._lock:
            call = self._call
            if call is None:
                return
            self.sequence += 1
            try:
                await call.write(self.messages.report(self.sequence))
                self.counters.sent += 1
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                self.counters.errors += 1


async def report_steadily(node: Node, interval_s: float, offset_s: float, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    await node.ready.wait()
    next_at = loop.time() + offset_s
    while not stop.is_set():
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await node.send()
        next_at += interval_s
        if next_at < loop.time():  # fell behind: skip rather than burst
            next_at = loop.time() + interval_s


class Steady:
    """Every node reporting once per interval, the fleet spread evenly over it."""

    def __init__(self, nodes: list[Node], stop: asyncio.Event) -> None:
        self._nodes = nodes
        self._stop = stop
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, interval_s: float) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if interval_s <= 0:
            return
        for position, node in enumerate(self._nodes):
            offset_s = interval_s * position / len(self._nodes)
            self._tasks.append(asyncio.create_task(report_steadily(node, interval_s, offset_s, self._stop)))

    def cancel(self) -> None:
        self.start(0)


async def commands(nodes: list[Node], steady: Steady, stop: asyncio.Event) -> None:
    """`round`: every node reports now; `interval S`: report every S seconds; `quit` (or EOF)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        command, _, argument = (await reader.readline()).decode().strip().partition(" ")
        if command in ("", "quit"):
            stop.set()
        elif command == "round":
            await asyncio.gather(*(node.send() for node in nodes))
        elif command == "interval":
            steady.start(float(argument))


async def status(counters: Counters, stop: asyncio.Event) -> None:
    while not stop.is_set():
        print(json.dumps(vars(counters)), flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def main_async(args: argparse.Namespace) -> None:
    pool = fleet.body_pool(args.seed, args.interval)
    counters = Counters()
    nodes = [
        Node(fleet.NodeMessages(args.seed, index, args.interval, pool), args.collector, counters, args.method)
        for index in range(args.offset, args.offset + args.nodes)
    ]
    stop = asyncio.Event()
    steady = Steady(nodes, stop)
    tasks = [asyncio.create_task(status(counters, stop), name="status")]
    tasks.append(asyncio.create_task(commands(nodes, steady, stop), name="commands"))
    for position, node in enumerate(nodes):
        # Connect the fleet over --connect-spread seconds, as a fleet coming up would.
        offset_s = args.connect_spread * position / len(nodes)
        tasks.append(
            asyncio.create_task(_start_later(node, offset_s, stop), name=f"node-{node.messages.index}")
        )
    steady.start(args.interval)
    await stop.wait()
    steady.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(vars(counters)), flush=True)


async def _start_later(node: Node, delay_s: float, stop: asyncio.Event) -> None:
    await asyncio.sleep(delay_s)
    await node.run(stop)


def raise_open_files_limit(connections: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections * 2 + 256
    if soft < wanted:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard)
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collector", required=True, help="HOST:PORT of the collector's gRPC port")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--offset", type=int, default=0, help="index of the first node")
    parser.add_argument(
        "--interval", type=float, default=10.0, help="seconds between a node's reports; 0: only on `round`"
    )
    parser.add_argument(
        "--connect-spread", type=float, default=2.0, help="seconds over which the nodes connect"
    )
    parser.add_argument("--seed", type=int, default=0)
    # bench.transport's plain stream (parse and acknowledge, nothing else): what gRPC alone costs.
    parser.add_argument("--method", default=METHOD, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_open_files_limit(args.nodes)
    started = time.monotonic()
    asyncio.run(main_async(args))
    print(json.dumps({"finished_after_s": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
