"""Inventory history and liveness: GPUs added, removed, replaced; driver upgrades; reboots."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from gpufleet import event_kinds as kinds
from gpufleet import wire
from gpufleet.agent.node import Delivery, NodeAgent, NodeIdentity, Schedule
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector import health
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.service import Collector
from gpufleet.collector.state import DOWN, FleetState
from gpufleet.v1 import ingest_pb2
from tests.conftest import ROOT, Processes, local_config, until
from tests.fleet import add_node, inventory_for


def history(state: FleetState) -> list[str]:
    return [e.kind for e in state.events.query(EventMatch(kinds=frozenset(kinds.INVENTORY_KINDS)))]


def test_replaced_removed_gpus_and_driver_upgrades_are_recorded() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, seed=0)
    node = add_node(state, source, 0)
    old_serial = node.gpus[3].inventory.serial
    source.replace_gpu(3)
    source.remove_gpu(7)
    inventory = inventory_for(source, 0)
    inventory.driver_version = "570.86.10"
    state.apply_report(
        node, ingest_pb2.Report(sequence=2, inventory=inventory, gpus=source.sample(with_processes=False))
    )
    assert history(state) == [
        kinds.NODE_REGISTERED,
        kinds.DRIVER_UPGRADED,
        kinds.GPU_REPLACED,
        kinds.GPU_REMOVED,
    ]
    replaced = state.events.query(EventMatch(kinds=frozenset({kinds.GPU_REPLACED})))[0]
    assert replaced.gpu_index == 3 and replaced.attributes["old_serial"] == old_serial
    assert node.gpus[3].inventory.serial != old_serial
    # A GPU gone from a live node is lost; it is not silently removed.
    assert 7 in node.gpus and node.gpu_verdict(node.gpus[7]).health == health.LOST
    assert node.gpu_verdict(node.gpus[0]).health == health.HEALTHY


def test_a_reboot_is_an_event_and_restarts_the_sequence() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, seed=0)
    node = add_node(state, source, 0, reports=4)
    inventory = inventory_for(source, 0)
    inventory.boot_id = "boot-2"
    state.disconnected(node)
    state.hello(ingest_pb2.Hello(protocol_version=wire.PROTOCOL_VERSION, inventory=inventory))
    assert node.last_sequence == 0
    assert history(state)[-1] == kinds.NODE_REBOOTED


def test_a_lost_gpu_differs_from_a_silent_node() -> None:
    now = [0.0]
    state = FleetState(clock=lambda: now[0])
    source = SimulatedSource("H100", 8, seed=0)
    source.inject(1, "fell_off_bus")
    live = add_node(state, source, 0)
    silent = add_node(state, SimulatedSource("H100", 8, seed=0, node_index=1), 1)
    now[0] = 150.0  # fifteen report intervals
    add_node(state, source, 0)  # still reporting
    state.sweep()
    assert live.gpu_verdict(live.gpus[1]).health == health.LOST
    assert live.gpu_verdict(live.gpus[0]).health == health.HEALTHY
    assert silent.state == DOWN and silent.gpu_verdict(silent.gpus[1]).health == health.UNREACHABLE


async def test_the_agent_notices_a_replaced_gpu_and_tells_the_collector(collector: Collector) -> None:
    source = SimulatedSource("H100", 8, seed=0)
    identity = NodeIdentity("node-id-0", "host-0", "boot-0")
    agent = NodeAgent(
        source,
        identity,
        [f"127.0.0.1:{collector.grpc_port}"],
        Schedule(interval_s=0.05, inventory_interval_s=0.2),
        blocking_source=False,
        delivery=Delivery(keepalive_s=5),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(
            lambda: agent.uplink is not None and agent.uplink.connected.is_set(),
            what="the agent",
        )
        source.replace_gpu(5)
        await until(lambda: kinds.GPU_REPLACED in history(collector.state), what="the replacement")
    finally:
        stop.set()
        await task


async def test_gpufleet_history_shows_a_nodes_changes(tmp_path: Path, processes: Processes) -> None:
    db = tmp_path / "collector.db"
    prepared = Collector(local_config(db_path=db))
    await prepared.start()
    source = SimulatedSource("A100", 8, seed=0)
    node = add_node(prepared.state, source, 0)
    source.replace_gpu(2)
    state_inventory = inventory_for(source, 0)
    prepared.state.apply_report(node, ingest_pb2.Report(sequence=2, inventory=state_inventory))
    await prepared.store.durable()
    await prepared.stop()

    _, target, _ = processes.collector("--db", str(db))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gpufleet.cli", "history", "node-0000", "--collector", target],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TIME", "SEVERITY", "GPU", "KIND", "REASON"]
    assert "node_registered" in lines[1] and "gpu_replaced" in lines[2] and "GPU 2 replaced" in lines[2]
