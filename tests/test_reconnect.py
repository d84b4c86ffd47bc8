"""Reconnection: the backoff policy, streams the collector ends, and coming back after an outage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.uplink import (
    MAX_IN_FLIGHT_REPORTS,
    REPLAY_AT_ONCE,
    Backoff,
    CollectorClosed,
    CollectorStalled,
    Failure,
    Uplink,
)
from gpufleet.collector.ingest import SERVICE_NAME, IngestPolicy
from gpufleet.collector.service import Collector, CollectorConfig
from gpufleet.ports import free_port
from gpufleet.v1 import ingest_pb2
from tests.conftest import local_config, metric
from tests.fleet import inventory_for
from tests.test_uplink import running, until

# -- the policy, without waiting ----------------------------------------------------------------


@pytest.mark.parametrize("interval_s", [1.0, 10.0, 60.0, 600.0])
@pytest.mark.parametrize("kind", list(Failure))
def test_no_delay_exceeds_the_report_interval_after_any_number_of_failures(
    interval_s: float, kind: Failure
) -> None:
    backoff = Backoff(interval_s)
    rng = random.Random(1)
    limit = interval_s / 2 if kind is Failure.REFUSED else interval_s
    for attempt in [*range(200), 10_000, 10**9]:
        assert backoff.ceiling(attempt, kind) <= min(limit, backoff.cap_s)
        assert 0 <= backoff.delay(attempt, kind, rng) <= limit


def test_the_backoff_doubles_from_its_base_up_to_its_cap() -> None:
    backoff = Backoff(interval_s=10.0, base_s=1.0)
    assert [backoff.ceiling(n, Failure.STALLED) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert [backoff.ceiling(n, Failure.REFUSED) for n in range(7)] == [0.25, 0.5, 1, 2, 4, 5, 5]
    assert Backoff(interval_s=300.0).ceiling(100, Failure.STALLED) == 30.0  # the absolute cap


def test_a_refused_connection_is_retried_sooner_than_a_stall() -> None:
    backoff = Backoff()
    for attempt in range(50):
        assert backoff.ceiling(attempt, Failure.REFUSED) < backoff.ceiling(attempt, Failure.STALLED)


def test_full_jitter_spreads_a_fleet_over_the_whole_window() -> None:
    backoff, rng = Backoff(interval_s=10.0), random.Random(2)
    delays = [backoff.delay(20, Failure.REFUSED, rng) for _ in range(1250)]
    tenths = [sum(1 for d in delays if k * 0.5 <= d < (k + 1) * 0.5) for k in range(10)]
    assert min(tenths) > 1250 / 10 * 0.7 and max(tenths) < 1250 / 10 * 1.3


def test_a_retry_after_hint_replaces_the_backoff() -> None:
    backoff, rng = Backoff(), random.Random(3)
    for attempt in (0, 5, 50):
        assert 1.5 <= backoff.delay(attempt, Failure.STALLED, rng, retry_after_s=1.5) <= 1.65


def test_what_ended_the_stream_decides_the_kind_and_the_hint() -> None:
    refused = CollectorClosed(grpc.StatusCode.UNAVAILABLE, "Connection refused", None)
    assert refused.kind is Failure.REFUSED and refused.retry_after_s is None
    busy = CollectorClosed(grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in 120 ms", 0.12)
    assert busy.kind is Failure.STALLED and busy.retry_after_s == 0.12
    assert busy.log_key == CollectorClosed(grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in 7 ms", 0.007).log_key
    assert CollectorStalled("no acknowledgement").kind is Failure.STALLED


# -- streams the collector ends ---------------------------------------------------------------


class ScriptedCollector:
    """Speaks IngestService like the collector, then ends every stream the way it is told."""

    def __init__(self, *, ack_hello: bool, code: grpc.StatusCode, retry_after_ms: int | None) -> None:
        self.ack_hello = ack_hello
        self.code = code
        self.retry_after_ms = retry_after_ms
        self.connects: list[float] = []
        self.ends: list[float] = []

    async def connect(
        self, requests: AsyncIterator[ingest_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingest_pb2.CollectorMessage]:
        self.connects.append(time.monotonic())
        messages = requests.__aiter__()
        await messages.__anext__()  # the hello
        if self.ack_hello:
            yield ingest_pb2.CollectorMessage(hello_ack=ingest_pb2.HelloAck(last_acked_sequence=0))
            for _ in range(2):  # the first report, and the next: the backlog is being written
                await messages.__anext__()
        self.ends.append(time.monotonic())
        if self.code == grpc.StatusCode.OK:
            return
        trailing = () if self.retry_after_ms is None else ((wire.RETRY_AFTER_KEY, str(self.retry_after_ms)),)
        await context.abort(self.code, "scripted end of stream", trailing)


Connect = Callable[
    [AsyncIterator[ingest_pb2.AgentMessage], grpc.aio.ServicerContext],
    AsyncIterator[ingest_pb2.CollectorMessage],
]


@contextlib.asynccontextmanager
async def serving(connect: Connect) -> AsyncIterator[str]:
    """IngestService on a free port with ``connect`` as its one method; yields the address."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Connect": grpc.stream_stream_rpc_method_handler(
                connect,
                request_deserializer=ingest_pb2.AgentMessage.FromString,
                response_serializer=ingest_pb2.CollectorMessage.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def fast_uplink(target: str, node_index: int = 0) -> Uplink:
    """An uplink with a short backoff and a backlog to write when the stream ends under its feet
    (a short interval: its replay is held back only briefly)."""
    source = SimulatedSource("H100", 8, seed=0, node_index=node_index)
    uplink = Uplink(
        [target],
        inventory_for(source, node_index),
        report_interval_s=0.05,
        backoff_base_s=0.04,
        rng=random.Random(node_index),
    )
    for _ in range(50):
        uplink.submit(source.sample(with_processes=False))
    return uplink


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a stream end was logged as a crash"
    assert "TypeError" not in caplog.text and "Traceback" not in caplog.text


async def test_a_stream_ended_with_retry_after_is_retried_when_the_collector_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    script = ScriptedCollector(ack_hello=True, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_ms=800)
    async with serving(script.connect) as target:
        uplink = fast_uplink(target)
        async with running(uplink):
            await until(lambda: len(script.connects) >= 5)
    gaps = [later - end for end, later in zip(script.ends, script.connects[1:], strict=False)]
    # Backoff alone would be back within 0.05 s; the hint says 0.8 s (plus up to a tenth).
    assert all(0.8 <= gap < 0.8 * 1.1 + 0.5 for gap in gaps), gaps
    assert_no_tracebacks(caplog)
    busy = [r for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]
    assert len(busy) == 1 and "scripted end of stream" in busy[0].getMessage()


@pytest.mark.parametrize(
    ("ack_hello", "code"),
    [(True, grpc.StatusCode.OK), (False, grpc.StatusCode.OK), (True, grpc.StatusCode.INTERNAL)],
)
async def test_a_stream_the_collector_ends_is_one_warning_not_a_traceback(
    caplog: pytest.LogCaptureFixture, ack_hello: bool, code: grpc.StatusCode
) -> None:
    script = ScriptedCollector(ack_hello=ack_hello, code=code, retry_after_ms=None)
    async with serving(script.connect) as target:
        uplink = fast_uplink(target)
        async with running(uplink):
            await until(lambda: len(script.connects) >= 6)
    assert_no_tracebacks(caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and code.name in warnings[0], warnings


async def test_admission_control_of_the_real_collector_paces_the_reconnection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    collector = Collector(
        local_config(
            ingest=IngestPolicy(admission_rate_per_s=2.0, admission_burst=1),
        )
    )
    await collector.start()
    try:
        uplinks = [fast_uplink(f"127.0.0.1:{collector.grpc_port}", index) for index in range(2)]
        started = time.monotonic()
        async with running(uplinks[0]), running(uplinks[1]):
            await until(lambda: all(u.connected.is_set() for u in uplinks))
            took = time.monotonic() - started
        # One admitted at once, the other told to come back in 500 ms.
        assert metric(collector, "gpufleet_collector_admission_rejections_total") == 1
        assert 0.5 <= took < 0.5 * 1.1 + 0.5, took
    finally:
        await collector.stop()
    assert_no_tracebacks(caplog)


# -- coming back after an outage ---------------------------------------------------------------


class SilentCollector:
    """Acknowledges the hello, then takes reports in without acknowledging any."""

    def __init__(self) -> None:
        self.received = 0

    async def connect(
        self, requests: AsyncIterator[ingest_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingest_pb2.CollectorMessage]:
        messages = requests.__aiter__()
        await messages.__anext__()
        yield ingest_pb2.CollectorMessage(hello_ack=ingest_pb2.HelloAck(last_acked_sequence=0))
        async for _ in messages:
            self.received += 1


async def test_a_backlog_is_sent_a_window_at_a_time() -> None:
    script = SilentCollector()
    async with serving(script.connect) as target:
        uplink = fast_uplink(target)  # 50 reports waiting
        async with running(uplink):
            await until(lambda: script.received >= MAX_IN_FLIGHT_REPORTS)
            await asyncio.sleep(0.3)
            assert script.received == MAX_IN_FLIGHT_REPORTS


async def test_a_long_backlog_sends_its_first_report_at_once_and_the_rest_an_interval_later(
    collector: Collector,
) -> None:
    source = SimulatedSource("H100", 8, seed=0, node_index=0)
    uplink = Uplink(
        [f"127.0.0.1:{collector.grpc_port}"],
        inventory_for(source, 0),
        report_interval_s=1.0,
        rng=random.Random(0),
    )
    for _ in range(30):  # five minutes' worth at a 10 s interval
        uplink.submit(source.sample(with_processes=False))
    async with running(uplink):
        await until(uplink.connected.is_set)
        connected = time.monotonic()
        await until(lambda: uplink.last_acked_sequence == 1)
        await asyncio.sleep(0.3)
        assert uplink.last_acked_sequence == 1  # held back: at least half an interval
        await until(lambda: uplink.last_acked_sequence == 30, timeout=3)
        assert 0.5 <= time.monotonic() - connected < 1.0 + 0.5


async def test_a_short_backlog_is_sent_at_once(collector: Collector) -> None:
    source = SimulatedSource("H100", 8, seed=0, node_index=0)
    uplink = Uplink([f"127.0.0.1:{collector.grpc_port}"], inventory_for(source, 0), report_interval_s=10.0)
    for _ in range(REPLAY_AT_ONCE):
        uplink.submit(source.sample(with_processes=False))
    async with running(uplink):
        await until(lambda: uplink.last_acked_sequence == REPLAY_AT_ONCE, timeout=2)


async def test_a_held_backlog_is_still_flushed_on_shutdown(collector: Collector) -> None:
    source = SimulatedSource("H100", 8, seed=0, node_index=0)
    uplink = Uplink([f"127.0.0.1:{collector.grpc_port}"], inventory_for(source, 0), report_interval_s=60.0)
    for _ in range(10):
        uplink.submit(source.sample(with_processes=False))
    async with running(uplink):
        await until(lambda: uplink.last_acked_sequence == 1)
    assert uplink.last_acked_sequence == 10 and uplink.buffered == 0


async def test_after_a_long_outage_every_node_is_back_within_half_an_interval_of_the_return() -> None:
    port = free_port()
    interval_s = 2.0
    uplinks = []
    for index in range(20):
        source = SimulatedSource("H100", 8, seed=0, node_index=index)
        uplinks.append(
            Uplink(
                [f"127.0.0.1:{port}"],
                inventory_for(source, index),
                report_interval_s=interval_s,
                rng=random.Random(index),
            )
        )
    async with contextlib.AsyncExitStack() as stack:
        for uplink in uplinks:
            await stack.enter_async_context(running(uplink))
        await asyncio.sleep(4.0)  # nobody listens: connections are refused, the backoff grows
        collector = Collector(
            CollectorConfig(
                grpc_host="127.0.0.1",
                grpc_port=port,
                http_host="127.0.0.1",
                http_port=0,
                shutdown_grace_s=0.1,
            )
        )
        await collector.start()
        try:
            returned = time.monotonic()
            await until(lambda: all(u.connected.is_set() for u in uplinks), timeout=3 * interval_s)
            took = time.monotonic() - returned
        finally:
            await collector.stop()
    assert took < interval_s / 2 + 1.0, took  # the slack: connecting on a busy host
