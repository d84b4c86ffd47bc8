"""A tier member's nodes as they come and go: the tier's leases applied to the state, store and streams.

A node comes with its lease (an agent's Hello, or an orphan adopted): it is read back from the
shared database before anything of it is taken in. A node goes when another member asks for it
(its streams end, what is held of it is written, then it leaves the state quietly), or when this
member is fenced or finds the lease gone (its streams end and it leaves at once: nothing may be
written under a lease that is not held).
"""

from __future__ import annotations

import asyncio
import logging

from gpufleet.collector.state import FleetState
from gpufleet.collector.store import CommitFailed
from gpufleet.collector.store_postgres import PostgresStore
from gpufleet.collector.tier import Tier

log = logging.getLogger(__name__)


class Ownership:
    """Which nodes this collector serves, for the ingest path (acquire, owns) and the tier."""

    def __init__(self, tier: Tier, store: PostgresStore, state: FleetState) -> None:
        self._tier = tier
        self._store = store
        self._state = state
        self._streams: dict[str, set[asyncio.Task[object]]] = {}
        tier.on_release = self._release
        tier.on_drop = self._drop
        tier.on_adopt = self._adopt

    @property
    def retry_after_s(self) -> float:
        """How long an agent waits before asking again for a node another collector lets go."""
        return self._tier.renew_s

    async def acquire(self, node_id: str) -> str | None:
        """None once this collector owns the node and holds its state; else the collector that
        serves it (asked to let it go), or "" when this one can serve no node now (fenced)."""
        if self._tier.owns(node_id):
            return None
        claimed, owner = await self._tier.acquire(node_id)
        return None if claimed else owner

    def owns(self, node_id: str) -> bool:
        return self._tier.owns(node_id)

    async def read_serials(self, serials: list[str]) -> None:
        """The tier's records of GPU serials new to this collector (a GPU moved in from a node
        another collector serves), read back before the node's inventory links them."""
        unknown = sorted({s for s in serials if s and self._state.reliability.find(s) is None})
        if unknown:
            records = await asyncio.to_thread(self._tier.load, self._store.read_serials, unknown)
            self._store.restore_serials(records)

    def attach(self, node_id: str, task: asyncio.Task[object] | None) -> None:
        """A stream of the node's agent (ended when the node goes)."""
        if task is not None:
            self._streams.setdefault(node_id, set()).add(task)

    def detach(self, node_id: str, task: asyncio.Task[object] | None) -> None:
        tasks = self._streams.get(node_id)
        if tasks is not None and task is not None:
            tasks.discard(task)
            if not tasks:
                del self._streams[node_id]

    async def adopt_orphans(self) -> None:
        """The first adoption, before the collector serves: the nodes nobody else serves."""
        await self._tier.adopt_orphans()

    async def _adopt(self, node_ids: list[str]) -> None:
        records, events = await asyncio.to_thread(self._tier.load, self._store.read_nodes, node_ids)
        fresh = [record for record in records if self._state.get(record.node_id) is None]
        self._store.adopt(fresh)
        taken = {record.node_id for record in fresh}
        self._state.events.restore((e for e in events if e.node_id in taken), own=False)
        if len(node_ids) > 1:
            log.info("serving %d more nodes that no live collector served", len(fresh))

    def _end_streams(self, node_ids: list[str]) -> None:
        for node_id in node_ids:
            for task in self._streams.pop(node_id, ()):
                task.cancel()

    async def _release(self, node_ids: list[str]) -> None:
        self._end_streams(node_ids)
        try:
            await self._store.durable()
        except CommitFailed as exc:
            log.warning("could not write %d nodes before letting them go: %s", len(node_ids), exc)
        self._leave(node_ids)

    def _drop(self, node_ids: list[str]) -> None:
        self._end_streams(node_ids)
        self._leave(node_ids)

    def _leave(self, node_ids: list[str]) -> None:
        for node_id in node_ids:
            node = self._state.get(node_id)
            if node is not None:
                self._state.release(node)
