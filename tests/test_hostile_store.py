"""Nothing an agent sends stops the pipeline, and a database in trouble is never thrown away."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector import store
from gpufleet.collector.service import Collector, CollectorConfig
from gpufleet.collector.store import StoreBusy
from tests.conftest import http_get, local_config, metric
from tests.fleet import add_node
from tests.test_ingest import exchange, hello, report

HOSTILE_SEQUENCES = [2**63, 2**64 - 1]
ON_ANY_PORT = ("--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0")


def config(db: Path) -> CollectorConfig:
    return local_config(db_path=db)


@pytest.fixture
async def with_db(tmp_path: Path) -> AsyncIterator[Collector]:
    collector = Collector(config(tmp_path / "fleet.db"))
    await collector.start()
    yield collector
    await collector.stop()


async def honest_node_is_acked(collector: Collector, index: int) -> None:
    answers, code, details = await exchange(collector, hello(index), report(1), report(2))
    assert code == grpc.StatusCode.OK, details
    assert [a.report_ack.sequence for a in answers[1:]] == [1, 2]


@pytest.mark.parametrize("sequence", HOSTILE_SEQUENCES, ids=["2^63", "2^64-1"])
async def test_a_sequence_past_what_the_store_holds_is_refused_and_the_fleet_still_acked(
    with_db: Collector, sequence: int
) -> None:
    answers, code, details = await exchange(with_db, hello(0), report(sequence))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sequence" in details
    assert len(answers) == 1  # the hello, and no acknowledgement of what was not written
    assert metric(with_db, "gpufleet_collector_rejected_messages_total", reason="limit_sequence") == 1
    await honest_node_is_acked(with_db, 1)
    assert metric(with_db, "gpufleet_collector_store_up") == 1
    assert metric(with_db, "gpufleet_collector_store_errors_total") == 0
    status, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{with_db.http_port}/readyz")
    assert status == 200


async def test_any_failure_of_the_writer_is_survived_and_nothing_uncommitted_is_acked(
    with_db: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    def overflow(db: sqlite3.Connection, batch: store.Batch) -> None:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    await honest_node_is_acked(with_db, 0)
    monkeypatch.setattr(store, "_write", overflow)
    answers, code, details = await exchange(with_db, hello(1), report(1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "could not store" in details
    assert all(not a.HasField("report_ack") for a in answers)
    assert metric(with_db, "gpufleet_collector_store_up") == 0
    assert metric(with_db, "gpufleet_collector_store_errors_total") == 1
    # From memory from then on, as with a full disk: every node is served again.
    for index in range(2, 5):
        await honest_node_is_acked(with_db, index)
    assert len(with_db.state) == 5


async def test_a_stalled_writer_shows_in_readyz_and_a_metric(
    with_db: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    write = store._write

    def stuck(db: sqlite3.Connection, batch: store.Batch) -> None:
        release.wait(10)
        write(db, batch)

    monkeypatch.setattr(store, "_write", stuck)
    monkeypatch.setattr(store, "STALLED_AFTER_S", 0.3)
    add_node(with_db.state, SimulatedSource("H100", 8), 0)
    waiting = asyncio.create_task(with_db.store.durable())
    await asyncio.sleep(0.5)
    ready = f"http://127.0.0.1:{with_db.http_port}/readyz"
    status, body, _ = await asyncio.to_thread(http_get, ready)
    assert status == 503 and b"stalled" in body
    assert metric(with_db, "gpufleet_collector_store_uncommitted_seconds") >= 0.3
    release.set()
    await asyncio.wait_for(waiting, 5)
    status, _, _ = await asyncio.to_thread(http_get, ready)
    assert status == 200
    assert metric(with_db, "gpufleet_collector_store_uncommitted_seconds") == 0


@contextlib.contextmanager
def exclusively_locked(db: Path) -> Iterator[Path]:
    """``db`` held by another process with an exclusive lock, as long as the block runs."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('PRAGMA locking_mode=EXCLUSIVE'); c.execute('BEGIN EXCLUSIVE'); "
            "c.execute('CREATE TABLE IF NOT EXISTS held (x)'); print('locked', flush=True); sys.stdin.read()",
            str(db),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        yield db
    finally:
        holder.kill()
        holder.wait()


async def test_a_locked_database_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "fleet.db"
    first = Collector(config(db))
    await first.start()
    add_node(first.state, SimulatedSource("H100", 8), 0)
    await first.store.durable()
    await first.stop()
    monkeypatch.setattr(store, "LOCKED_RETRY_S", 0.1)
    with exclusively_locked(db):
        collector = Collector(config(db))
        with pytest.raises(StoreBusy, match="locked by another process"):
            await collector.start()
        assert db.exists() and not list(tmp_path.glob("fleet.db.corrupt-*"))
    again = Collector(config(db))
    await again.start()
    try:
        assert len(again.state) == 1  # everything still there once the other process let go
    finally:
        await again.stop()


def test_the_collector_refuses_to_start_on_a_locked_database_in_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "fleet.db"
    with exclusively_locked(locked):
        result = subprocess.run(
            [sys.executable, "-m", "gpufleet.collector.main", "--db", str(locked), *ON_ANY_PORT],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "locked by another process" in last
    assert "Traceback" not in result.stderr
    assert not list(locked.parent.glob("fleet.db.corrupt-*"))


async def test_a_report_is_never_acknowledged_before_it_is_committed(with_db: Collector) -> None:
    """The acknowledgement of a report is sent only once the batch holding it is in the database."""
    answers, code, _ = await exchange(with_db, hello(0), report(1))
    assert code == grpc.StatusCode.OK and answers[-1].report_ack.sequence == 1
    path = with_db.store.path
    assert path is not None
    with sqlite3.connect(path) as db:
        (sequence,) = db.execute("SELECT last_sequence FROM nodes").fetchone()
    assert sequence == 1
