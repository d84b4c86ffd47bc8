"""Events over MQTT with a real Mosquitto: topics, retained state, broker outages, bad brokers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.mqtt import MqttConfig
from gpufleet.collector.service import Collector, CollectorConfig
from tests.conftest import http_get, local_config, metric, until
from tests.fleet import add_node
from tests.mqtt_broker import Broker, subscribed


def collector_config(
    broker: Broker, tmp_path: Path, username: str | None = None, password: str | None = None
) -> CollectorConfig:
    return local_config(
        db_path=tmp_path / "collector.db",
        mqtt=MqttConfig(host="127.0.0.1", port=broker.port, username=username, password=password),
    )


@pytest.fixture
async def publishing(broker: Broker, tmp_path: Path) -> AsyncIterator[Collector]:
    collector = Collector(collector_config(broker, tmp_path))
    await collector.start()
    yield collector
    await collector.stop()


async def test_events_and_retained_node_state(broker: Broker, publishing: Collector) -> None:
    async with subscribed(broker, "gpufleet/v1/events/#") as events:
        source = SimulatedSource("H100", 8, seed=0)
        source.inject(4, "fell_off_bus")
        add_node(publishing.state, source, 0)  # registered, XID 79, GPU 4 lost
        await events.wait_for(3)
    topics = [topic for topic, _, _ in events.messages]
    assert topics[:3] == [
        "gpufleet/v1/events/dc1/c1/node-0000/node_registered",
        "gpufleet/v1/events/dc1/c1/node-0000/xid",
        "gpufleet/v1/events/dc1/c1/node-0000/health_changed",
    ]
    xid = events.messages[1][1]
    assert (xid["gpu"], xid["attributes"]["xid"], xid["severity"], xid["action"]) == (
        4,
        "79",
        "critical",
        "reboot node",
    )
    await until(lambda: metric(publishing, "gpufleet_collector_mqtt_events_queued") == 0)
    await asyncio.sleep(0.3)  # the retained state goes out after the events
    async with subscribed(broker, "gpufleet/v1/state/#") as late:  # a new subscriber sees the state at once
        await late.wait_for(1)
    topic, state, retained = late.messages[0]
    assert topic == "gpufleet/v1/state/dc1/c1/node-0000" and retained
    assert state["state"] == "up" and state["gpus"][4]["health"] == "lost"
    assert metric(publishing, "gpufleet_collector_mqtt_events_published_total") >= 3


async def test_events_published_while_the_broker_is_down_arrive_in_order(
    broker: Broker, publishing: Collector
) -> None:
    sources = [SimulatedSource("H100", 8, seed=0, node_index=i) for i in range(3)]
    for index, source in enumerate(sources):
        add_node(publishing.state, source, index)
    await until(lambda: metric(publishing, "gpufleet_collector_mqtt_events_queued") == 0)
    broker.kill()
    await until(lambda: metric(publishing, "gpufleet_collector_mqtt_connected") == 0)
    for round_ in range(5):
        for index, source in enumerate(sources):
            source.inject(round_ % 8, "application")
            add_node(publishing.state, source, index)
    assert metric(publishing, "gpufleet_collector_mqtt_events_queued") == 15
    broker.start()
    async with subscribed(broker, "gpufleet/v1/events/+/+/+/xid") as events:
        await events.wait_for(15, timeout=40)  # reconnect backoff included
    ids_by_node: dict[str, list[int]] = defaultdict(list)
    for _, event, _ in events.messages:
        ids_by_node[event["node"]].append(event["id"])
    assert len(ids_by_node) == 3
    assert all(ids == sorted(ids) and len(ids) == 5 for ids in ids_by_node.values())


async def test_broker_unreachable_at_start_then_events_flow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker(tmp_path)  # not started yet
    collector = Collector(collector_config(broker, tmp_path))
    caplog.set_level(logging.WARNING, logger="gpufleet.collector.mqtt")
    await collector.start()
    try:
        add_node(collector.state, SimulatedSource("H100", 8), 0)
        await until(lambda: metric(collector, "gpufleet_collector_mqtt_errors_total") >= 1)
        assert f"cannot reach broker 127.0.0.1:{broker.port}" in caplog.text
        status, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{collector.http_port}/metrics")
        # still serving
        assert status == 200
        broker.start()
        await until(
            lambda: metric(collector, "gpufleet_collector_mqtt_events_published_total") >= 1, timeout=40
        )
    finally:
        await collector.stop()
        broker.kill()


async def test_wrong_credentials_are_said_clearly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker(tmp_path, users={"gpufleet": "right"})
    broker.start()
    caplog.set_level(logging.WARNING, logger="gpufleet.collector.mqtt")
    collector = Collector(collector_config(broker, tmp_path, username="gpufleet", password="wrong"))
    await collector.start()
    try:
        await until(lambda: metric(collector, "gpufleet_collector_mqtt_errors_total") >= 1)
        assert "refused the credentials" in caplog.text and "wrong" not in caplog.text
        add_node(collector.state, SimulatedSource("H100", 8), 0)
        assert metric(collector, "gpufleet_collector_mqtt_connected") == 0
        assert len(collector.state) == 1
    finally:
        await collector.stop()
        broker.kill()


async def test_a_subscriber_that_never_reads_does_not_hold_anyone_up(
    broker: Broker, publishing: Collector
) -> None:
    # A raw client: CONNECT (MQTT 3.1.1, client id "stuck"), SUBSCRIBE to "#" at QoS 1, then never reads.
    stuck = socket.create_connection(("127.0.0.1", broker.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(bytes([0x10, 17, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 5]) + b"stuck")
    stuck.sendall(bytes([0x82, 6, 0, 1, 0, 1]) + b"#" + bytes([1]))
    try:
        async with subscribed(broker, "gpufleet/v1/events/#") as reader:
            for index in range(200):
                add_node(publishing.state, SimulatedSource("H100", 8, node_index=index), index)
            await reader.wait_for(200, timeout=30)
        await until(lambda: metric(publishing, "gpufleet_collector_mqtt_events_queued") == 0)
    finally:
        stuck.close()


async def test_events_logged_while_the_broker_was_away_survive_a_collector_restart(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    collector = Collector(collector_config(broker, tmp_path))
    await collector.start()
    add_node(collector.state, SimulatedSource("H100", 8), 0)
    await collector.store.durable()
    await collector.stop()
    broker.start()
    try:
        async with subscribed(broker, "gpufleet/v1/events/#") as events:
            restarted = Collector(collector_config(broker, tmp_path))
            await restarted.start()
            try:
                await events.wait_for(1, timeout=30)
                assert events.messages[0][1]["kind"] == "node_registered"
            finally:
                await restarted.stop()
    finally:
        broker.kill()
