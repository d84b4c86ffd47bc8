"""A tier of collectors on one real PostgreSQL: one owner per node, handover, fencing, orphans."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.mqtt import MqttConfig
from gpufleet.collector.query import view_key
from gpufleet.collector.service import Collector
from gpufleet.collector.tier import event_id_base
from gpufleet.ports import free_port
from gpufleet.rendezvous import rank
from gpufleet.v1 import query_pb2, query_pb2_grpc
from tests.conftest import ROOT, http_get, local_config, metric, until
from tests.mqtt_broker import Broker, subscribed
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
        # Not ready, and not serving ingest: agents asking whether to move back to it stay away.
        await until(lambda: a._fenced_said, what="a telling its health")
        status, body, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{a.http_port}/readyz")
        assert status == 503 and b"membership of the tier" in body
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="gpufleet.v1.IngestService")
            )
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
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
    a, b = member(postgresql.dsn, "a"), member(postgresql.dsn, "b")
    await a.start()
    await b.start()
    await until(lambda: metric(a, "gpufleet_collector_tier_members") == 3, what="a seeing the others")
    await until(lambda: metric(b, "gpufleet_collector_tier_members") == 3, what="b seeing the others")
    await first.stop()  # its nodes are nobody's now (their agents are gone too)
    try:
        await until(lambda: len(a.state) + len(b.state) == 6, timeout=LEASE_S * 4, what="every node adopted")
        await asyncio.sleep(LEASE_S)
        assert len(a.state) + len(b.state) == 6
        assert not {n.node_id for n in a.state.nodes()} & {n.node_id for n in b.state.nodes()}
        # Each went to the collector its agent would rank first among the live ones.
        addresses = [c.tier.address for c in (a, b)]  # type: ignore[union-attr]
        for collector in (a, b):
            for node in collector.state.nodes():
                assert rank(node.node_id, addresses)[0] == collector.tier.address  # type: ignore[union-attr]
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


class Garbage:
    """A peer that answers every question with bytes that do not parse."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return b"\xff\xff\xff\xff not a protobuf"

        return grpc.unary_unary_rpc_method_handler(answer)

    async def start(self) -> str:
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"


async def test_any_collector_answers_for_the_whole_fleet_and_says_who_answered(
    postgresql: PostgresServer,
) -> None:
    tier = [member(postgresql.dsn, name) for name in ("a", "b", "c")]
    for collector in tier:
        await collector.start()
    garbage = Garbage()
    try:
        for index in range(9):
            source = SimulatedSource("H100", 8, node_index=index)
            answers, _, _ = await exchange(tier[index % 3], hello(index), report_with_xid(1, source))
            assert answers[-1].report_ack.sequence == 1
        await until(
            lambda: all(metric(c, "gpufleet_collector_tier_members") == 3 for c in tier), what="peers"
        )
        a, _, c = tier
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel:
            query = query_pb2_grpc.QueryServiceStub(channel)
            summary = await query.GetFleetSummary(query_pb2.GetFleetSummaryRequest())
            assert (summary.nodes, summary.gpus) == (9, 72)
            assert (summary.coverage.collectors, summary.coverage.answered) == (3, 3)
            # Pages merged from three collectors: every GPU once, in one order, whatever the page size.
            seen, token = [], ""
            while True:
                page = await query.ListGpus(
                    query_pb2.ListGpusRequest(sort_by="-temperature", page_size=7, page_token=token)
                )
                seen.extend(page.gpus)
                token = page.next_page_token
                if not token:
                    break
            keys = [view_key("temperature", view) for view in seen]
            assert len(set(keys)) == 72 and keys == sorted(keys, reverse=True)
            assert page.total_size == 72
            # One node, wherever it is served; its events, from the collector that serves it.
            node = await query.GetNode(query_pb2.GetNodeRequest(node="node-0004"))
            assert node.node.name == "node-0004" and len(node.gpus) == 8
            events = await query.ListEvents(
                query_pb2.ListEventsRequest(filter=query_pb2.EventFilter(kinds=["xid"]))
            )
            assert len({e.node_id for e in events.events}) == 9
            assert len({e.id for e in events.events}) == len(events.events)
            missing = query.GetNode(query_pb2.GetNodeRequest(node="nowhere"))
            with pytest.raises(grpc.aio.AioRpcError) as not_found:
                await missing
            assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
            # Following on a: an event logged on c arrives.
            follow = query.StreamEvents(query_pb2.StreamEventsRequest())
            await asyncio.sleep(0.5)
            await exchange(c, hello(20))
            event = await asyncio.wait_for(follow.read(), timeout=10)
            assert event.node_name == "node-0020" and event.kind == "node_registered"
            follow.cancel()
            # A peer that answers garbage: the answer is partial, and right for the others.
            address = await garbage.start()
            with psycopg.connect(postgresql.dsn, autocommit=True) as db:
                db.execute(
                    "INSERT INTO members (instance, collector_id, address, number, expires_at) "
                    "VALUES ('garbage/1', 'garbage', %s, 99, now() + interval '1 hour')",
                    (address,),
                )
            await until(lambda: metric(a, "gpufleet_collector_tier_members") == 4, what="a seeing the peer")
            summary = await query.GetFleetSummary(query_pb2.GetFleetSummaryRequest())
            assert (summary.nodes, summary.gpus) == (10, 80)
            assert list(summary.coverage.missing) == ["garbage"] and summary.coverage.answered == 3
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gpufleet.cli",
                "summary",
                "--collector",
                f"127.0.0.1:{a.grpc_port}",
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(cli.communicate(), timeout=30)
            assert cli.returncode == 0, err
            assert b"Tier            3   of 4 collectors answered" in out, out
            assert err.decode().strip() == (
                "warning: partial answer: 1 of 4 collectors did not answer (garbage); "
                "the nodes they serve are missing"
            )
    finally:
        await garbage.server.stop(0)
        for collector in tier:
            await collector.stop()


async def test_a_report_through_a_collector_whose_lease_was_taken_is_neither_written_nor_acknowledged(
    postgresql: PostgresServer,
) -> None:
    source = SimulatedSource("H100", 8, node_index=1)
    a, b = member(postgresql.dsn, "a"), member(postgresql.dsn, "b")
    await a.start()
    await b.start()
    try:
        answers, _, _ = await exchange(a, hello(1), report_with_xid(1, source))
        assert answers[-1].report_ack.sequence == 1
        node = a.state.find("node-0001")
        assert node is not None and b.tier is not None
        # Behind a's back, b becomes the owner (as after a's lease lapsed): a's next write must not land.
        with psycopg.connect(postgresql.dsn, autocommit=True) as db:
            db.execute(
                "UPDATE leases SET owner = %s, epoch = epoch + 1 WHERE node_id = %s",
                (b.tier.instance, node.node_id),
            )
        answers, code, _ = await exchange(a, hello(1), report_with_xid(2, source))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert not any(m.HasField("report_ack") and m.report_ack.sequence == 2 for m in answers)
        with psycopg.connect(postgresql.dsn) as db:
            written = db.execute(
                "SELECT n.last_sequence, (SELECT sum(count) FROM xid_totals x WHERE x.node_id = n.node_id) "
                "FROM nodes n WHERE n.node_id = %s",
                (node.node_id,),
            ).fetchone()
        assert written == (1, 1)
        await until(lambda: a.state.find("node-0001") is None, what="a dropping the node it lost")
    finally:
        await a.stop()
        await b.stop()


async def test_over_mqtt_each_event_is_published_once_by_the_collector_serving_its_node(
    postgresql: PostgresServer, broker: Broker
) -> None:
    def publishing(name: str) -> Collector:
        return Collector(
            local_config(
                db_url=postgresql.dsn,
                collector_id=name,
                lease_s=LEASE_S,
                mqtt=MqttConfig(host="127.0.0.1", port=broker.port),
            )
        )

    source = SimulatedSource("H100", 8, node_index=1)
    a, b = publishing("a"), publishing("b")
    await a.start()
    await b.start()
    try:
        async with subscribed(broker, "gpufleet/v1/events/#") as events:
            await exchange(a, hello(1), report_with_xid(1, source), report_with_xid(2, source))
            await events.wait_for(3)  # registered, two XIDs
            await exchange(b, hello(1))  # asked to come back: a lets the node go
            await until(lambda: a.state.find("node-0001") is None, what="a letting go")
            answers, _, _ = await exchange(b, hello(1), report_with_xid(3, source))
            assert answers[-1].report_ack.sequence == 3
            await events.wait_for(4)
            await asyncio.sleep(1)
        ids = [payload["id"] for _, payload, _ in events.messages]
        assert len(ids) == len(set(ids)), events.messages
        assert [payload["kind"] for _, payload, _ in events.messages].count("xid") == 3
        by_a = metric(a, "gpufleet_collector_mqtt_events_published_total")
        by_b = metric(b, "gpufleet_collector_mqtt_events_published_total")
        assert by_a >= 3 and by_b >= 1 and by_a + by_b == len(ids)
    finally:
        await a.stop()
        await b.stop()
