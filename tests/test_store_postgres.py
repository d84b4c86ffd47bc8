"""The fleet's state in a real PostgreSQL (started by the test): restored after kill -9, refused clearly."""

from __future__ import annotations

import signal
import subprocess
import sys

import psycopg
import pytest

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.service import Collector
from gpufleet.collector.store_postgres import SCHEMA_VERSION, redacted
from gpufleet.ports import free_port
from gpufleet.v1 import ingest_pb2
from tests.conftest import ROOT, Processes, local_config, metric, until, wait_until
from tests.postgres_server import PostgresServer
from tests.test_durable_verdicts import FAULTY, PATIENT, event_ids, verdicts
from tests.test_ingest import exchange, hello

NODES = 4


def report_with_xid(sequence: int, source: SimulatedSource) -> bytes:
    source.inject_xid(1, 79)
    report = ingest_pb2.Report(sequence=sequence, time_unix_nano=1, gpus=source.sample(with_processes=False))
    return ingest_pb2.AgentMessage(report=report).SerializeToString()


async def test_what_was_acknowledged_is_restored_by_the_next_collector(postgresql: PostgresServer) -> None:
    source = SimulatedSource("H100", 8, node_index=1)
    first = Collector(local_config(db_url=postgresql.dsn))
    await first.start()
    answers, _, details = await exchange(
        first, hello(1), report_with_xid(1, source), report_with_xid(2, source)
    )
    assert answers[-1].report_ack.sequence == 2, details
    before = first.state.find("node-0001")
    assert before is not None
    events = [e.id for e in first.state.events.query(EventMatch(), limit=1000)]
    await first.stop()

    second = Collector(local_config(db_url=postgresql.dsn))
    await second.start()
    try:
        node = second.state.find("node-0001")
        assert node is not None
        assert node.last_sequence == 2
        assert node.gpus[1].xid_totals == {79: 2}
        assert node.gpus[1].verdict == before.gpus[1].verdict
        assert [e.id for e in second.state.events.query(EventMatch(), limit=1000)] == events
        # The watermark holds: a resent report is a duplicate, the next one is taken in.
        answers, _, _ = await exchange(second, hello(1), report_with_xid(3, source))
        assert answers[0].hello_ack.last_acked_sequence == 2
        assert answers[-1].report_ack.sequence == 3
    finally:
        await second.stop()


async def test_a_lost_database_is_connected_again_and_told_what_it_missed(postgresql: PostgresServer) -> None:
    source = SimulatedSource("H100", 8, node_index=1)
    collector = Collector(local_config(db_url=postgresql.proxy_dsn))
    await collector.start()
    try:
        answers, _, _ = await exchange(collector, hello(1), report_with_xid(1, source))
        assert answers[-1].report_ack.sequence == 1
        postgresql.block(refuse=True)
        # The write fails: the store is down, the collector goes on from memory.
        await exchange(collector, hello(1), report_with_xid(2, source))
        await until(lambda: metric(collector, "gpufleet_collector_store_up") == 0, what="the store down")
        await exchange(collector, hello(1), report_with_xid(3, source), report_with_xid(4, source))
        postgresql.unblock()
        await until(lambda: metric(collector, "gpufleet_collector_store_up") == 1, timeout=20, what="back up")
        node = collector.state.find("node-0001")
        assert node is not None
        totals = dict(node.gpus[1].xid_totals)
        events = [e.id for e in collector.state.events.query(EventMatch(), limit=1000)]
        sequence = node.last_sequence
        await collector.store.durable()
    finally:
        await collector.stop()
    again = Collector(local_config(db_url=postgresql.dsn))
    await again.start()
    try:
        node = again.state.find("node-0001")
        assert node is not None
        assert node.gpus[1].xid_totals == totals and node.last_sequence == sequence
        assert [e.id for e in again.state.events.query(EventMatch(), limit=1000)] == events
    finally:
        await again.stop()


def test_verdicts_and_events_survive_kill_9_with_postgresql(
    processes: Processes, postgresql: PostgresServer
) -> None:
    grpc_port, http_port = free_port(), free_port()
    settings = ("--db", postgresql.dsn, "--lease-seconds", "3", *PATIENT)
    collector, target, _ = processes.collector(*settings, grpc_port=grpc_port, http_port=http_port)
    agent = processes.sim_fleet("--nodes", str(NODES), "--interval", "0.5", "--collector", target, *FAULTY)
    wait_until(
        lambda: sum(health == "unhealthy" for health, _, _ in verdicts(target).values()) >= 2,
        timeout=60,
        what="GPUs made unhealthy by XIDs",
    )
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=30) == 0
    before, events = verdicts(target), event_ids(target)
    collector.send_signal(signal.SIGKILL)
    collector.wait(timeout=10)
    processes.collector(*settings, grpc_port=grpc_port, http_port=http_port)
    assert verdicts(target) == before
    assert event_ids(target) == events
    assert postgresql.password not in "".join(processes.log(p) for p in processes.started)


def start_collector(db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gpufleet.collector.main",
            "--db",
            db,
            "--grpc-listen",
            f"127.0.0.1:{free_port()}",
            "--http-listen",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_newer_schema_is_refused_at_start(postgresql: PostgresServer) -> None:
    with psycopg.connect(postgresql.dsn, autocommit=True) as db:
        db.execute("CREATE TABLE gpufleet_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO gpufleet_schema VALUES (%s)", (SCHEMA_VERSION + 1,))
    line = one_line(start_collector(postgresql.dsn))
    assert f"version {SCHEMA_VERSION + 1}, newer than this collector's ({SCHEMA_VERSION})" in line


@pytest.mark.parametrize("problem", ["password", "unreachable"])
def test_a_database_that_cannot_be_used_at_start_is_one_line_and_exit_2(
    postgresql: PostgresServer, problem: str
) -> None:
    if problem == "password":
        url = postgresql.dsn.replace(f":{postgresql.password}@", ":wrong@")
    else:
        url = postgresql.dsn.replace(f":{postgresql.port}/", f":{free_port()}/")
    line = one_line(start_collector(url))
    assert "cannot connect to PostgreSQL" in line
    assert "wrong" not in line and postgresql.password not in line  # no password in the log
    assert ("password authentication failed" in line) == (problem == "password")


def test_urls_are_logged_without_their_password() -> None:
    assert redacted("postgresql://gpufleet:s3cret@db:5432/fleet") == "postgresql://gpufleet:***@db:5432/fleet"
    assert redacted("postgresql://db/fleet") == "postgresql://db/fleet"
