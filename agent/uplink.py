"""One node's stream to the collector: hello, reports, acknowledgements, reconnection.

Reports stay in a bounded buffer until the collector acknowledges them; after a
reconnect the agent resends everything after the collector's last acknowledged
sequence number. When the buffer is full the oldest report is dropped and counted.
Reconnects back off exponentially with full jitter, rotating through the
configured collector addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Sequence

import grpc

from gpufleet import wire
from gpufleet.v1 import ingest_pb2, ingest_pb2_grpc, inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)

# A connection that lasted this long resets the backoff (a flapping collector
# that accepts and then drops connections does not).
STABLE_CONNECTION_S = 60.0
# On shutdown, how long to wait for the last acknowledgements.
FLUSH_TIMEOUT_S = 3.0


class CollectorRejected(Exception):
    """The collector closed the stream before acknowledging the hello."""


class Uplink:
    """Delivers one node's reports to the collector, in order, at least once."""

    def __init__(
        self,
        targets: Sequence[str],
        inventory: inventory_pb2.NodeInventory,
        *,
        report_interval_s: float = 10.0,
        max_buffered_reports: int = 360,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if not targets:
            raise ValueError("at least one collector address is needed")
        self._targets = list(targets)
        self._inventory = inventory
        self._inventory_changed = False
        self._report_interval_ms = int(report_interval_s * 1000)
        self._buffer: deque[ingest_pb2.Report] = deque()
        self._max_buffered = max_buffered_reports
        self._next_sequence = 1
        self._last_sent = 0
        self._first_hello = True
        self._wakeup = asyncio.Event()
        self._rng = rng or random.Random()
        self._backoff_base = backoff_base_s
        self._backoff_cap = backoff_cap_s
        self.stats = telemetry_pb2.AgentStats()
        self.connected = asyncio.Event()
        self.last_acked_sequence = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def update_inventory(self, inventory: inventory_pb2.NodeInventory) -> None:
        """The node changed (a GPU added, a driver upgraded): tell the collector with the next report."""
        self._inventory = inventory
        self._inventory_changed = True

    def submit(self, gpus: Sequence[telemetry_pb2.GpuSample], time_unix_nano: int | None = None) -> None:
        """Queue a report of ``gpus``; it is sent as soon as the stream allows."""
        report = ingest_pb2.Report(
            sequence=self._next_sequence,
            time_unix_nano=time_unix_nano or time.time_ns(),
            gpus=gpus,
        )
        report.agent_stats.CopyFrom(self.stats)
        if self._inventory_changed:
            report.inventory.CopyFrom(self._inventory)
            self._inventory_changed = False
        self._next_sequence += 1
        self._buffer.append(report)
        while len(self._buffer) > self._max_buffered:
            self._buffer.popleft()
            self.stats.reports_dropped_total += 1
        self._wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a stream open until ``stop`` is set, then flush what is buffered (briefly)."""
        attempt = 0
        last_error = ""
        while True:
            target = self._targets[attempt % len(self._targets)]
            started = time.monotonic()
            try:
                await self._session(target, stop)
            except (grpc.aio.AioRpcError, CollectorRejected) as exc:
                error = _describe(exc)
                if error != last_error:
                    log.warning("collector %s: %s; retrying with backoff", target, error)
                    last_error = error
            except Exception:
                # A bug must not end delivery for good: log it and reconnect.
                log.exception("uplink to %s failed; reconnecting", target)
            finally:
                self.connected.clear()
            if stop.is_set():
                return
            if time.monotonic() - started >= STABLE_CONNECTION_S:
                attempt = 0
            delay = self._rng.uniform(0, min(self._backoff_cap, self._backoff_base * 2**attempt))
            attempt += 1
            self.stats.reconnects_total += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return

    async def _session(self, target: str, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(target, options=wire.CLIENT_OPTIONS) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            call = stub.Connect()
            hello = ingest_pb2.Hello(
                protocol_version=wire.PROTOCOL_VERSION,
                inventory=self._inventory,
                report_interval_ms=self._report_interval_ms,
            )
            await call.write(ingest_pb2.AgentMessage(hello=hello))
            self._inventory_changed = False
            answer = await call.read()
            if answer is grpc.aio.EOF or not answer.HasField("hello_ack"):
                await call  # raises the collector's status if it sent one
                raise CollectorRejected("stream closed before the hello was acknowledged")
            self._on_hello_ack(answer.hello_ack.last_acked_sequence)
            self.connected.set()
            log.info(
                "connected to collector %s (resuming after sequence %d)",
                target,
                answer.hello_ack.last_acked_sequence,
            )
            reader = asyncio.create_task(self._read_acks(call), name="uplink-acks")
            stopping = asyncio.create_task(stop.wait(), name="uplink-stop")
            try:
                await self._send_loop(call, reader, stopping)
                if stop.is_set():
                    await call.done_writing()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(reader), FLUSH_TIMEOUT_S)
                if reader.done():
                    reader.result()
            finally:
                for task in (reader, stopping):
                    task.cancel()
                call.cancel()

    async def _send_loop(
        self, call: grpc.aio.StreamStreamCall, reader: asyncio.Task[None], stopping: asyncio.Task[bool]
    ) -> None:
        while True:
            self._wakeup.clear()
            while (report := self._next_unsent()) is not None:
                await call.write(ingest_pb2.AgentMessage(report=report))
                self._last_sent = report.sequence
            if stopping.done() or reader.done():
                return
            waker = asyncio.create_task(self._wakeup.wait(), name="uplink-wakeup")
            try:
                await asyncio.wait((waker, reader, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()

    def _next_unsent(self) -> ingest_pb2.Report | None:
        if not self._buffer:
            return None
        index = max(self._last_sent - self._buffer[0].sequence + 1, 0)
        return self._buffer[index] if index < len(self._buffer) else None

    async def _read_acks(self, call: grpc.aio.StreamStreamCall) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            if message.HasField("report_ack"):
                self._trim(message.report_ack.sequence)

    def _on_hello_ack(self, last_acked: int) -> None:
        first_pending = self._buffer[0].sequence if self._buffer else self._next_sequence
        if self._first_hello and last_acked >= first_pending:
            # This process restarted within the same boot: continue the numbering
            # the collector knows, instead of having fresh reports taken as duplicates.
            shift = last_acked + 1 - first_pending
            for report in self._buffer:
                report.sequence += shift
            self._next_sequence += shift
        self._first_hello = False
        self._trim(last_acked)
        self._last_sent = last_acked

    def _trim(self, acked: int) -> None:
        self.last_acked_sequence = max(self.last_acked_sequence, acked)
        while self._buffer and self._buffer[0].sequence <= acked:
            self._buffer.popleft()


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
