"""The fleet map's data: every GPU as a compact row, and the changes since, for the page at `/`.

A sink like the exposition: each node's row (its identity, topology and one short array per GPU)
is rendered to JSON when the node changes and kept, so the page's first load is a join of cached
strings (`/api/fleet`), and a tick each TICK_S sends the rows of the nodes that changed since the
last tick to every open page (`/api/stream`, server-sent events), with the fleet's totals and the
events logged meanwhile. A page that falls QUEUE_TICKS ticks behind is cut off; its EventSource
reconnects and loads the fleet again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from gpufleet.collector import health
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.sinks import BatchedSink
from gpufleet.collector.state import NODE_STATE_NAMES, UP, FleetState, NodeRecord
from gpufleet.collector.totals import FleetTotals
from gpufleet.v1 import events_pb2

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "web"
TICK_S = 1.0
QUEUE_TICKS = 30
EVENTS_SHOWN = 50
# The columns of a GPU's row, in order (the page reads them by these names).
GPU_COLUMNS = ("gpu", "model", "health", "util", "sm", "temp", "power", "mem")


def _gpu_row(node: NodeRecord, index: int) -> list[Any]:
    gpu = node.gpus[index]
    sample = gpu.sample
    reachable = node.state == UP and not gpu.missing and sample is not None

    def field(name: str, scale: float = 1.0) -> float | None:
        if not reachable or sample is None or not sample.HasField(name):
            return None
        return float(round(getattr(sample, name) * scale, 3))

    memory = None
    if (
        reachable
        and sample is not None
        and sample.HasField("memory_used_bytes")
        and gpu.inventory.memory_total_bytes
    ):
        memory = round(sample.memory_used_bytes / gpu.inventory.memory_total_bytes, 3)
    return [
        index,
        gpu.model,
        health.HEALTH_NAMES[node.gpu_verdict(gpu).health],
        field("gpu_utilization_percent", 0.01),
        field("sm_active_ppm", 1e-6),
        field("gpu_temperature_celsius"),
        field("power_draw_milliwatts", 1e-3),
        memory,
    ]


def node_row(node: NodeRecord) -> dict[str, Any]:
    inventory = node.inventory
    return {
        "id": node.node_id,
        "name": node.name,
        "dc": inventory.datacenter,
        "cluster": inventory.cluster,
        "rack": inventory.rack,
        "state": NODE_STATE_NAMES[node.state],
        "gpus": [_gpu_row(node, index) for index in sorted(node.gpus)],
    }


def search_keys(node: NodeRecord) -> set[str]:
    """What the search box finds a node by: its name and id, GPU UUIDs and serials, holders."""
    keys = {node.name.lower(), node.node_id.lower()}
    for gpu in node.gpus.values():
        keys.update(value.lower() for value in (gpu.inventory.uuid, gpu.inventory.serial) if value)
    for a in node.allocations.allocations if node.allocations else ():
        keys.update(value.lower() for value in (a.namespace, a.pod, a.job, a.user) if value)
    return keys


def event_row(event: events_pb2.Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "time": event.time_unix_nano / 1e9,
        "node": event.node_name,
        "gpu": event.gpu_index if event.HasField("gpu_index") else None,
        "kind": event.kind,
        "severity": events_pb2.Severity.Name(event.severity).removeprefix("SEVERITY_").lower(),
        "reason": event.reason,
    }


class FleetMap(BatchedSink):
    """The map's rows, cached per node, and the pages following the changes."""

    name = "fleet-map"
    doing = "rendering the fleet map"

    def __init__(self, state: FleetState, totals: Callable[[], FleetTotals]) -> None:
        super().__init__()
        self._state = state
        self._totals = totals
        self._rows: dict[str, bytes] = {}
        self._changed: set[str] = set()
        self._removed: set[str] = set()
        self._events: list[dict[str, Any]] = []
        self._pages: set[asyncio.Queue[bytes]] = set()
        self._dirty = {node.node_id for node in state.nodes()}
        self._task: asyncio.Task[None] | None = None
        self.version = 0

    # -- rows ------------------------------------------------------------------------------

    def node_changed(self, node: NodeRecord) -> None:
        """Rows are rendered ahead only while a page follows; otherwise at the next first load."""
        if self._pages:
            super().node_changed(node)
        else:
            self._dirty.add(node.node_id)

    def refresh(self) -> int:
        if not self._dirty:
            return 0
        dirty, self._dirty = self._dirty, set()
        for node_id in dirty:
            node = self._state.get(node_id)
            if node is None:
                if self._rows.pop(node_id, None) is not None:
                    self._removed.add(node_id)
                    self._changed.discard(node_id)
                continue
            self._rows[node_id] = json.dumps(node_row(node), separators=(",", ":")).encode()
            self._changed.add(node_id)
            self._removed.discard(node_id)
        self.version += 1
        return len(dirty)

    def event(self, event: events_pb2.Event) -> None:
        if self._pages:
            self._events.append(event_row(event))

    def summary(self) -> dict[str, Any]:
        totals = self._totals().summary()
        return {
            "gpus": totals.gpus,
            "nodes": totals.nodes,
            "gpus_by_health": dict(totals.gpus_by_health),
            "nodes_by_state": dict(totals.nodes_by_state),
            "idle_gpus": totals.idle_gpus,
            "mean_utilization": totals.mean_utilization_ratio,
            "power_watts": round(totals.power_watts, 1),
        }

    def fleet(self) -> bytes:
        """The whole fleet for a page's first load (and after a reconnect)."""
        self.refresh()
        events = [event_row(e) for e in self._state.events.query(EventMatch(), limit=EVENTS_SHOWN)]
        head = json.dumps(
            {"version": self.version, "columns": GPU_COLUMNS, "summary": self.summary(), "events": events},
            separators=(",", ":"),
        ).encode()
        return head[:-1] + b',"nodes":[' + b",".join(self._rows.values()) + b"]}"

    def node(self, key: str) -> dict[str, Any] | None:
        """One node in detail, for the page's panel: inventory, verdicts, holders, recent events."""
        node = self._state.find(key)
        if node is None:
            return None
        gpus = []
        for index in sorted(node.gpus):
            gpu = node.gpus[index]
            verdict = node.gpu_verdict(gpu)
            gpus.append(
                {
                    "gpu": index,
                    "uuid": gpu.inventory.uuid,
                    "serial": gpu.inventory.serial,
                    "model": gpu.model,
                    "health": health.HEALTH_NAMES[verdict.health],
                    "reasons": list(verdict.reasons),
                    "action": verdict.action,
                    "holders": [
                        {
                            k: v
                            for k, v in (
                                ("namespace", a.namespace),
                                ("pod", a.pod),
                                ("job", a.job),
                                ("user", a.user),
                            )
                            if v
                        }
                        for a in node.allocations_of(index)
                    ],
                }
            )
        events = self._state.events.query(EventMatch(node_id=node.node_id), limit=20)
        inventory = node.inventory
        return {
            "id": node.node_id,
            "name": node.name,
            "state": NODE_STATE_NAMES[node.state],
            "hostname": inventory.hostname,
            "datacenter": inventory.datacenter,
            "cluster": inventory.cluster,
            "rack": inventory.rack,
            "driver": inventory.driver_version,
            "gpus": gpus,
            "events": [event_row(e) for e in reversed(events)],
        }

    def search(self, query: str, limit: int = 10_000) -> list[str]:
        """The ids of the nodes with a search key that holds ``query`` (case-insensitive)."""
        query = query.strip().lower()
        if not query:
            return []
        found = []
        for node in self._state.nodes():
            if any(query in key for key in search_keys(node)):
                found.append(node.node_id)
                if len(found) >= limit:
                    break
        return found

    # -- pages following ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick(), name="fleet-map-tick")

    async def stop(self, timeout_s: float) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for page in list(self._pages):
            page.put_nowait(b"")  # ends the page's stream

    async def follow(self) -> AsyncIterator[bytes]:
        """Server-sent events for one page: a hello, then one `tick` per TICK_S with changes."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_TICKS)
        self._pages.add(queue)
        try:
            yield f"retry: 1000\nevent: hello\ndata: {json.dumps({'version': self.version})}\n\n".encode()
            while True:
                message = await queue.get()
                if not message:
                    return
                yield message
        finally:
            self._pages.discard(queue)

    @property
    def pages(self) -> int:
        return len(self._pages)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._send()
            except Exception:
                log.exception("sending the fleet map's changes failed; again in %.0f s", TICK_S)

    def _send(self) -> None:
        if not self._pages:
            self._changed.clear()
            self._removed.clear()
            return
        self.refresh()
        changed, self._changed = self._changed, set()
        removed, self._removed = self._removed, set()
        events, self._events = self._events, []
        head = json.dumps(
            {
                "version": self.version,
                "summary": self.summary(),
                "removed": sorted(removed),
                "events": events,
            },
            separators=(",", ":"),
        ).encode()
        rows = b",".join(self._rows[node_id] for node_id in changed if node_id in self._rows)
        message = b"event: tick\ndata: " + head[:-1] + b',"nodes":[' + rows + b"]}\n\n"
        for page in list(self._pages):
            try:
                page.put_nowait(message)
            except asyncio.QueueFull:  # fell behind: cut off; it reconnects and loads the fleet
                self._pages.discard(page)
                with contextlib.suppress(asyncio.QueueEmpty):
                    page.get_nowait()
                page.put_nowait(b"")
