"""Sinks: everything that reads the fleet's state as it changes, behind one small protocol.

The store, the exposition, the dcgm view, the MQTT publisher and the event followers each
implement what they need of `Sink` (the rest are no-ops), and the collector registers every one
of them in one place (`collector/service.py`). The fleet's state tells its `Sinks` of each change;
a sink that raises is logged once per sink and kind, counted, and never stops the others or the
ingest path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpufleet.collector.state import NodeRecord
    from gpufleet.v1 import events_pb2

log = logging.getLogger(__name__)


# What a sink is told of, as it happens.
TOLD = ("node_changed", "node_removed", "event")


class Sink:
    """Reads the fleet as it changes. Subclasses override what they need."""

    name = "sink"

    def node_changed(self, node: NodeRecord) -> None:
        """A node was registered, reported, changed state or was read back at start."""

    def node_removed(self, node: NodeRecord) -> None:
        """A node was forgotten: it is no longer in the fleet."""

    def event(self, event: events_pb2.Event) -> None:
        """An event was logged."""

    def start(self) -> None:
        """Start background work (called on the running event loop)."""

    async def stop(self, timeout_s: float) -> None:
        """Finish within ``timeout_s`` seconds."""


class BatchedSink(Sink):
    """A sink that redoes the nodes that changed in batches, REFRESH_DELAY_S after the first change.

    Readers call ``refresh()`` first, so they never see less than what changed; without an event
    loop (unit tests) nothing is scheduled and the next read does the work.
    """

    REFRESH_DELAY_S = 0.05
    # What a failed scheduled refresh was doing, for its log line.
    doing = "refreshing"

    def __init__(self) -> None:
        self._dirty: set[str] = set()
        self._refresh_scheduled = False

    def node_changed(self, node: NodeRecord) -> None:
        self._dirty.add(node.node_id)
        if not self._refresh_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop: done at the next read
                return
            self._refresh_scheduled = True
            loop.call_later(self.REFRESH_DELAY_S, self._scheduled_refresh)

    def node_removed(self, node: NodeRecord) -> None:
        self.node_changed(node)

    def _scheduled_refresh(self) -> None:
        self._refresh_scheduled = False
        try:
            self.refresh()
        except Exception:
            log.exception("%s failed; retrying with the next change", self.doing)

    def refresh(self) -> object:
        """Take in the nodes that changed since the last refresh."""
        raise NotImplementedError


class Sinks(Sink):
    """The registered sinks, told in registration order, stopped in the reverse order."""

    name = "sinks"

    def __init__(self, on_error: Callable[[str], None] | None = None) -> None:
        self._sinks: list[Sink] = []
        # Per kind of change, the sinks that act on it and their bound methods: node_changed
        # runs on every report, so sinks that leave a method as Sink's no-op are not called.
        self._told: dict[str, list[tuple[Sink, Callable[[object], None]]]] = {what: [] for what in TOLD}
        self.on_error = on_error
        self._logged: set[tuple[str, str, str]] = set()

    def add(self, sink: Sink) -> None:
        self._sinks.append(sink)
        for what, listeners in self._told.items():
            if getattr(type(sink), what) is not getattr(Sink, what):
                listeners.append((sink, getattr(sink, what)))

    def __iter__(self) -> Iterator[Sink]:
        return iter(self._sinks)

    def _failed(self, sink: Sink, what: str, exc: Exception) -> None:
        key = (sink.name, what, type(exc).__name__)
        if key not in self._logged:
            self._logged.add(key)
            log.exception("sink %s failed in %s (logged once for this kind of error)", sink.name, what)
        if self.on_error is not None:
            self.on_error(sink.name)

    def _tell(self, what: str, argument: object) -> None:
        for sink, method in self._told[what]:
            try:
                method(argument)
            except Exception as exc:
                self._failed(sink, what, exc)

    def node_changed(self, node: NodeRecord) -> None:
        self._tell("node_changed", node)

    def node_removed(self, node: NodeRecord) -> None:
        self._tell("node_removed", node)

    def event(self, event: events_pb2.Event) -> None:
        self._tell("event", event)

    def start(self) -> None:
        for sink in self._sinks:
            sink.start()

    async def stop(self, timeout_s: float) -> None:
        for sink in reversed(self._sinks):
            try:
                await sink.stop(timeout_s)
            except Exception as exc:
                self._failed(sink, "stop", exc)
