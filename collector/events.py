"""The fleet's event log: what happened, to which node or GPU, how bad, and what to do.

Events are kept in memory (the newest ``capacity``), persisted by the store, and
handed to subscribers (the MQTT publisher, followers of the gRPC stream).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gpufleet.v1 import events_pb2

INFO = events_pb2.SEVERITY_INFO
WARNING = events_pb2.SEVERITY_WARNING
CRITICAL = events_pb2.SEVERITY_CRITICAL

Subscriber = Callable[[events_pb2.Event], None]


@dataclass(frozen=True)
class EventMatch:
    """Which events a query or a follower wants."""

    node_id: str = ""
    kinds: frozenset[str] = frozenset()
    min_severity: int = 0
    since_unix_nano: int = 0
    after_id: int = 0

    def __call__(self, event: events_pb2.Event) -> bool:
        return (
            event.id > self.after_id
            and (not self.node_id or event.node_id == self.node_id)
            and (not self.kinds or event.kind in self.kinds)
            and event.severity >= self.min_severity
            and event.time_unix_nano > self.since_unix_nano
        )


class EventLog:
    def __init__(self, capacity: int = 200_000) -> None:
        self._events: deque[events_pb2.Event] = deque(maxlen=capacity)
        self._subscribers: list[Subscriber] = []
        self.last_id = 0

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.remove(subscriber)

    def restore(self, events: Iterable[events_pb2.Event]) -> None:
        """Events read back from the store at start-up (oldest first); not published again."""
        for event in events:
            self._events.append(event)
            self.last_id = max(self.last_id, event.id)

    def emit(
        self,
        kind: str,
        severity: events_pb2.Severity,
        reason: str,
        *,
        node_id: str,
        node_name: str,
        datacenter: str = "",
        cluster: str = "",
        gpu_index: int | None = None,
        action: str = "",
        attributes: Mapping[str, str] | None = None,
        time_unix_nano: int | None = None,
    ) -> events_pb2.Event:
        self.last_id += 1
        event = events_pb2.Event(
            id=self.last_id,
            time_unix_nano=time_unix_nano or time.time_ns(),
            node_id=node_id,
            node_name=node_name,
            datacenter=datacenter,
            cluster=cluster,
            kind=kind,
            severity=severity,
            reason=reason,
            action=action,
            attributes=attributes or {},
        )
        if gpu_index is not None:
            event.gpu_index = gpu_index
        self._events.append(event)
        for subscriber in self._subscribers:
            subscriber(event)
        return event

    def query(self, match: EventMatch, limit: int = 1000) -> list[events_pb2.Event]:
        """The newest ``limit`` events that match, oldest first."""
        matches: list[events_pb2.Event] = []
        for event in reversed(self._events):
            if event.id <= match.after_id or len(matches) >= limit:
                break
            if match(event):
                matches.append(event)
        matches.reverse()
        return matches
