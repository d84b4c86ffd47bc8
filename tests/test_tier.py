"""A tier of collectors on one real PostgreSQL: one owner per node, handover, fencing, orphans."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.service import Collector
from gpufleet.collector.tier import event_id_base
from gpufleet.ports import free_port
from tests.conftest import ROOT, local_config, metric, until
from tests.postgres_server import PostgresServer
from tests.test_ingest import exchange, hello
from tests.test_store_postgres import report_with_xid

LEASE_S = 1.5  # renewed every 0.3 s


def member(dsn: str, name: str) -> Collector:
    return Collector(local_config(db_url=dsn, collector_id=name, lease_s=LEASE_S))


def gpu_lines(collector: Collector) -> list[bytes]:
    body = bytes(collector.exposition.everything())
    return [line for line in body.splitlines() if line.startswith(b"gpufleet_gpu_temperature_celsius{")]


async def test_a_node_has_one_owner_and_moves_with_its_watermark_counters_and_verdicts(
    postgresql: PostgresServer,
) -> None:
    source = SimulatedSource("H100", 8, node_index=1)
    a, b = member(postgresql.dsn, "a"), member(postgresql.dsn, "b")
    await a.start()
    await b.start()
    try:
        answers, _, _ = await exchange(a, hello(1), report_with_xid(1, source), report_with_xid(2, source))
        assert answers[-1].report_ack.sequence == 2
        verdict = a.state.find("node-0001").gpus[1].verdict  # type: ignore[union-attr]
        assert len(gpu_lines(a)) == 8 and gpu_lines(b) == []
        # b is asked: it tells the agent when to come back, and asks a to let the node go.
        _, code, details = await exchange(b, hello(1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "served by collector a" in details, details
        await until(lambda: a.state.find("node-0001") is None, what="a letting the node go")
        assert gpu_lines(a) == []
        answers, code, details = await exchange(
            b, hello(1), report_with_xid(2, source), report_with_xid(3, source)
        )
        assert code == grpc.StatusCode.OK, details
        assert answers[0].hello_ack.last_acked_sequence == 2  # resumes exactly after a's last ack
        assert answers[-1].report_ack.sequence == 3
        node = b.state.find("node-0001")
        assert node is not None
        assert node.gpus[1].xid_totals == {79: 3}  # 2 counted by a, the resent one dropped, 1 more
        assert node.gpus[1].verdict.health == verdict.health
        assert len(gpu_lines(b)) == 8 and gpu_lines(a) == []
        assert b'gpufleet_gpu_xid_errors_total{node="node-0001",gpu="1"' in bytes(b.exposition.everything())
        # Events keep their ids, unique across the tier: a's XID events came along.
        ids = [e.id for e in b.state.events.query(EventMatch(node_id=node.node_id), limit=1000)]
        assert len(ids) == len(set(ids)) >= 3
        # The collector's own metrics carry its name; per-GPU series never do.
        fleet = b.exposition.fleet()
        assert b'gpufleet_collector_tier_nodes{collector="b"} 1.0' in fleet
        assert b'gpufleet_fleet_gpus{collector="b",' in fleet
        assert not any(b"collector=" in line for line in gpu_lines(b))
        assert metric(b, "gpufleet_collector_tier_members") == 2
    finally:
        await a.stop()
        await b.stop()


async def test_a_collector_that_loses_the_store_stops_acknowledging_and_exporting(
    postgresql: PostgresServer,
) -> None:
    source = SimulatedSource("H100", 8, node_index=1)
    a = member(postgresql.proxy_dsn, "a")
    b = member(postgresql.dsn, "b")
    await a.start()
    await b.start()
    try:
        answers, _, _ = await exchange(a, hello(1), report_with_xid(1, source))
        assert answers[-1].report_ack.sequence == 1
        postgresql.block()
        # Within the lease, a drops the node: no series, no acknowledgement.
        await until(lambda: a.tier is not None and a.tier.fenced, timeout=LEASE_S * 3, what="a fenced")
        await until(lambda: gpu_lines(a) == [], what="a's series gone")
        answers, code, details = await exchange(a, hello(1), report_with_xid(2, source))
        assert code == grpc.StatusCode.UNAVAILABLE and not any(m.HasField("report_ack") for m in answers)
        assert metric(a, "gpufleet_collector_tier_fenced") == 1
        # b serves it: the agent's down node is adopted, then its agent's stream is taken.
        await until(lambda: b.state.find("node-0001") is not None, timeout=LEASE_S * 4, what="b adopting")
        answers, code, details = await exchange(b, hello(1), report_with_xid(2, source))
        assert code == grpc.StatusCode.OK, details
        assert answers[0].hello_ack.last_acked_sequence == 1 and answers[-1].report_ack.sequence == 2
        postgresql.unblock()
        # a comes back as a member, holding nothing; the node stays with b.
        await until(lambda: not a.tier.fenced, timeout=20, what="a back")  # type: ignore[union-attr]
        await until(lambda: metric(a, "gpufleet_collector_tier_members") == 2, what="a sees b")
        assert a.state.find("node-0001") is None and len(gpu_lines(b)) == 8
    finally:
        await a.stop()
        await b.stop()


async def test_nodes_nobody_serves_go_to_the_collector_their_agents_prefer(
    postgresql: PostgresServer,
) -> None:
    first = member(postgresql.dsn, "first")
    await first.start()
    for index in range(6):
        answers, _, _ = await exchange(first, hello(index))
        assert answers[0].HasField("hello_ack")
    await first.stop()  # its nodes are nobody's now
    a, b = member(postgresql.dsn, "a"), member(postgresql.dsn, "b")
    await a.start()
    await b.start()
    try:
        await until(lambda: len(a.state) + len(b.state) == 6, timeout=LEASE_S * 4, what="every node adopted")
        await asyncio.sleep(LEASE_S)
        assert len(a.state) + len(b.state) == 6
        assert not {n.node_id for n in a.state.nodes()} & {n.node_id for n in b.state.nodes()}
    finally:
        await a.stop()
        await b.stop()


def test_event_ids_carry_the_member_number_and_grow_with_time() -> None:
    now = 1_800_000_000 * 10**9
    assert event_id_base(1, now) != event_id_base(2, now)
    assert event_id_base(1, now) < event_id_base(0, now + 1_000_000)  # a millisecond later
    year_2090 = 3_786_912_000 * 10**9
    assert event_id_base(1023, year_2090) < 2**63  # a PostgreSQL BIGINT


def test_a_second_live_collector_with_the_same_id_is_refused_in_one_line(postgresql: PostgresServer) -> None:
    def start(*extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpufleet.collector.main",
                "--db",
                postgresql.dsn,
                "--collector-id",
                "twin",
                "--lease-seconds",
                "1",
                "--grpc-listen",
                f"127.0.0.1:{free_port()}",
                "--http-listen",
                f"127.0.0.1:{free_port()}",
                *extra,
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = start()
    try:
        assert first.stderr is not None
        for line in first.stderr:
            if "collector listening" in line:
                break
        second = start()
        _, stderr = second.communicate(timeout=30)
        assert second.returncode == 2, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "collector id 'twin' is in use" in errors[0], stderr
        assert "Traceback" not in stderr
    finally:
        first.terminate()
        first.wait(timeout=30)
