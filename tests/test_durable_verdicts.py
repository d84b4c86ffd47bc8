"""A verdict holds until the node reboots: through kill -9 and a restart of the collector too.

Real processes: Mosquitto, the collector (with its database) and a simulated fleet that
fails fast. After the collector is killed and started again, every GPU has the verdict,
reasons and action it had, no `health_changed` event is logged, and the retained MQTT
state of every node is what it was.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from gpufleet import event_kinds as kinds
from gpufleet.cli.client import FleetClient, gpu_row
from gpufleet.ports import free_port
from gpufleet.v1 import query_pb2
from tests.conftest import Processes, wait_until
from tests.mqtt_broker import Broker, subscribed

NODES = 6
FAULTY = ("--faults", "healthy", "--fault-rate-multiplier", "3e7")
# Nodes stay up (not stale) for the whole test, so their GPUs show their own verdicts.
PATIENT = ("--stale-after-intervals", "500", "--down-after-intervals", "1000")


def verdicts(target: str) -> dict[tuple[str, int], tuple[str, tuple[str, ...], str]]:
    with FleetClient(target) as client:
        rows = [gpu_row(view) for view in client.gpus(query_pb2.ListGpusRequest())]
    return {(row["node"], row["gpu"]): (row["health"], tuple(row["reasons"]), row["action"]) for row in rows}


def event_ids(target: str, *kinds: str) -> list[int]:
    with FleetClient(target) as client:
        return [event.id for event in client.events(query_pb2.EventFilter(kinds=kinds))]


async def retained_state(broker: Broker) -> dict[str, Any]:
    async with subscribed(broker, "gpufleet/v1/state/#") as state:
        await state.wait_for(NODES)
        await asyncio.sleep(0.3)
    return {topic: payload for topic, payload, retained in state.messages if retained}


def test_verdicts_survive_kill_9_and_restart(processes: Processes, broker: Broker) -> None:
    grpc_port, http_port = free_port(), free_port()
    mqtt = ("--mqtt-broker", f"127.0.0.1:{broker.port}", *PATIENT)
    collector, target, _ = processes.collector(*mqtt, grpc_port=grpc_port, http_port=http_port)
    agent = processes.sim_fleet(
        "--nodes",
        str(NODES),
        "--interval",
        "0.5",
        "--collector",
        target,
        *FAULTY,
    )
    wait_until(
        lambda: sum(health == "unhealthy" for health, _, _ in verdicts(target).values()) >= 3,
        timeout=60,
        what="GPUs made unhealthy by XIDs",
    )
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=30) == 0
    before = verdicts(target)
    retained_before = asyncio.run(retained_state(broker))
    assert len(retained_before) == NODES
    assert any("since boot" in reason for _, reasons, _ in before.values() for reason in reasons)

    last_event = max(event_ids(target))

    collector.send_signal(signal.SIGKILL)
    collector.wait(timeout=10)
    processes.collector(*mqtt, grpc_port=grpc_port, http_port=http_port)

    assert verdicts(target) == before
    assert [id_ for id_ in event_ids(target, kinds.HEALTH_CHANGED) if id_ > last_event] == []
    assert asyncio.run(retained_state(broker)) == retained_before
