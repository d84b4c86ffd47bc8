"""Persistence: the fleet survives a restart; a corrupt or read-only database never stops the collector."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet import event_kinds as kinds
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.service import Collector, CollectorConfig
from gpufleet.collector.state import DOWN, Liveness
from gpufleet.collector.store import CommitFailed
from tests.conftest import local_config, metric
from tests.fleet import add_node


def config(db: Path, liveness: Liveness | None = None) -> CollectorConfig:
    return local_config(
        db_path=db,
        liveness=liveness or Liveness(),
        shutdown_grace_s=0.1,
    )


async def started(db: Path, liveness: Liveness | None = None) -> Collector:
    collector = Collector(config(db, liveness))
    await collector.start()
    return collector


async def test_the_fleet_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    first = await started(db, Liveness(0.001, 0.002))
    source = SimulatedSource("H100", 8, seed=0)
    source.inject(5, "hbm")
    add_node(first.state, source, 0, reports=3)
    add_node(first.state, SimulatedSource("A100", 4, seed=0, node_index=1), 1)
    await first.store.durable()
    await first.stop()
    await asyncio.sleep(0.1)  # longer than the down threshold of 0.002 intervals

    second = await started(db, Liveness(0.001, 0.002))
    try:
        node = second.state.find("node-0000")
        assert node is not None and len(second.state) == 2
        assert node.state == DOWN and node.last_seen_unix_ns > 0  # not forgotten: down, with when last seen
        assert node.last_sequence == 3
        assert node.gpus[5].xid_totals == {48: 1, 63: 1}  # counters continue where they were
        assert len(node.gpus) == 8 and node.inventory.gpus[0].name == "NVIDIA H100 80GB HBM3"
        logged = {e.kind for e in second.state.events.query(EventMatch())}
        assert {kinds.NODE_REGISTERED, kinds.XID, kinds.HEALTH_CHANGED} <= logged
        assert metric(second, "gpufleet_collector_store_up") == 1
    finally:
        await second.stop()


async def test_a_corrupt_database_is_moved_aside(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    db.write_bytes(b"this is not a database" * 100)
    collector = await started(db)
    try:
        assert metric(collector, "gpufleet_collector_store_up") == 1
        assert list(tmp_path.glob("fleet.db.corrupt-*"))
        add_node(collector.state, SimulatedSource("H100", 8), 0)
        await collector.store.durable()
    finally:
        await collector.stop()
    again = await started(db)
    try:
        assert len(again.state) == 1
    finally:
        await again.stop()


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs: it can be remounted read-only, or filled up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    assert result.returncode == 0, f"this test mounts a tmpfs and needs root: {result.stderr.decode()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


async def test_a_read_only_database_leaves_the_collector_serving_from_memory(read_only_mount: Path) -> None:
    db = read_only_mount / "fleet.db"
    first = await started(db)
    add_node(first.state, SimulatedSource("H100", 8), 0)
    await first.store.durable()
    await first.stop()
    remount(read_only_mount, "ro")
    collector = await started(db)
    try:
        assert metric(collector, "gpufleet_collector_store_up") == 0
        assert metric(collector, "gpufleet_collector_store_errors_total") == 1
        assert len(collector.state) == 1  # the fleet it holds, read back read-only
        add_node(collector.state, SimulatedSource("H100", 8, node_index=1), 1)  # still serving
        await collector.store.durable()  # returns at once: nothing can be made durable
        assert len(collector.state) == 2
        assert db.exists() and not list(read_only_mount.glob("*.corrupt-*"))  # never discarded
    finally:
        await collector.stop()


async def test_a_disk_that_fills_up_mid_run_degrades_to_memory(read_only_mount: Path) -> None:
    collector = await started(read_only_mount / "fleet.db")
    try:
        add_node(collector.state, SimulatedSource("H100", 8), 0)
        await collector.store.durable()
        with (read_only_mount / "filler").open("wb") as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 1024 * 1024)
                filler.flush()
        for index in range(1, 50):
            add_node(collector.state, SimulatedSource("H100", 8, node_index=index), index, reports=5)
        with pytest.raises(CommitFailed):  # what the failed commit held is not acknowledged
            await asyncio.wait_for(collector.store.durable(), 5)
        await asyncio.wait_for(collector.store.durable(), 5)  # then: from memory, at once
        assert metric(collector, "gpufleet_collector_store_up") == 0
        assert metric(collector, "gpufleet_collector_store_errors_total") == 1
        assert len(collector.state) == 50  # nothing else disturbed
    finally:
        await collector.stop()
