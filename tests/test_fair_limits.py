"""Fair limits: one node or one peer cannot erase the fleet's history, fill the collector or its streams."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from gpufleet import event_kinds as kinds
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.ingest import IngestPolicy
from gpufleet.collector.limits import Limits
from gpufleet.collector.service import Collector
from gpufleet.v1 import ingest_pb2
from tests.conftest import local_config
from tests.test_ingest import METHOD, exchange, hello, report

STORM_REPORTS, STORM_GPUS, STORM_XIDS = 15, 64, 256


def storm_report(sequence: int) -> bytes:
    """A report within every limit: 64 GPUs, 256 XIDs each (the most a report may carry)."""
    report = ingest_pb2.Report(sequence=sequence, time_unix_nano=1)
    for index in range(STORM_GPUS):
        gpu = report.gpus.add(index=index)
        for _ in range(STORM_XIDS):
            gpu.xid_events.add(code=79, time_unix_nano=1)
    return ingest_pb2.AgentMessage(report=report).SerializeToString()


async def started(tmp_path: Path, **limits: float) -> Collector:
    collector = Collector(
        local_config(
            db_path=tmp_path / "fleet.db",
            ingest=IngestPolicy(limits=Limits(**limits)),  # type: ignore[arg-type]
        )
    )
    await collector.start()
    return collector


def history(collector: Collector, node: str) -> list[str]:
    found = collector.state.find(node)
    assert found is not None
    return [e.kind for e in collector.state.events.query(EventMatch(node_id=found.node_id), limit=100_000)]


async def test_one_node_cannot_erase_the_fleet_s_event_history(tmp_path: Path) -> None:
    collector = await started(tmp_path)
    for index in range(3):
        await exchange(collector, hello(index), report(1, SimulatedSource("H100", 8, node_index=index)))
    before = {f"node-{i:04d}": history(collector, f"node-{i:04d}") for i in range(3)}
    assert all(before.values())
    storm = ingest_pb2.AgentMessage.FromString(hello(9, gpus=STORM_GPUS))
    started_at = time.monotonic()
    answers, code, details = await exchange(
        collector, storm.SerializeToString(), *(storm_report(s) for s in range(1, STORM_REPORTS + 1))
    )
    storm_s = time.monotonic() - started_at
    assert code == grpc.StatusCode.OK, details
    assert answers[-1].report_ack.sequence == STORM_REPORTS
    # Every other node keeps its history; the storm is counted in full, logged within its budget.
    for node, kinds_before in before.items():
        assert history(collector, node) == kinds_before
    stormy = collector.state.find("node-0009")
    assert stormy is not None
    assert sum(gpu.xid_totals.get(79, 0) for gpu in stormy.gpus.values()) == STORM_REPORTS * 64 * 256
    logged = history(collector, "node-0009")
    # The burst, and what the budget refilled while the storm lasted (longer on a loaded machine).
    budget = Limits()
    refilled = budget.events_per_node_per_second * storm_s
    assert logged.count(kinds.XID) <= budget.event_burst_per_node + refilled + 1
    assert kinds.EVENTS_SUPPRESSED in logged
    suppressed = collector.metrics.registry.get_sample_value("gpufleet_collector_events_suppressed_total")
    assert suppressed is not None and suppressed > 200_000
    assert len(collector.state.events) < 2_000
    # The database keeps the same fair share: a restart brings every node's history back.
    await collector.store.durable()
    await collector.stop()
    again = await started(tmp_path)
    try:
        for node, kinds_before in before.items():
            assert history(again, node) == kinds_before
    finally:
        await again.stop()


async def test_registrations_per_peer_are_limited_and_told_when_to_return(tmp_path: Path) -> None:
    collector = await started(tmp_path, registrations_per_peer_per_second=1, registration_burst_per_peer=5)
    try:
        codes = [(await exchange(collector, hello(index)))[1] for index in range(8)]
        assert codes[:5] == [grpc.StatusCode.OK] * 5
        assert set(codes[5:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        # Nodes it knows are never held back: a reconnect is not a registration.
        assert (await exchange(collector, hello(0), report(1)))[1] == grpc.StatusCode.OK
        rejected = collector.metrics.registry.get_sample_value(
            "gpufleet_collector_rejected_messages_total", {"reason": "registration_rate"}
        )
        assert rejected == 3
    finally:
        await collector.stop()


async def test_the_node_cap_refuses_new_nodes_only(tmp_path: Path) -> None:
    collector = await started(tmp_path, max_nodes=3)
    try:
        for index in range(3):
            assert (await exchange(collector, hello(index)))[1] == grpc.StatusCode.OK
        _, code, details = await exchange(collector, hello(3))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-nodes" in details
        assert (await exchange(collector, hello(1), report(1)))[1] == grpc.StatusCode.OK
        assert len(collector.state) == 3
    finally:
        await collector.stop()


async def test_streams_per_peer_are_capped(tmp_path: Path) -> None:
    collector = await started(tmp_path, max_streams_per_peer=2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
            connect = channel.stream_stream(
                METHOD, request_serializer=None, response_deserializer=ingest_pb2.CollectorMessage.FromString
            )
            held = [connect(), connect()]
            for index, call in enumerate(held):
                await call.write(hello(index))
                assert (await call.read()).HasField("hello_ack")
            _, code, details = await exchange(collector, hello(2))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in details
            for call in held:
                await call.done_writing()
                await call.code()
        # Once they are closed, that peer may connect again.
        assert (await exchange(collector, hello(2)))[1] == grpc.StatusCode.OK
    finally:
        await collector.stop()
