"""One node's stream to the collector: hello, reports, acknowledgements, reconnection.

Reports stay in a bounded buffer (and, optionally, a spool directory) until the
collector acknowledges them; after a reconnect the agent resends everything after
the collector's last acknowledged sequence number. When the buffer is full the
oldest plain-telemetry report is dropped first; reports that carry events (XIDs,
lost GPUs, inventory changes) are dropped only past a hard cap. Every drop is
counted. Reconnects back off exponentially with full jitter across the configured
collector addresses, and honour the collector's retry-after hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from agent.spool import Spool
from gpufleet import wire
from gpufleet.security import ClientSecurity
from gpufleet.v1 import ingest_pb2, ingest_pb2_grpc, inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)

# A connection that lasted this long resets the backoff (a flapping collector
# that accepts and then drops connections does not).
STABLE_CONNECTION_S = 60.0
# On shutdown, how long to wait for the last acknowledgements.
FLUSH_TIMEOUT_S = 3.0
# Reports that carry events may fill this many times the buffer's size.
EVENT_HARD_CAP_FACTOR = 4


class CollectorRejected(Exception):
    """The collector closed the stream before acknowledging the hello."""


class CollectorStalled(Exception):
    """Reports went unacknowledged too long: the collector (or the path to it) hangs."""


@dataclass
class Pending:
    report: ingest_pb2.Report
    carries_events: bool


class Uplink:
    """Delivers one node's reports to the collector, in order, at least once."""

    def __init__(
        self,
        targets: Sequence[str],
        inventory: inventory_pb2.NodeInventory,
        *,
        report_interval_s: float = 10.0,
        max_buffered_reports: int = 360,
        spool: Spool | None = None,
        keepalive_s: float = wire.KEEPALIVE_TIME_MS / 1000,
        security: ClientSecurity | None = None,
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
        self._channel_options = wire.client_options(int(keepalive_s * 1000))
        self._security = security or ClientSecurity()
        # gRPC skips keepalive pings while data is being written, and writes into a
        # hung peer's socket succeed for a while: so the acknowledgements are watched too.
        self._ack_timeout_s = keepalive_s + min(wire.KEEPALIVE_TIMEOUT_MS / 1000, keepalive_s)
        self._waiting_for_ack_since: float | None = None
        self._buffer: list[Pending] = []
        self._max_buffered = max_buffered_reports
        self._spool = spool
        self._last_sent = 0
        self._rng = rng or random.Random()
        self._backoff_base = backoff_base_s
        self._backoff_cap = backoff_cap_s
        self._wakeup = asyncio.Event()
        self._first_hello = True
        self.stats = telemetry_pb2.AgentStats()
        self.connected = asyncio.Event()
        self.last_acked_sequence = 0
        self._next_sequence = 1
        if spool is not None:
            self.stats.reports_dropped_total += spool.discard_other_boots()
            self._buffer = [Pending(report, _carries_events(report)) for report in spool.load()]
            if self._buffer:
                self._next_sequence = self._buffer[-1].report.sequence + 1
                log.info("resuming %d spooled reports", len(self._buffer))
        # Reports numbered by this process start here (spooled ones keep their numbers).
        self._first_new_sequence = self._next_sequence

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def update_inventory(self, inventory: inventory_pb2.NodeInventory) -> None:
        """The node changed (a GPU added, a driver upgraded): tell the collector with the next report."""
        self._inventory = inventory
        self._inventory_changed = True

    def submit(self, gpus: Sequence[telemetry_pb2.GpuSample], *, carries_events: bool = False) -> None:
        """Queue a report of ``gpus``; it is sent as soon as the stream allows."""
        report = ingest_pb2.Report(sequence=self._next_sequence, time_unix_nano=time.time_ns(), gpus=gpus)
        report.agent_stats.CopyFrom(self.stats)
        if self._inventory_changed:
            report.inventory.CopyFrom(self._inventory)
            self._inventory_changed = False
        self._next_sequence += 1
        self._buffer.append(Pending(report, carries_events or _carries_events(report)))
        if self._spool is not None:
            self._spool.write(report)
        self._enforce_cap()
        self._wakeup.set()

    def _enforce_cap(self) -> None:
        while len(self._buffer) > self._max_buffered:
            victim = next((i for i, p in enumerate(self._buffer) if not p.carries_events), None)
            if victim is None:
                if len(self._buffer) <= self._max_buffered * EVENT_HARD_CAP_FACTOR:
                    return
                victim = 0
                self.stats.event_reports_dropped_total += 1
            dropped = self._buffer.pop(victim)
            self.stats.reports_dropped_total += 1
            if self._spool is not None:
                self._spool.remove(dropped.report.sequence)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a stream open until ``stop`` is set, then flush what is buffered (briefly)."""
        attempt = 0
        last_error = ""
        while True:
            target = self._targets[attempt % len(self._targets)]
            started = time.monotonic()
            retry_after_s = None
            try:
                await self._session(target, stop)
            except (grpc.aio.AioRpcError, CollectorRejected, CollectorStalled) as exc:
                retry_after_s = _retry_after_s(exc)
                error = _describe(exc)
                if error != last_error and retry_after_s is None:
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
            if retry_after_s is not None:
                # The collector said when: come back then, give or take a tenth.
                delay = retry_after_s * self._rng.uniform(1.0, 1.1)
            else:
                delay = self._rng.uniform(0, min(self._backoff_cap, self._backoff_base * 2**attempt))
                attempt += 1
            self.stats.reconnects_total += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return

    async def _session(self, target: str, stop: asyncio.Event) -> None:
        async with self._security.aio_channel(target, self._channel_options) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            call = stub.Connect(metadata=self._security.metadata())
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
        self._waiting_for_ack_since = None
        while True:
            self._wakeup.clear()
            while (report := self._next_unsent()) is not None:
                try:
                    await asyncio.wait_for(
                        call.write(ingest_pb2.AgentMessage(report=report)), self._ack_timeout_s
                    )
                except asyncio.TimeoutError:
                    raise CollectorStalled(
                        f"a report could not be written for {self._ack_timeout_s:.0f} s"
                    ) from None
                except asyncio.InvalidStateError:
                    await call  # the collector ended the stream: raises its status
                    raise CollectorRejected("the collector closed the stream") from None
                self._last_sent = report.sequence
                if self._waiting_for_ack_since is None:
                    self._waiting_for_ack_since = time.monotonic()
            if stopping.done() or reader.done():
                return
            waker = asyncio.create_task(self._wakeup.wait(), name="uplink-wakeup")
            try:
                await asyncio.wait(
                    (waker, reader, stopping),
                    return_when=asyncio.FIRST_COMPLETED,
                    timeout=self._ack_timeout_s,
                )
            finally:
                waker.cancel()
            since = self._waiting_for_ack_since
            if since is not None and time.monotonic() - since > self._ack_timeout_s:
                raise CollectorStalled(f"no acknowledgement for {self._ack_timeout_s:.0f} s")

    def _next_unsent(self) -> ingest_pb2.Report | None:
        return next((p.report for p in self._buffer if p.report.sequence > self._last_sent), None)

    async def _read_acks(self, call: grpc.aio.StreamStreamCall) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            if message.HasField("report_ack"):
                self._trim(message.report_ack.sequence)

    def _on_hello_ack(self, last_acked: int) -> None:
        if self._first_hello and last_acked >= self._first_new_sequence:
            # This process restarted within the same boot: continue the numbering
            # the collector knows, instead of having fresh reports taken as duplicates.
            shift = last_acked + 1 - self._first_new_sequence
            renumbered = [p.report for p in self._buffer if p.report.sequence >= self._first_new_sequence]
            for report in renumbered:
                report.sequence += shift
            if self._spool is not None:
                self._spool.renumber(renumbered, shift)
            self._next_sequence += shift
            self._first_new_sequence += shift
        self._first_hello = False
        self._trim(last_acked)
        self._last_sent = last_acked

    def _trim(self, acked: int) -> None:
        if acked > self.last_acked_sequence:
            # Progress: the clock restarts for whatever is still unacknowledged.
            self._waiting_for_ack_since = time.monotonic() if acked < self._last_sent else None
        self.last_acked_sequence = max(self.last_acked_sequence, acked)
        keep = 0
        while keep < len(self._buffer) and self._buffer[keep].report.sequence <= acked:
            if self._spool is not None:
                self._spool.remove(self._buffer[keep].report.sequence)
            keep += 1
        if keep:
            del self._buffer[:keep]


def _carries_events(report: ingest_pb2.Report) -> bool:
    """Reports an operator must not lose: XIDs, lost GPUs, inventory changes."""
    return report.HasField("inventory") or any(
        gpu.xid_events or gpu.read_status == telemetry_pb2.GPU_READ_STATUS_LOST for gpu in report.gpus
    )


def _retry_after_s(exc: Exception) -> float | None:
    if not isinstance(exc, grpc.aio.AioRpcError) or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == wire.RETRY_AFTER_KEY:
            with contextlib.suppress(ValueError):
                return max(int(value), 1) / 1000
    return None


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
