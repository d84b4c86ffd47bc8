"""Every limit on agent input, over a real gRPC connection, with the rest of the fleet still served."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.uplink import Uplink
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.ingest import IngestPolicy
from gpufleet.collector.limits import Limits
from gpufleet.collector.service import Collector
from gpufleet.v1 import ingest_pb2
from tests.conftest import http_get, local_config, metric
from tests.fleet import inventory_for
from tests.test_ingest import METHOD, exchange, hello, report


@pytest.fixture
async def limited() -> AsyncIterator[Collector]:
    limits = Limits(
        max_gpus_per_node=16,
        max_labels_per_node=4,
        reports_per_second=1,
        report_burst=3,
        max_streams=40,
        hello_timeout_s=0.5,
    )
    collector = Collector(
        local_config(
            ingest=IngestPolicy(limits=limits),
        )
    )
    await collector.start()
    yield collector
    await collector.stop()


def hello_with(change: Callable[[ingest_pb2.Hello], None], index: int = 0) -> bytes:
    message = ingest_pb2.AgentMessage.FromString(hello(index))
    change(message.hello)
    return message.SerializeToString()


def report_with(change: Callable[[ingest_pb2.Report], None], sequence: int = 1) -> bytes:
    message = ingest_pb2.AgentMessage.FromString(report(sequence))
    change(message.report)
    return message.SerializeToString()


async def still_serving(collector: Collector, index: int = 9) -> None:
    answers, code, _ = await exchange(collector, hello(index), report(1))
    assert code == grpc.StatusCode.OK and answers[-1].report_ack.sequence == 1


def many_labels(h: ingest_pb2.Hello) -> None:
    h.inventory.labels.update({f"k{i}": "v" for i in range(5)})


def long_label(h: ingest_pb2.Hello) -> None:
    h.inventory.labels["k"] = "v" * 10_000


def long_hostname(h: ingest_pb2.Hello) -> None:
    h.inventory.hostname = "h" * 300


def many_gpus(h: ingest_pb2.Hello) -> None:
    for index in range(8, 20):
        h.inventory.gpus.add(index=index)


def huge_gpu_index(h: ingest_pb2.Hello) -> None:
    h.inventory.gpus[0].index = 2**31


def long_serial(h: ingest_pb2.Hello) -> None:
    h.inventory.gpus[0].serial = "s" * 1000


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (many_labels, "labels"),
        (long_label, "label_length"),
        (long_hostname, "string_length"),
        (many_gpus, "gpus"),
        (huge_gpu_index, "gpu_index"),
        (long_serial, "string_length"),
    ],
)
async def test_hello_limits(
    limited: Collector, change: Callable[[ingest_pb2.Hello], None], reason: str
) -> None:
    _, code, details = await exchange(limited, hello_with(change))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in details
    assert metric(limited, "gpufleet_collector_rejected_messages_total", reason=f"limit_{reason}") == 1
    assert len(limited.state) == 0  # nothing of it reached the fleet
    await still_serving(limited)


def many_xids(r: ingest_pb2.Report) -> None:
    for _ in range(300):
        r.gpus[0].xid_events.add(code=13)


def gpu_out_of_range(r: ingest_pb2.Report) -> None:
    r.gpus[0].index = 99


def long_process_name(r: ingest_pb2.Report) -> None:
    r.gpus[0].processes.processes.add(pid=1, name="p" * 1000)


def many_processes(r: ingest_pb2.Report) -> None:
    for pid in range(1100):
        r.gpus[0].processes.processes.add(pid=pid, name="python")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (many_xids, "xids"),
        (gpu_out_of_range, "gpu_index"),
        (long_process_name, "string_length"),
        (many_processes, "processes"),
    ],
)
async def test_report_limits(
    limited: Collector, change: Callable[[ingest_pb2.Report], None], reason: str
) -> None:
    _, code, details = await exchange(limited, hello(0), report_with(change))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert metric(limited, "gpufleet_collector_rejected_messages_total", reason=f"limit_{reason}") == 1
    node = limited.state.find("node-0000")
    assert node is not None and node.last_sequence == 0  # the report was not taken in
    await still_serving(limited)


async def test_impossible_values_are_dropped_and_future_times_clamped(limited: Collector) -> None:
    future = time.time_ns() + 10 * 365 * 86400 * 10**9

    def garbage(r: ingest_pb2.Report) -> None:
        r.gpus[0].gpu_temperature_celsius = 10_000
        r.gpus[1].power_draw_milliwatts = 2**32 - 1
        r.time_unix_nano = future
        r.gpus[2].xid_events.add(code=79, time_unix_nano=future)

    answers, code, _ = await exchange(limited, hello(0), report_with(garbage))
    assert code == grpc.StatusCode.OK and answers[-1].report_ack.sequence == 1
    assert metric(limited, "gpufleet_collector_implausible_values_total") == 4
    node = limited.state.find("node-0000")
    assert node is not None
    assert not node.gpus[0].sample.HasField("gpu_temperature_celsius")  # type: ignore[union-attr]
    assert node.gpus[0].sample.HasField("power_draw_milliwatts")  # type: ignore[union-attr]
    assert not node.gpus[1].sample.HasField("power_draw_milliwatts")  # type: ignore[union-attr]
    _, body, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{limited.http_port}/metrics")
    assert not re.search(rb"^gpufleet_gpu_temperature_celsius\{[^}]*\} 10000", body, re.M)
    assert b"4294967.295" not in body
    xid = limited.state.events.query(EventMatch(kinds=frozenset({"xid"})))
    assert xid[0].time_unix_nano <= time.time_ns()


async def test_reports_per_second_per_node(limited: Collector) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.grpc_port}") as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=ingest_pb2.CollectorMessage.FromString
        )(iter([hello(0), *(report(s) for s in range(1, 8))]))
        acks = []
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for answer in call:
                acks.append(answer)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = dict(error.value.trailing_metadata() or ())
        assert int(hint[wire.RETRY_AFTER_KEY]) > 0
    assert len(acks) == 1 + 3  # the hello and the burst of three
    await still_serving(limited)


async def test_streams_that_never_say_hello_are_closed(limited: Collector) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.grpc_port}") as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=ingest_pb2.CollectorMessage.FromString
        )()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert metric(limited, "gpufleet_collector_rejected_messages_total", reason="hello_timeout") == 1


async def test_the_stream_limit_sends_agents_away_with_a_retry_hint(limited: Collector) -> None:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{limited.grpc_port}", options=wire.client_options()
    ) as channel:
        calls = [channel.stream_stream(METHOD, request_serializer=None)() for _ in range(45)]
        await asyncio.sleep(0.3)
        _, code, details = await exchange(limited, hello(1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in details
        assert metric(limited, "gpufleet_collector_rejected_messages_total", reason="streams") >= 1
        for call in calls:
            call.cancel()


async def test_a_flood_of_connections_does_not_starve_the_fleet() -> None:
    """300 connections that never say hello, while one agent reports: every report still goes
    through, each acknowledged within a second."""
    collector = Collector(
        local_config(
            ingest=IngestPolicy(limits=Limits(hello_timeout_s=3)),
        )
    )
    await collector.start()
    target = f"127.0.0.1:{collector.grpc_port}"
    flood_channels = [grpc.aio.insecure_channel(target, options=wire.client_options()) for _ in range(300)]
    calls = [channel.stream_stream(METHOD, request_serializer=None)() for channel in flood_channels]
    source = SimulatedSource("H100", 8, node_index=3)
    uplink = Uplink([target], inventory_for(source, 3), rng=random.Random(0))
    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))
    try:
        await asyncio.wait_for(uplink.connected.wait(), 5)
        slowest = 0.0
        for sequence in range(1, 31):
            submitted = time.monotonic()
            uplink.submit(source.sample(with_processes=False))
            while uplink.last_acked_sequence < sequence:
                assert time.monotonic() - submitted < 1.0, f"report {sequence} waited over a second"
                await asyncio.sleep(0.005)
            slowest = max(slowest, time.monotonic() - submitted)
        print(f"slowest acknowledgement during the flood: {slowest * 1000:.0f} ms")
        assert metric(collector, "gpufleet_collector_agent_streams") >= 250  # the flood was really there
    finally:
        stop.set()
        await task
        for call in calls:
            call.cancel()
        for channel in flood_channels:
            await channel.close()
        await collector.stop()


def test_mig_instances_are_bounded_and_named_once() -> None:
    from gpufleet.collector.limits import LimitExceeded, Limits, check_inventory, check_report
    from gpufleet.v1 import ingest_pb2, inventory_pb2

    limits = Limits()
    inventory = inventory_pb2.NodeInventory(node_id="n")
    gpu = inventory.gpus.add(index=0)
    for gi in (1, 2):
        gpu.mig_instances.add(gpu_instance_id=gi, profile="3g.40gb")
    check_inventory(inventory, limits)
    gpu.mig_instances.add(gpu_instance_id=2)
    with pytest.raises(LimitExceeded, match="MIG GPU instance id twice"):
        check_inventory(inventory, limits)
    report = ingest_pb2.Report(sequence=1)
    sample = report.gpus.add(index=0)
    for gi in range(limits.max_mig_instances_per_gpu + 1):
        sample.mig_instances.add(gpu_instance_id=gi)
    with pytest.raises(LimitExceeded, match="MIG instances on GPU 0"):
        check_report(report, limits)
