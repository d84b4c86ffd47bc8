"""One node's stream to its collector: placement, hello, reports, acknowledgements, reconnection.

Reports stay in the node's ReportBuffer (agent/buffer.py: numbering, caps, spool) until the
collector acknowledges them; after a reconnect the agent resends everything after the
collector's last acknowledged sequence number, MAX_IN_FLIGHT_REPORTS at a time (the rest of a
long backlog after a pause: see REPLAY_AT_ONCE). Reconnects back off exponentially with full
jitter across the configured collector addresses, never longer than the report interval (see
Backoff), and honour the collector's retry-after hint, so a restarted collector has its fleet
back within about one interval, at the pace its admission control sets.

Placement (agent/placement.py): the node ranks the collectors' members by rendezvous hashing
of its node id, connects to the first, and on each failure moves on to the next in its
ranking. While on one that is not its first, it asks every hold-down (--failback-after, plus
up to as much again at random, so that a returning collector is not stormed by all its nodes
at once) whether one ranked higher answers the standard gRPC health check; when one does, it
ends the stream once the reports in flight are acknowledged and moves back, through that
collector's admission control. The rest of the buffer follows on the new stream: nothing is
skipped, nothing acknowledged is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufleet import wire
from gpufleet.agent import placement
from gpufleet.agent.buffer import ReportBuffer
from gpufleet.agent.spool import Spool
from gpufleet.security import ClientSecurity
from gpufleet.v1 import allocation_pb2, ingest_pb2, ingest_pb2_grpc, inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)

# A connection that lasted this long resets the backoff (a flapping collector
# that accepts and then drops connections does not).
STABLE_CONNECTION_S = 60.0
# On shutdown, how long to wait for the last acknowledgements.
FLUSH_TIMEOUT_S = 3.0
# Reports written but not yet acknowledged, at most.
MAX_IN_FLIGHT_REPORTS = 16
# After a reconnection, a backlog longer than this sends its first report at once
# and the rest after a random half to whole report interval. A fleet back from a
# long outage would otherwise replay its backlogs (30 reports a node after 5
# minutes) all at once and keep the collector's one event loop too busy to take
# in the hellos of the nodes still connecting; this way every node connects and
# reports first, and the replays follow, spread over an interval.
REPLAY_AT_ONCE = 8
# On a collector other than the node's first-ranked: seconds after connecting before asking
# whether one ranked higher is back (plus up to as much again, at random), and between asks.
FAILBACK_AFTER_S = 60.0
# The deadline of that question (a health check): a collector that takes longer is not back.
PROBE_TIMEOUT_S = 2.0
# What the health check asks about: the service the collector serves agents on.
INGEST_SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


class Failure(enum.Enum):
    """What ended a stream, as far as how soon to try again goes."""

    # UNAVAILABLE: nothing listens, or the connection dropped. The collector is most
    # likely restarting, and an attempt costs it nothing: come back soon.
    REFUSED = "refused"
    # Timeouts, hangs, rejections, bugs: retrying eagerly would not help.
    STALLED = "stalled"


@dataclass(frozen=True)
class Backoff:
    """The delay before reconnection attempt ``attempt`` (failures since the last stable
    connection): capped exponential backoff with full jitter, never longer than the
    report interval.

    However long the collector was away, no node waits more than one interval between
    attempts (half of one when it was refused: the collector is down or restarting), so
    the fleet is back within about one interval of its return; the jitter spreads the
    fleet over that window instead of bringing it back in lockstep. A retry-after hint
    from the collector takes the place of the backoff.
    """

    interval_s: float = 10.0
    base_s: float = 1.0
    cap_s: float = 30.0

    def ceiling(self, attempt: int, kind: Failure) -> float:
        """The longest delay attempt ``attempt`` may draw."""
        cap = min(self.cap_s, self.interval_s)
        base = self.base_s
        if kind is Failure.REFUSED:
            cap, base = cap / 2, base / 4
        return min(cap, base * 2.0 ** min(attempt, 64))

    def delay(
        self, attempt: int, kind: Failure, rng: random.Random, retry_after_s: float | None = None
    ) -> float:
        """Seconds to wait before attempt ``attempt``: the collector's hint if it gave one."""
        if retry_after_s is not None:
            # The collector said when: come back then, give or take a tenth.
            return retry_after_s * rng.uniform(1.0, 1.1)
        return rng.uniform(0.0, self.ceiling(attempt, kind))


class UplinkError(Exception):
    """Why a stream to the collector ended, and how soon to try again."""

    kind = Failure.STALLED
    retry_after_s: float | None = None

    @property
    def log_key(self) -> str:
        """Errors with the same key are logged once in a row."""
        return str(self)


class CollectorClosed(UplinkError):
    """The stream ended with a status: the collector's, or gRPC's on its behalf (UNAVAILABLE)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None) -> None:
        super().__init__(f"{code.name}: {details or 'the collector ended the stream'}")
        self.code = code
        self.retry_after_s = retry_after_s
        if code == grpc.StatusCode.UNAVAILABLE:
            self.kind = Failure.REFUSED

    @property
    def log_key(self) -> str:
        # "retry in 12 ms" differs every time: one line for a busy collector, not one per hint.
        return f"{self.code.name} with retry-after" if self.retry_after_s is not None else str(self)


class CollectorRejected(UplinkError):
    """The collector answered the hello with something other than its acknowledgement."""


class CollectorStalled(UplinkError):
    """The hello or reports went unacknowledged too long: the collector (or the path to it) hangs."""


class _StreamEnded(Exception):
    """The stream ended (EOF) with no error raised: its status says how."""


class Uplink:
    """Delivers one node's reports to its collector, in order, at least once."""

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
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        rng: random.Random | None = None,
        failback_after_s: float = FAILBACK_AFTER_S,
    ) -> None:
        if not targets:
            raise ValueError("at least one collector address is needed")
        if not failback_after_s > 0:
            raise ValueError(f"failback_after_s must be positive, got {failback_after_s!r}")
        self._addresses = list(targets)
        self._node_id = inventory.node_id
        self._failback_after_s = failback_after_s
        # Names are resolved again on each reconnection (off the event loop); addresses are fixed.
        self._resolving = placement.needs_resolving(self._addresses)
        self._members: dict[str, str | None] = {}
        self._ranking: list[str] = []
        if not self._resolving:
            self._set_members(placement.members(self._addresses))
        self._target: str | None = None
        self._connected_to: str | None = None
        # Streams opened to another collector than the one before, and of those, the moves
        # back to one ranked higher once it answered.
        self.moves_total = 0
        self.failbacks_total = 0
        self._inventory = inventory
        self._inventory_changed = False
        self._allocations: allocation_pb2.Allocations | None = None
        self._allocations_changed = False
        self._report_interval_ms = int(report_interval_s * 1000)
        self._interval_s = report_interval_s
        self._channel_options = wire.client_options(int(keepalive_s * 1000))
        self._security = security or ClientSecurity()
        # gRPC skips keepalive pings while data is being written, and writes into a
        # hung peer's socket succeed for a while: so the acknowledgements are watched too.
        self._ack_timeout_s = keepalive_s + min(wire.KEEPALIVE_TIMEOUT_MS / 1000, keepalive_s)
        self._waiting_for_ack_since: float | None = None
        self._writing: asyncio.Future[None] | None = None
        self.stats = telemetry_pb2.AgentStats()
        self._buffer = ReportBuffer(max_buffered_reports, self.stats, spool)
        self._last_sent = 0
        # Where this stream resumed, and until when the rest of a long backlog waits.
        self._resumed_after = 0
        self._replay_held_until = 0.0
        self._rng = rng or random.Random()
        self._backoff = Backoff(report_interval_s, backoff_base_s, backoff_cap_s)
        self._wakeup = asyncio.Event()
        self.connected = asyncio.Event()
        self.last_acked_sequence = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def current_target(self) -> str | None:
        """The collector member the stream is open (or being opened) to; None before the first try."""
        return self._target

    @property
    def preferred_target(self) -> str | None:
        """The node's first-ranked collector member; None until its names are first resolved."""
        return self._ranking[0] if self._ranking else None

    @property
    def ranking(self) -> list[str]:
        """The collector members in the order this node prefers them."""
        return list(self._ranking)

    def update_inventory(self, inventory: inventory_pb2.NodeInventory) -> None:
        """The node changed (a GPU added, a driver upgraded): tell the collector with the next report."""
        self._inventory = inventory
        self._inventory_changed = True

    def update_allocations(self, allocations: allocation_pb2.Allocations) -> None:
        """Who holds the node's GPUs changed: tell the collector with the next report (and every Hello)."""
        self._allocations = allocations
        self._allocations_changed = True

    def submit(
        self,
        gpus: Sequence[telemetry_pb2.GpuSample],
        *,
        carries_events: bool = False,
        time_unix_nano: int | None = None,
    ) -> None:
        """Queue a report of ``gpus`` (sampled now, or at ``time_unix_nano``), to send when it can."""
        report = ingest_pb2.Report(time_unix_nano=time_unix_nano or time.time_ns(), gpus=gpus)
        report.agent_stats.CopyFrom(self.stats)
        if self._inventory_changed:
            report.inventory.CopyFrom(self._inventory)
            self._inventory_changed = False
        if self._allocations_changed and self._allocations is not None:
            report.allocations.CopyFrom(self._allocations)
            self._allocations_changed = False
        self._buffer.add(report, events=carries_events)
        self._wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a stream open until ``stop`` is set, then flush what is buffered (briefly)."""
        attempt = 0
        last_error = ""
        # The member whose stream ended last (next: the one after it in the ranking), or the
        # member to try next whatever the ranking (one ranked higher that answered, or one that
        # asked to be tried again later).
        failed: str | None = None
        chosen: str | None = None
        while True:
            await self._refresh_ranking()
            target = self._target = self._choose(chosen, failed)
            started = time.monotonic()
            failure: UplinkError | None = None
            better: str | None = None
            try:
                better = await self._session(target, stop)
            except UplinkError as exc:
                failure = exc
            except Exception:
                # A bug must not end delivery for good: log it and reconnect.
                log.exception("uplink to %s failed; reconnecting", target)
            finally:
                self.connected.clear()
            if stop.is_set():
                return
            if better is not None:
                # A move, not a failure: straight on to the collector that answered.
                self.failbacks_total += 1
                self.stats.reconnects_total += 1
                attempt, last_error, failed, chosen = 0, "", None, better
                continue
            if time.monotonic() - started >= STABLE_CONNECTION_S:
                attempt = 0
            kind = failure.kind if failure else Failure.STALLED
            retry_after_s = failure.retry_after_s if failure else None
            delay = self._backoff.delay(attempt, kind, self._rng, retry_after_s)
            if failure is not None and failure.log_key != last_error:
                self._log_failure(target, failure, delay)
            last_error = failure.log_key if failure else ""
            if retry_after_s is None:
                attempt += 1
                failed, chosen = target, None
            else:
                # The collector said when to come back (admission control): back to it, then.
                failed, chosen = None, target
            self.stats.reconnects_total += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return

    def _choose(self, chosen: str | None, failed: str | None) -> str:
        """The member to try: ``chosen``, else the one after ``failed`` in the ranking, else the first."""
        ranking = self._ranking
        if chosen is not None and chosen in ranking:
            return chosen
        if failed is not None and failed in ranking:
            return ranking[(ranking.index(failed) + 1) % len(ranking)]
        return ranking[0]

    async def _refresh_ranking(self) -> None:
        """Resolve the collectors' names again (in a thread: the resolver blocks) and rank them."""
        if self._resolving:
            self._set_members(await asyncio.to_thread(placement.members, self._addresses))

    def _set_members(self, members: dict[str, str | None]) -> None:
        ranking = placement.rank(self._node_id, list(members))
        if ranking != self._ranking:
            log.debug("collectors of node %s, preferred first: %s", self._node_id, ", ".join(ranking))
        self._members, self._ranking = members, ranking

    def _ranked_above(self, target: str) -> list[str]:
        """The members this node prefers to ``target`` (all others, if ``target`` left the ranking)."""
        ranking = self._ranking
        if target in ranking:
            return ranking[: ranking.index(target)]
        return [member for member in ranking if member != target]

    def _channel(self, member: str) -> grpc.aio.Channel:
        """A channel to ``member``. With TLS, the collector's certificate is checked against the
        host name the member was resolved from, not against the address dialled."""
        credentials = self._security.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(member, options=self._channel_options)
        options: list[tuple[str, str | int]] = [*self._channel_options]
        if (name := self._members.get(member)) is not None:
            options.append(("grpc.ssl_target_name_override", name))
        return grpc.aio.secure_channel(member, credentials, options=options)

    def _log_failure(self, target: str, failure: UplinkError, delay_s: float) -> None:
        if failure.retry_after_s is not None:
            log.info("collector %s is busy (%s); trying again in %.1f s, as asked", target, failure, delay_s)
            return
        log.warning(
            "collector %s: %s; retrying in %.1f s, then backing off up to %.1f s",
            target,
            failure,
            delay_s,
            self._backoff.ceiling(64, failure.kind),
        )

    async def _session(self, target: str, stop: asyncio.Event) -> str | None:
        """One stream to ``target`` until ``stop`` (None) or a move to a member ranked higher (it)."""
        async with self._channel(target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            call = stub.Connect(metadata=self._security.metadata())
            call.add_done_callback(self._stop_writing)
            try:
                return await self._stream(call, target, stop)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, _StreamEnded):
                # However the end showed itself (a failed read or write, an EOF),
                # the call's status says why, and when to come back.
                raise await _closed(call) from None
            finally:
                call.cancel()

    async def _stream(self, call: grpc.aio.StreamStreamCall, target: str, stop: asyncio.Event) -> str | None:
        try:
            last_acked = await asyncio.wait_for(self._hello(call), self._ack_timeout_s)
        except asyncio.TimeoutError:
            raise CollectorStalled(f"the hello went unanswered for {self._ack_timeout_s:.0f} s") from None
        self._on_hello_ack(last_acked)
        self._hold_long_replay()
        self.connected.set()
        self._arrived(target, last_acked)
        reader = asyncio.create_task(self._read_acks(call), name="uplink-acks")
        stopping = asyncio.create_task(stop.wait(), name="uplink-stop")
        watcher = self._watch(target)
        tasks = [task for task in (reader, stopping, watcher) if task is not None]
        try:
            await self._send_loop(call, reader, stopping, watcher)
            if stop.is_set():
                await self._flush(call, reader)
                return None
            if watcher is not None and watcher.done():
                better = watcher.result()
                await self._hand_over(call, reader)
                return better
            reader.result()  # the reader is done: this raises the stream's error, if any
            raise _StreamEnded
        finally:
            for task in tasks:
                task.cancel()
            # Collect the reader's error, if any: the call's status tells the same story.
            await asyncio.gather(*tasks, return_exceptions=True)

    def _arrived(self, target: str, last_acked: int) -> None:
        """The stream to ``target`` is open: count a move, say where the node is."""
        if self._connected_to is not None and self._connected_to != target:
            self.moves_total += 1
        self._connected_to = target
        position = self._ranking.index(target) + 1 if target in self._ranking else 0
        if position <= 1:
            log.info("connected to collector %s (resuming after sequence %d)", target, last_acked)
            return
        log.info(
            "connected to collector %s, ranked %d of %d for this node (resuming after sequence %d); "
            "checking for the ones ranked higher every %.0f-%.0f s",
            target,
            position,
            len(self._ranking),
            last_acked,
            self._failback_after_s,
            2 * self._failback_after_s,
        )

    def _watch(self, target: str) -> asyncio.Task[str] | None:
        """While on ``target``: a task that ends with a member ranked higher once one answers;
        None when none can (``target`` is first and the members are fixed addresses)."""
        if not self._resolving and not self._ranked_above(target):
            return None
        return asyncio.create_task(self._better_than(target), name="uplink-failback")

    async def _better_than(self, target: str) -> str:
        """Every hold-down plus up to one more at random: the first member ranked above
        ``target`` that answers (names are resolved again each time: members come and go)."""
        while True:
            await asyncio.sleep(self._failback_after_s * self._rng.uniform(1.0, 2.0))
            await self._refresh_ranking()
            for member in self._ranked_above(target):
                if await self._answers(member):
                    log.info(
                        "collector %s, ranked above %s for this node, answers: moving to it", member, target
                    )
                    return member

    async def _answers(self, member: str) -> bool:
        """Whether ``member`` serves agents now: the standard gRPC health check, briefly."""
        request = health_pb2.HealthCheckRequest(service=INGEST_SERVICE)
        try:
            async with self._channel(member) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    request, timeout=PROBE_TIMEOUT_S, metadata=self._security.metadata()
                )
        except grpc.aio.AioRpcError as exc:
            log.debug("collector %s does not answer the health check: %s", member, exc.code().name)
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def _hand_over(self, call: grpc.aio.StreamStreamCall, reader: asyncio.Task[None]) -> None:
        """Moving on: end this stream once the reports in flight are acknowledged. What is not
        (the collector hangs, the stream broke) stays buffered and goes on the next stream."""

        async def drain() -> None:
            await call.done_writing()
            await asyncio.shield(reader)

        try:
            await asyncio.wait_for(drain(), FLUSH_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.InvalidStateError, grpc.aio.AioRpcError) as exc:
            log.debug("the stream ended before every report in flight was acknowledged: %r", exc)

    async def _hello(self, call: grpc.aio.StreamStreamCall) -> int:
        """Introduce the node; the collector's last acknowledged sequence number for it."""
        hello = ingest_pb2.Hello(
            protocol_version=wire.PROTOCOL_VERSION,
            inventory=self._inventory,
            report_interval_ms=self._report_interval_ms,
        )
        if self._allocations is not None:
            hello.allocations.CopyFrom(self._allocations)
        await self._write(call, ingest_pb2.AgentMessage(hello=hello), None)
        self._inventory_changed = False
        answer = await call.read()
        if answer is grpc.aio.EOF:
            raise _StreamEnded
        if not answer.HasField("hello_ack"):
            raise CollectorRejected(f"the collector answered the hello with {answer.WhichOneof('kind')!r}")
        return int(answer.hello_ack.last_acked_sequence)

    async def _send_loop(
        self,
        call: grpc.aio.StreamStreamCall,
        reader: asyncio.Task[None],
        stopping: asyncio.Task[bool],
        watcher: asyncio.Task[str] | None,
    ) -> None:
        """Write reports as the window allows, until the stream ends, ``stop`` or a move."""
        ending = [task for task in (reader, stopping, watcher) if task is not None]
        self._waiting_for_ack_since = None
        while True:
            self._wakeup.clear()
            while (report := self._next_unsent()) is not None:
                await self._write(call, ingest_pb2.AgentMessage(report=report), self._ack_timeout_s)
                self._last_sent = report.sequence
                if self._waiting_for_ack_since is None:
                    self._waiting_for_ack_since = time.monotonic()
            if any(task.done() for task in ending):
                return
            waker = asyncio.create_task(self._wakeup.wait(), name="uplink-wakeup")
            try:
                await asyncio.wait(
                    (waker, *ending), return_when=asyncio.FIRST_COMPLETED, timeout=self._idle_s()
                )
            finally:
                waker.cancel()
            since = self._waiting_for_ack_since
            if since is not None and time.monotonic() - since > self._ack_timeout_s:
                raise CollectorStalled(f"no acknowledgement for {self._ack_timeout_s:.0f} s")

    async def _write(
        self, call: grpc.aio.StreamStreamCall, message: ingest_pb2.AgentMessage, timeout_s: float | None
    ) -> None:
        """Write ``message``; _StreamEnded if the stream ended first, CollectorStalled if it hung."""
        self._writing = writing = asyncio.ensure_future(call.write(message))
        try:
            await asyncio.wait((writing,), timeout=timeout_s)
        finally:
            self._writing = None
            hung = writing.cancel()  # True only if it had not finished
        if hung:
            raise CollectorStalled(f"a message could not be written for {timeout_s:.0f} s")
        if writing.cancelled():
            raise _StreamEnded
        writing.result()

    def _stop_writing(self, call: grpc.aio.Call) -> None:
        """The stream ended: stop the write under way. gRPC would fail it and put an
        INTERNAL error of its own in place of the collector's status (and retry-after)."""
        if self._writing is not None:
            self._writing.cancel()

    async def _flush(self, call: grpc.aio.StreamStreamCall, reader: asyncio.Task[None]) -> None:
        """On shutdown: write what is left and wait for the acknowledgements, briefly."""

        async def write_the_rest() -> None:
            while (report := self._next_unsent(flushing=True)) is not None:
                await self._write(call, ingest_pb2.AgentMessage(report=report), None)
                self._last_sent = report.sequence
            await call.done_writing()
            await asyncio.shield(reader)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(write_the_rest(), FLUSH_TIMEOUT_S)
        if reader.done():
            reader.result()

    def _hold_long_replay(self) -> None:
        """Right after the hello: hold back the rest of a long backlog (see REPLAY_AT_ONCE)."""
        self._resumed_after = self._last_sent
        unsent = self._buffer.count_after(self._last_sent)
        self._replay_held_until = 0.0
        if unsent > REPLAY_AT_ONCE:
            self._replay_held_until = time.monotonic() + self._rng.uniform(0.5, 1.0) * self._interval_s

    def _idle_s(self) -> float:
        """How long the send loop may wait: until a held replay is due, at most the ack timeout."""
        held_s = self._replay_held_until - time.monotonic()
        return min(self._ack_timeout_s, held_s) if held_s > 0 else self._ack_timeout_s

    def _next_unsent(self, *, flushing: bool = False) -> ingest_pb2.Report | None:
        """The next report to write, in order: none while MAX_IN_FLIGHT_REPORTS await
        acknowledgement or a long replay is held back, unless ``flushing``."""
        # The buffer holds unacknowledged reports in order: the first ones are in flight.
        found = self._buffer.first_after(self._last_sent)
        if found is None:
            return None
        in_flight, report = found
        if flushing:
            return report
        if in_flight >= MAX_IN_FLIGHT_REPORTS:
            return None
        if self._last_sent > self._resumed_after and time.monotonic() < self._replay_held_until:
            return None
        return report

    async def _read_acks(self, call: grpc.aio.StreamStreamCall) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            if message.HasField("report_ack"):
                self._trim(message.report_ack.sequence)
                self._wakeup.set()  # room in the window for the next report

    def _on_hello_ack(self, last_acked: int) -> None:
        self._buffer.resume_after(last_acked)
        self._trim(last_acked)
        self._last_sent = last_acked

    def _trim(self, acked: int) -> None:
        if acked > self.last_acked_sequence:
            # Progress: the clock restarts for whatever is still unacknowledged.
            self._waiting_for_ack_since = time.monotonic() if acked < self._last_sent else None
        self.last_acked_sequence = max(self.last_acked_sequence, acked)
        self._buffer.acknowledged(acked)


async def _closed(call: grpc.aio.StreamStreamCall) -> CollectorClosed:
    """The status ``call`` ended with, as the project's exception."""
    call.cancel()  # a no-op on a finished call; makes sure the status below arrives
    code = await call.code()
    details = await call.details()
    trailing = await call.trailing_metadata()
    return CollectorClosed(code, details, _retry_after_s(code, trailing))


def _retry_after_s(code: grpc.StatusCode, trailing: grpc.aio.Metadata | None) -> float | None:
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in trailing or ():
        if key == wire.RETRY_AFTER_KEY:
            with contextlib.suppress(ValueError):
                return max(int(value), 1) / 1000
    return None
