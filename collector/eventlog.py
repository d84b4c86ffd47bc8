"""The fleet's event log: what happened, to which node or GPU, how bad, and what to do.

Events are kept in memory, persisted by the store, and handed to subscribers (the MQTT
publisher, followers of the gRPC stream). Retention is fair across nodes: each node
keeps its newest events up to an equal share of the log's capacity (never fewer than
MIN_EVENTS_PER_NODE), so one node in an event storm cannot push out another's history.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gpufleet.collector.sinks import Sink
from gpufleet.v1 import events_pb2

INFO = events_pb2.SEVERITY_INFO
WARNING = events_pb2.SEVERITY_WARNING
CRITICAL = events_pb2.SEVERITY_CRITICAL

Follower = Callable[[events_pb2.Event], None]

# Events the log keeps in all, and the share no node goes below however many nodes there are.
EVENTS_KEPT = 200_000
MIN_EVENTS_PER_NODE = 100


def events_per_node(capacity: int, nodes: int) -> int:
    """Each node's share of a log of ``capacity`` events (the store keeps the same)."""
    return max(capacity // max(nodes, 1), MIN_EVENTS_PER_NODE)


@dataclass(frozen=True)
class EventMatch:
    """Which events a query or a follower wants."""

    node_id: str = ""
    kinds: frozenset[str] = frozenset()
    min_severity: int = 0
    since_unix_nano: int = 0
    after_id: int = 0
    # A node's name or id, as an operator typed it (for a node another collector of a tier serves).
    node: str = ""

    def __call__(self, event: events_pb2.Event) -> bool:
        return (
            event.id > self.after_id
            and (not self.node_id or event.node_id == self.node_id)
            and (not self.node or self.node in (event.node_id, event.node_name))
            and (not self.kinds or event.kind in self.kinds)
            and event.severity >= self.min_severity
            and event.time_unix_nano > self.since_unix_nano
        )


class EventLog:
    def __init__(self, capacity: int = EVENTS_KEPT) -> None:
        self.capacity = capacity
        self._by_node: dict[str, deque[events_pb2.Event]] = {}
        # Told of each new event (the fleet state sets its sinks here).
        self.sink: Sink = Sink()
        self.last_id = 0
        # The least id the next event may have (in a tier: ids unique across its collectors).
        self.id_floor: Callable[[], int] = lambda: 0

    def __len__(self) -> int:
        return sum(len(events) for events in self._by_node.values())

    def share(self) -> int:
        """How many events each node keeps now."""
        return events_per_node(self.capacity, len(self._by_node))

    def restore(self, events: Iterable[events_pb2.Event], *, own: bool = True) -> None:
        """Events read back from the store (oldest first); not published again.

        ``own=False``: events another collector of the tier logged (of a node taken over); their
        ids are theirs, so they do not move this log's next id.
        """
        for event in events:
            self._keep(event)
            if own:
                self.last_id = max(self.last_id, event.id)

    def drop(self, node_id: str) -> None:
        """Forget a node's events here (another collector of the tier serves it now)."""
        self._by_node.pop(node_id, None)

    def _keep(self, event: events_pb2.Event) -> None:
        kept = self._by_node.get(event.node_id)
        if kept is None:
            kept = self._by_node[event.node_id] = deque()
        kept.append(event)
        while len(kept) > self.share():
            kept.popleft()

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
        self.last_id = max(self.last_id + 1, self.id_floor())
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
        self._keep(event)
        self.sink.event(event)
        return event

    def query(self, match: EventMatch, limit: int = 1000) -> list[events_pb2.Event]:
        """The newest ``limit`` events that match, oldest first."""
        if match.node_id:
            newest_first: Iterable[events_pb2.Event] = reversed(self._by_node.get(match.node_id, ()))
        else:
            newest_first = heapq.merge(
                *(reversed(events) for events in self._by_node.values()), key=_newest_first
            )
        matches: list[events_pb2.Event] = []
        for event in itertools.takewhile(lambda e: e.id > match.after_id, newest_first):
            if len(matches) >= limit:
                break
            if match(event):
                matches.append(event)
        matches.reverse()
        return matches


def _newest_first(event: events_pb2.Event) -> int:
    return -event.id


class EventFollowers(Sink):
    """Whoever follows the event log as it grows (StreamEvents callers), as one sink."""

    name = "event-followers"

    def __init__(self) -> None:
        self._followers: list[Follower] = []

    def follow(self, follower: Follower) -> None:
        self._followers.append(follower)

    def unfollow(self, follower: Follower) -> None:
        self._followers.remove(follower)

    def __len__(self) -> int:
        return len(self._followers)

    def event(self, event: events_pb2.Event) -> None:
        for follower in self._followers:
            follower(event)
