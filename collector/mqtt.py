"""Fleet events to an MQTT broker (aiomqtt), QoS 1, with retained per-node state.

Topics (prefix `gpufleet/v1` by default):
  <prefix>/events/<datacenter>/<cluster>/<node>/<kind>   every event, JSON, QoS 1
  <prefix>/state/<datacenter>/<cluster>/<node>           retained: the node's state and GPU health

MQTT is optional and never holds the collector up. Events wait in a bounded queue
while the broker is away and go out, in order, once it is back. How far publishing
got is kept in the collector's database, so events logged while the broker was
away are still published after a collector restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from gpufleet import event_kinds as kinds
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.selfmetrics import CollectorMetrics
from gpufleet.collector.sinks import Sink
from gpufleet.collector.state import NODE_STATE_NAMES, FleetState, NodeRecord
from gpufleet.collector.store import Store
from gpufleet.event_kinds import event_row

log = logging.getLogger(__name__)

PUBLISHED_KEY = "mqtt_published_event_id"
# Event kinds after which a node's retained state is published again.
STATE_KINDS = frozenset(
    {
        kinds.HEALTH_CHANGED,
        kinds.NODE_STATE_CHANGED,
        kinds.NODE_REGISTERED,
        kinds.GPU_ADDED,
        kinds.GPU_REMOVED,
        kinds.GPU_REPLACED,
    }
)
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    topic_prefix: str = "gpufleet/v1"
    queue_limit: int = 100_000
    client_id: str | None = None


def topic_level(value: str) -> str:
    """A value usable as one topic level: no separators or wildcards, never empty."""
    cleaned = value.replace("/", "_").replace("+", "_").replace("#", "_").replace("\0", "")
    return cleaned or "_"


def node_state_payload(node: NodeRecord) -> dict[str, Any]:
    return {
        "node": node.name,
        "node_id": node.node_id,
        "datacenter": node.inventory.datacenter,
        "cluster": node.inventory.cluster,
        "state": NODE_STATE_NAMES[node.state],
        "last_seen_unix": node.last_seen_unix_ns / 1e9,
        "gpus": [
            {
                "gpu": index,
                "uuid": gpu.inventory.uuid,
                "health": verdict.name,
                "reasons": list(verdict.reasons),
                "action": verdict.action,
            }
            for index, gpu in sorted(node.gpus.items())
            for verdict in (node.gpu_verdict(gpu),)
        ],
    }


class MqttPublisher(Sink):
    name = "mqtt"

    def __init__(
        self, config: MqttConfig, state: FleetState, metrics: CollectorMetrics, store: Store
    ) -> None:
        self.config = config
        self._state = state
        self._metrics = metrics
        self._store = store
        self._queue: deque[Any] = deque()
        self._dirty_nodes: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        # In a tier, each collector's status is its own topic (set before start).
        self.collector_id = ""

    # -- the queue (on the event loop) ---------------------------------------------------------

    def start(self) -> None:
        published = self._store.get_meta(PUBLISHED_KEY)
        backlog = self._state.events.query(EventMatch(after_id=published), limit=self.config.queue_limit)
        if backlog:
            log.info("MQTT: %d events logged but not yet published will go out first", len(backlog))
        for event in backlog:
            self._enqueue(event)
        self._started = True
        self._task = asyncio.create_task(self._run(), name="mqtt-publisher")

    def event(self, event: Any) -> None:
        if self._started:
            self._enqueue(event)

    def _enqueue(self, event: Any) -> None:
        if len(self._queue) >= self.config.queue_limit:
            self._queue.popleft()
            self._metrics.mqtt_dropped.inc()
        self._queue.append(event)
        if event.kind in STATE_KINDS:
            self._dirty_nodes[event.node_id] = None
        self._metrics.mqtt_queued.set(len(self._queue))
        self._wake.set()

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop publishing; a broker that does not answer holds the shutdown up for seconds at most."""
        self._started = False
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=min(timeout_s, STOP_TIMEOUT_S))
            if not done:
                log.warning("MQTT: the broker connection did not close in %.0f s; leaving it", STOP_TIMEOUT_S)

    # -- publishing ------------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        config = self.config
        tls_context = None
        if config.tls:
            tls_context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        return aiomqtt.Client(
            config.host,
            config.port,
            username=config.username,
            password=config.password,
            identifier=config.client_id,
            tls_context=tls_context,
            timeout=10,
            will=aiomqtt.Will(self._status_topic(), "offline", qos=1, retain=True),
        )

    def _status_topic(self) -> str:
        if self.collector_id:
            return f"{self.config.topic_prefix}/collector/{topic_level(self.collector_id)}/status"
        return f"{self.config.topic_prefix}/collector/status"

    async def _run(self) -> None:
        attempt = 0
        last_error = ""
        rng = random.Random()
        while True:
            try:
                async with self._client() as client:
                    log.info("MQTT: connected to %s:%d", self.config.host, self.config.port)
                    self._metrics.mqtt_connected.set(1)
                    last_error, attempt = "", 0
                    await self._connected(client)
            except aiomqtt.MqttError as exc:
                error = _explain(exc, self.config)
                if error != last_error:
                    log.warning("MQTT: %s; %d events queued, retrying with backoff", error, len(self._queue))
                    last_error = error
                self._metrics.mqtt_errors.inc()
            except (OSError, ValueError) as exc:
                # Bad settings (a TLS CA file that cannot be read, say) must not end publishing silently.
                log.error("MQTT: %s; retrying with backoff", exc)
                self._metrics.mqtt_errors.inc()
            finally:
                self._metrics.mqtt_connected.set(0)
            await asyncio.sleep(rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)))
            attempt += 1

    async def _connected(self, client: aiomqtt.Client) -> None:
        """Publish until the connection breaks (or the publisher is stopped)."""
        await client.publish(self._status_topic(), "online", qos=1, retain=True)
        # Subscribed to something, the client's message iterator ends when the connection
        # does: that is how a broker lost while there is nothing to publish is noticed.
        await client.subscribe(self._status_topic(), qos=0)
        watcher = asyncio.create_task(_until_disconnected(client), name="mqtt-connection-watch")
        try:
            await self._publish_forever(client, watcher)
        except asyncio.CancelledError:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await asyncio.wait_for(client.publish(self._status_topic(), "offline", qos=1, retain=True), 2)
            raise
        finally:
            watcher.cancel()

    async def _publish_forever(self, client: aiomqtt.Client, watcher: asyncio.Task[None]) -> None:
        prefix = self.config.topic_prefix
        while True:
            while self._queue:
                event = self._queue[0]
                topic = "/".join(
                    (
                        prefix,
                        "events",
                        topic_level(event.datacenter),
                        topic_level(event.cluster),
                        topic_level(event.node_name),
                        topic_level(event.kind),
                    )
                )
                await client.publish(topic, json.dumps(event_row(event)), qos=1)
                self._queue.popleft()
                self._metrics.mqtt_published.inc()
                self._metrics.mqtt_queued.set(len(self._queue))
                self._store.set_meta(PUBLISHED_KEY, event.id)
            while self._dirty_nodes and not self._queue:
                node_id = next(iter(self._dirty_nodes))
                node = self._state.get(node_id)
                if node is not None:
                    inventory = node.inventory
                    topic = "/".join(
                        (
                            prefix,
                            "state",
                            topic_level(inventory.datacenter),
                            topic_level(inventory.cluster),
                            topic_level(node.name),
                        )
                    )
                    await client.publish(topic, json.dumps(node_state_payload(node)), qos=1, retain=True)
                self._dirty_nodes.pop(node_id, None)
            self._wake.clear()
            if self._queue or self._dirty_nodes:
                continue
            waiting = asyncio.create_task(self._wake.wait(), name="mqtt-wake")
            try:
                await asyncio.wait((waiting, watcher), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
            if watcher.done():
                watcher.result()  # raises the broken connection's MqttError
                raise aiomqtt.MqttError("connection closed")


async def _until_disconnected(client: aiomqtt.Client) -> None:
    async for _ in client.messages:
        pass


def _explain(exc: aiomqtt.MqttError, config: MqttConfig) -> str:
    where = f"broker {config.host}:{config.port}"
    text = str(exc)
    if "authoriz" in text.lower() or "credentials" in text.lower() or "code:5]" in text or "code:4]" in text:
        return f"{where} refused the credentials ({text}): check --mqtt-username and --mqtt-password-file"
    return f"cannot reach {where} ({text})"
