"""A GPU's reliability record over real gRPC, the CLI and real processes (docs/reliability.md).

The same GPU falls off the bus in three boots of its node: it is due for RMA (an `rma_due`
event, `gpufleet rma`, `gpufleet_gpu_rma_due`), its record shows the three occurrences, and
moved to another node it keeps them. The record survives `kill -9` of the collector (SQLite)
and is read back by the next collector from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path

import grpc
import psycopg
import pytest

from gpufleet import event_kinds as kinds
from gpufleet import wire
from gpufleet.agent.sources.faults import FaultState
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.cli.client import FleetClient
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.service import Collector
from gpufleet.collector.state import FleetState, NodeRecord
from gpufleet.collector.store import SCHEMA_VERSION as STORE_SCHEMA_VERSION
from gpufleet.collector.store import open_database
from gpufleet.collector.store_postgres import MIGRATIONS, SCHEMA_VERSION
from gpufleet.ports import free_port
from gpufleet.v1 import ingest_pb2, query_pb2, query_pb2_grpc
from tests.conftest import ROOT, Processes, local_config, until
from tests.fleet import exposition_of, inventory_for
from tests.postgres_server import PostgresServer
from tests.test_exposition import samples, value
from tests.test_ingest import METHOD, exchange

FAULTY_GPU = 3
BOOTS = 3


def hello(source: SimulatedSource, index: int, boot: int) -> ingest_pb2.Hello:
    inventory = inventory_for(source, index)
    inventory.boot_id = f"boot-{boot}"
    return ingest_pb2.Hello(
        protocol_version=wire.PROTOCOL_VERSION, inventory=inventory, report_interval_ms=10_000
    )


def fall_off_the_bus(
    source: SimulatedSource, gpu: int, fault: str = "fell_off_bus", ago_s: float = 0
) -> list[ingest_pb2.Report]:
    """A boot's reports, ``ago_s`` ago: the GPU works, then fails (it works again after a reboot)."""
    source.gpus[gpu].faults = FaultState()
    healthy = source.sample(with_processes=False)
    source.inject(gpu, fault)
    failed = source.sample(with_processes=False)
    sampled = time.time_ns() - int(ago_s * 1e9)
    return [
        ingest_pb2.Report(sequence=n, time_unix_nano=sampled, gpus=gpus)
        for n, gpus in enumerate((healthy, failed), 1)
    ]


def faults_in_boots(
    state: FleetState, source: SimulatedSource, index: int, boots: range, ago_s: float = 0
) -> NodeRecord:
    """The node boots ``boots`` times (fed to the state directly); each time the GPU fails."""
    node = None
    for boot in boots:
        node = state.hello(hello(source, index, boot))
        for report in fall_off_the_bus(source, FAULTY_GPU, ago_s=ago_s):
            state.apply_report(node, report)
        state.disconnected(node)  # the node reboots
    assert node is not None
    return node


def messages(source: SimulatedSource, index: int, boot: int) -> list[bytes]:
    """One stream of a boot whose GPU fails, as an agent sends it."""
    first = ingest_pb2.AgentMessage(hello=hello(source, index, boot))
    reports = [ingest_pb2.AgentMessage(report=r) for r in fall_off_the_bus(source, FAULTY_GPU)]
    return [m.SerializeToString() for m in (first, *reports)]


def stream(target: str, sent: list[bytes]) -> list[ingest_pb2.CollectorMessage]:
    """Send raw messages on one stream to a collector process; its answers (acks)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=ingest_pb2.CollectorMessage.FromString
        )
        return list(call(iter(sent), timeout=30))


def cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gpufleet.cli", *args, "--collector", target]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


async def cli_async(collector: Collector, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI against a collector in this process (its event loop goes on serving meanwhile)."""
    return await asyncio.to_thread(cli, f"127.0.0.1:{collector.grpc_port}", *args)


def stub(collector: Collector) -> query_pb2_grpc.QueryServiceStub:
    return query_pb2_grpc.QueryServiceStub(grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}"))


async def test_a_fault_back_in_three_boots_makes_the_gpu_due_for_rma(collector: Collector) -> None:
    source = SimulatedSource("H100", 8, node_index=0)
    serial, uuid = source.gpus[FAULTY_GPU].serial, source.gpus[FAULTY_GPU].uuid
    node = faults_in_boots(collector.state, source, 0, range(1, BOOTS + 1))
    verdict = node.gpus[FAULTY_GPU].verdict
    assert (
        verdict.action == "drain node; hardware inspection and RMA"
        and f"occurrence {BOOTS} in 30 days" in verdict.reasons[-1]
    )
    logged = collector.state.events.query(EventMatch(kinds=frozenset({kinds.RMA_DUE})), 100)
    assert [(e.gpu_index, e.attributes["serial"]) for e in logged] == [(FAULTY_GPU, serial)]

    due = await stub(collector).ListRma(query_pb2.ListRmaRequest())
    assert [(r.serial, r.uuid, r.node_name, r.gpu_index) for r in due.records] == [
        (serial, uuid, "node-0000", FAULTY_GPU)
    ]
    record = due.records[0]
    assert [o.boot_id for o in record.occurrences] == ["boot-1", "boot-2", "boot-3"]
    assert record.health == query_pb2.GPU_HEALTH_LOST and record.rma_reason.startswith("fault came back")
    changes = [(v.old_health, v.new_health) for v in record.verdict_changes]
    assert changes == [("healthy", "lost"), ("lost", "healthy")] * (BOOTS - 1) + [("healthy", "lost")]
    assert record.reboots == BOOTS - 1

    listed = await cli_async(collector, "rma")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:6] == ["SERIAL", "UUID", "NODE", "GPU", "SINCE", "OCCURRENCES"]
    assert row.split()[:4] == [serial, uuid, "node-0000", str(FAULTY_GPU)]
    assert row.split()[5] == str(BOOTS) and "fault came back after 2 resets or reboots" in row
    as_csv = await cli_async(collector, "rma", "-o", "csv")
    assert as_csv.stdout.splitlines()[0].startswith("serial,uuid,model,node,node_id,gpu,health")
    shown = await cli_async(collector, "gpu", serial)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"GPU      {serial}  (NVIDIA H100 80GB HBM3)" in text
    assert f"Now      node node-0000 GPU {FAULTY_GPU}: lost" in text
    assert "RMA      due since " in text and "Fault occurrences (3, one per boot)" in text
    assert len(re.findall(r"node-0000\s+boot-\d\s+lost\s+GPU lost", text)) == BOOTS
    assert f"Verdict history ({len(changes)})" in text and "Installs (1)" in text

    parsed = samples(exposition_of(collector.state).everything())
    assert value(parsed, "gpufleet_gpu_rma_due", node="node-0000", gpu=str(FAULTY_GPU)) == 1
    assert not [s for s in parsed if s.name == "gpufleet_gpu_rma_due" and s.labels["gpu"] != str(FAULTY_GPU)]
    assert value(parsed, "gpufleet_fleet_gpus_rma_due", cluster="c1", model="NVIDIA H100 80GB HBM3") == 1


async def test_a_gpu_moved_to_another_node_keeps_its_record(collector: Collector) -> None:
    first = SimulatedSource("H100", 8, node_index=0)
    moved = first.gpus[FAULTY_GPU]
    faults_in_boots(collector.state, first, 0, range(1, BOOTS + 1))
    # A technician moves the GPU to slot 0 of another node, and puts a new one in its slot.
    first.replace_gpu(FAULTY_GPU)
    collector.state.hello(hello(first, 0, BOOTS + 1))
    second = SimulatedSource("H100", 8, node_index=1)
    second.gpus[0].serial, second.gpus[0].uuid = moved.serial, moved.uuid
    collector.state.hello(hello(second, 1, 1))

    answer = await stub(collector).GetGpuRecord(query_pb2.GetGpuRecordRequest(key=moved.uuid))
    record = answer.record
    assert (record.serial, record.node_name, record.gpu_index) == (moved.serial, "node-0001", 0)
    assert [(i.hostname, i.gpu_index) for i in record.installs] == [
        ("node-0000", FAULTY_GPU),
        ("node-0001", 0),
    ]
    assert len(record.occurrences) == BOOTS and record.rma_due

    shown = await cli_async(collector, "gpu", moved.serial, "-o", "json")
    detail = json.loads(shown.stdout)
    assert (detail["node"], detail["gpu"], detail["rma_due"]) == ("node-0001", 0, True)
    assert [i["hostname"] for i in detail["installs"]] == ["node-0000", "node-0001"]
    assert [o["boot_id"] for o in detail["occurrences"]] == ["boot-1", "boot-2", "boot-3"]

    parsed = samples(exposition_of(collector.state).everything())
    due = [(s.labels["node"], s.labels["gpu"]) for s in parsed if s.name == "gpufleet_gpu_rma_due"]
    assert due == [("node-0001", "0")]


async def test_an_unknown_gpu_is_one_line_and_exit_1(collector: Collector) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as not_found:
        await stub(collector).GetGpuRecord(query_pb2.GetGpuRecordRequest(key="nope"))
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub(collector).GetGpuRecord(query_pb2.GetGpuRecordRequest(key=" "))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    shown = await cli_async(collector, "gpu", "GPU-no-such-uuid")
    assert shown.returncode == 1 and not shown.stdout
    assert shown.stderr.count("\n") == 1
    assert "no GPU with serial or UUID 'GPU-no-such-uuid'" in shown.stderr and "gpufleet gpus" in shown.stderr
    listed = await cli_async(collector, "rma")
    assert (listed.returncode, listed.stdout) == (0, "no GPU is due for RMA\n")
    assert json.loads((await cli_async(collector, "rma", "-o", "json")).stdout) == []


async def test_a_row_remap_failure_is_due_at_once_and_the_longest_due_is_listed_first(
    collector: Collector,
) -> None:
    first = SimulatedSource("H100", 8, node_index=0)
    faults_in_boots(collector.state, first, 0, range(1, BOOTS + 1))
    second = SimulatedSource("H100", 8, node_index=1)
    node = collector.state.hello(hello(second, 1, 1))
    for report in fall_off_the_bus(second, 5, "hbm_remap_failed"):
        collector.state.apply_report(node, report)
    record = collector.state.reliability.find(second.gpus[5].serial)
    assert record is not None and record.rma_due and len(record.occurrences) == 1
    assert record.rma_reason.startswith("row remap failure flag set")
    listed = json.loads((await cli_async(collector, "rma", "-o", "json")).stdout)
    assert [(r["serial"], r["node"], r["gpu"]) for r in listed] == [
        (first.gpus[FAULTY_GPU].serial, "node-0000", FAULTY_GPU),
        (second.gpus[5].serial, "node-0001", 5),
    ]
    assert [r["occurrences"] for r in listed] == [BOOTS, 1]


def test_occurrences_older_than_30_days_do_not_count() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, node_index=0)
    faults_in_boots(state, source, 0, range(1, BOOTS), ago_s=31 * 86_400)
    node = faults_in_boots(state, source, 0, range(BOOTS, BOOTS + 1))
    record = node.gpus[FAULTY_GPU].serial_record
    assert record is not None and len(record.occurrences) == BOOTS and not record.rma_due
    assert "RMA" not in node.gpus[FAULTY_GPU].verdict.action


def test_gpus_at_risk_show_in_the_health_series_and_the_fleet_aggregate() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, node_index=0)
    source.inject_xid(2, 92)
    node = state.hello(hello(source, 0, 1))
    state.apply_report(
        node, ingest_pb2.Report(sequence=1, time_unix_nano=1, gpus=source.sample(with_processes=False))
    )
    parsed = samples(exposition_of(state).everything())
    assert value(parsed, "gpufleet_gpu_health", node="node-0000", gpu="2", state="at_risk") == 1
    assert value(parsed, "gpufleet_gpu_health", node="node-0000", gpu="1", state="at_risk") == 0
    assert (
        value(parsed, "gpufleet_fleet_gpus", cluster="c1", model="NVIDIA H100 80GB HBM3", health="at_risk")
        == 1
    )
    assert not [s for s in parsed if s.name.endswith("rma_due")]


def test_the_record_survives_kill_9_and_restart(processes: Processes) -> None:
    grpc_port, http_port = free_port(), free_port()
    collector, target, _ = processes.collector(grpc_port=grpc_port, http_port=http_port)
    source = SimulatedSource("H100", 8, node_index=0)
    serial = source.gpus[FAULTY_GPU].serial
    for boot in range(1, BOOTS + 1):
        answers = stream(target, messages(source, 0, boot))
        assert answers[-1].report_ack.sequence == 2  # acknowledged: committed with the record
    collector.send_signal(signal.SIGKILL)
    collector.wait(timeout=10)

    processes.collector(grpc_port=grpc_port, http_port=http_port)
    with FleetClient(target) as client:
        record = client.gpu_record(serial)
        assert [o.boot_id for o in record.occurrences] == ["boot-1", "boot-2", "boot-3"]
        assert record.rma_due and record.node_name == "node-0000"
        # The GPU fails again after the restart: the same record, still one rma_due event.
        stream(target, messages(source, 0, BOOTS + 1))
        assert len(client.gpu_record(record.uuid).occurrences) == BOOTS + 1
        assert len(client.events(query_pb2.EventFilter(kinds=[kinds.RMA_DUE]))) == 1
    assert cli(target, "rma").stdout.splitlines()[1].split()[0] == serial


async def test_only_changed_records_are_written(tmp_path: Path) -> None:
    path = tmp_path / "collector.db"
    collector = Collector(local_config(db_path=path))
    await collector.start()
    source = SimulatedSource("H100", 8, node_index=0)
    serial = source.gpus[FAULTY_GPU].serial

    def written() -> dict[str, int]:
        with closing(sqlite3.connect(path)) as db:
            return dict(db.execute("SELECT serial, updated_unix_nano FROM gpu_reliability"))

    try:
        answers, _, _ = await exchange(collector, *messages(source, 0, 1))
        assert answers[-1].report_ack.sequence == 2
        before = written()
        assert len(before) == 8  # every GPU's first install
        still_lost = ingest_pb2.Report(
            sequence=3, time_unix_nano=time.time_ns(), gpus=source.sample(with_processes=False)
        )
        hello_again = ingest_pb2.AgentMessage(hello=hello(source, 0, 1)).SerializeToString()
        answers, _, _ = await exchange(
            collector, hello_again, ingest_pb2.AgentMessage(report=still_lost).SerializeToString()
        )
        assert answers[-1].report_ack.sequence == 3
        assert written() == before  # the same boot's fault again: nothing of the record changed
        answers, _, _ = await exchange(collector, *messages(source, 0, 2))
        changed = {s for s, time_ns in written().items() if time_ns != before[s]}
        assert serial in changed  # a new occurrence (and every GPU's reboot count)
    finally:
        await collector.stop()


def test_a_version_3_sqlite_database_gains_the_table(tmp_path: Path) -> None:
    path = tmp_path / "collector.db"
    open_database(path).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE gpu_reliability")
        db.execute("PRAGMA user_version=3")
        db.commit()
    with closing(open_database(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (STORE_SCHEMA_VERSION,)
        assert db.execute("SELECT count(*) FROM gpu_reliability").fetchone() == (0,)


async def test_records_are_read_back_from_postgresql_with_their_nodes(postgresql: PostgresServer) -> None:
    source = SimulatedSource("H100", 8, node_index=0)
    serial = source.gpus[FAULTY_GPU].serial
    first = Collector(local_config(db_url=postgresql.dsn))
    await first.start()
    for boot in range(1, BOOTS + 1):
        answers, _, details = await exchange(first, *messages(source, 0, boot))
        assert answers[-1].report_ack.sequence == 2, details
    await first.stop()
    with psycopg.connect(postgresql.dsn) as db:
        (version,) = db.execute("SELECT version FROM gpufleet_schema").fetchone() or (0,)
        rows = db.execute("SELECT serial, uuid FROM gpu_reliability WHERE serial = %s", (serial,)).fetchall()
    assert version == SCHEMA_VERSION and rows == [(serial, source.gpus[FAULTY_GPU].uuid)]

    second = Collector(local_config(db_url=postgresql.dsn))
    await second.start()  # adopts the node nobody serves, and its GPUs' records with it
    try:
        node = second.state.find("node-0000")
        assert node is not None
        record = node.gpus[FAULTY_GPU].serial_record
        assert record is not None and record is second.state.reliability.find(serial)
        assert len(record.occurrences) == BOOTS and record.rma_due
        due = await stub(second).ListRma(query_pb2.ListRmaRequest())
        assert [r.serial for r in due.records] == [serial]
    finally:
        await second.stop()


async def test_a_version_2_database_gains_the_table(postgresql: PostgresServer) -> None:
    with psycopg.connect(postgresql.dsn, autocommit=True) as db:
        db.execute("CREATE TABLE gpufleet_schema (version INTEGER NOT NULL)")
        for version in (1, 2):
            db.execute(MIGRATIONS[version])
        db.execute("INSERT INTO gpufleet_schema VALUES (2)")
    collector = Collector(local_config(db_url=postgresql.dsn))
    await collector.start()
    await collector.stop()
    with psycopg.connect(postgresql.dsn) as db:
        assert db.execute("SELECT version FROM gpufleet_schema").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("SELECT count(*) FROM gpu_reliability").fetchone() == (0,)


@contextlib.asynccontextmanager
async def two_collectors(postgresql: PostgresServer) -> AsyncIterator[tuple[Collector, Collector]]:
    """Collectors a and b, one tier on one PostgreSQL database."""
    a = Collector(local_config(db_url=postgresql.dsn, collector_id="a", lease_s=1.5))
    b = Collector(local_config(db_url=postgresql.dsn, collector_id="b", lease_s=1.5))
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def test_any_collector_of_a_tier_answers_with_the_current_record(postgresql: PostgresServer) -> None:
    source = SimulatedSource("H100", 8, node_index=0)
    serial = source.gpus[FAULTY_GPU].serial
    async with two_collectors(postgresql) as (a, b):
        for boot in range(1, BOOTS + 1):
            answers, _, details = await exchange(a, *messages(source, 0, boot))
            assert answers[-1].report_ack.sequence == 2, details
        # The node's agent goes to b: a lets the node go (its copy of the record stays behind).
        _, code, _ = await exchange(b, messages(source, 0, BOOTS + 1)[0])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await until(lambda: a.state.find("node-0000") is None, what="a letting the node go")
        answers, code, details = await exchange(b, *messages(source, 0, BOOTS + 1))
        assert code == grpc.StatusCode.OK, details
        await until(lambda: len(b.tier.peers) == 1 and len(a.tier.peers) == 1, what="peers")  # type: ignore[union-attr]
        assert a.state.reliability.find(serial) is not None
        # Asked of a, which no longer serves the GPU's node: b's copy, the current one.
        found = await stub(a).GetGpuRecord(query_pb2.GetGpuRecordRequest(key=serial))
        assert (found.record.node_name, len(found.record.occurrences)) == ("node-0000", BOOTS + 1)
        assert (found.coverage.collectors, found.coverage.answered) == (2, 2)
        due = await stub(a).ListRma(query_pb2.ListRmaRequest())
        assert [(r.serial, len(r.occurrences)) for r in due.records] == [(serial, BOOTS + 1)]
        listed = await cli_async(a, "rma")
        assert listed.returncode == 0 and not listed.stderr
        assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [serial]
        with pytest.raises(grpc.aio.AioRpcError) as not_found:
            await stub(a).GetGpuRecord(query_pb2.GetGpuRecordRequest(key="nope"))
        assert not_found.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_gpu_moved_to_a_node_another_collector_serves_keeps_its_record(
    postgresql: PostgresServer,
) -> None:
    old_home, new_home = SimulatedSource("H100", 8, node_index=0), SimulatedSource("H100", 8, node_index=1)
    serial = old_home.gpus[FAULTY_GPU].serial
    async with two_collectors(postgresql) as (a, b):
        for boot in range(1, BOOTS):  # two occurrences on node 0, served by a
            answers, _, details = await exchange(a, *messages(old_home, 0, boot))
            assert answers[-1].report_ack.sequence == 2, details
        # A technician moves the GPU to node 1, new to the tier, whose agent b serves.
        old_home.swap_gpu(FAULTY_GPU, new_home, FAULTY_GPU)
        answers, code, details = await exchange(b, *messages(new_home, 1, 1))
        assert code == grpc.StatusCode.OK, details
        record = b.state.reliability.find(serial)
        assert record is not None
        assert [o.node_id for o in record.occurrences][:2] == [inventory_for(old_home, 0).node_id] * 2
        assert len(record.occurrences) == BOOTS and record.rma_due  # the third: due for RMA
        assert [i.node_id for i in record.installs] == [
            inventory_for(old_home, 0).node_id,
            inventory_for(new_home, 1).node_id,
        ]


@pytest.fixture
def doc() -> Iterator[str]:
    yield (ROOT / "docs" / "reliability.md").read_text()


def test_the_doc_shows_a_gpu_of_the_simulated_fleet(doc: str) -> None:
    """The doc's `gpufleet gpu` example names GPU 0 of node 0 of `gpufleet-agent --source sim`."""
    gpu = SimulatedSource("H100", 8, node_index=0).gpus[0]
    assert f"gpufleet gpu {gpu.serial}\n" in doc and f"gpufleet gpu {gpu.uuid} -o json\n" in doc
