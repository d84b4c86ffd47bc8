"""The collector tier: several collectors serve one fleet, each node owned by exactly one at a time.

Collectors that share a PostgreSQL database (`--db postgresql://...`) are members of one tier.
Each member keeps a lease of its own in the table `members` (renewed every `lease_s / RENEWALS`)
and each node's owner is a row of `leases` naming a member instance; a node's lease is alive
while its owner's membership is. One renewal keeps every node of a member, whatever their number.

- **Acquire.** A node's Hello on a member that does not own it claims the node's lease: at once
  if nobody owns it (or its owner's membership lapsed), else the member asks the owner to let go
  (`wanted_by`) and tells the agent to come back after the owner's next renewal. The owner, at
  that renewal, stops acknowledging and exporting the node, writes what it holds of it and lets
  the lease go. The new owner then reads the node back from the database: its watermark, XID
  totals, verdicts and events, so it resumes exactly after the last acknowledged report.
- **Fencing.** A member that could not renew its membership for `lease_s - lease_s / RENEWALS`
  drops every node it holds (no more acknowledgements, no more series) before the database can
  give them to anyone else; each write to the database checks the writer's leases in the same
  transaction (`owned`), so a late write of an old owner changes nothing.
- **Orphans.** Nodes no live member owns (their agents are down too) are adopted by the live
  member their own agents would prefer (rendezvous hashing over the members' addresses), so every
  node known to the tier is shown, as up, stale or down, by exactly one member.
- **Peers.** The live members, for queries that answer for the whole fleet (`collector/peers.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from gpufleet.rendezvous import rank

log = logging.getLogger(__name__)

K = TypeVar("K")
T = TypeVar("T")

# Renewals per lease period: a member renews every lease_s / RENEWALS seconds.
RENEWALS = 5
DEFAULT_LEASE_S = 10.0
# Event ids carry the member's number in these bits (fleet-unique ids, `event_id_base`).
MEMBER_BITS = 10
MEMBER_NUMBERS = 1 << MEMBER_BITS
COUNTER_BITS = 12
# Event ids count milliseconds from here (2025-01-01): 41 bits of them last until 2094, and the
# id stays a positive 64-bit integer (PostgreSQL's BIGINT).
EPOCH_MS = 1_735_689_600_000
# Orphans adopted per renewal, at most (the rest at the next).
ADOPT_BATCH = 5000
POOL_SIZE = 4
# How long the event listener waits for a notification before it looks whether to stop.
LISTEN_POLL_S = 1.0
# How often a collector waiting for its id's old membership to lapse looks again.
REGISTER_POLL_S = 0.5
# Event ids in one NOTIFY payload, at most (payloads must stay under 8000 bytes).
NOTIFY_IDS = 300
CHANNEL = "gpufleet_events"

_CLAIM = """
INSERT INTO leases AS l (node_id, owner, epoch)
SELECT node_id, %(me)s, 1 FROM unnest(%(nodes)s::text[]) AS node_id
WHERE EXISTS (SELECT 1 FROM members WHERE instance = %(me)s AND expires_at > now())
ON CONFLICT (node_id) DO UPDATE SET owner = %(me)s, epoch = l.epoch + 1, wanted_by = NULL
WHERE l.owner IS NULL OR l.owner = %(me)s OR NOT EXISTS (
    SELECT 1 FROM members m WHERE m.instance = l.owner AND m.expires_at > now())
RETURNING node_id, epoch
"""
_ORPHANS = """
SELECT n.node_id FROM nodes n LEFT JOIN leases l USING (node_id)
WHERE l.owner IS NULL OR NOT EXISTS (
    SELECT 1 FROM members m WHERE m.instance = l.owner AND m.expires_at > now())
LIMIT %s
"""


class CollectorIdInUse(Exception):
    """Another live collector of the tier has this collector id."""


@dataclass(frozen=True)
class Member:
    """A live member of the tier: its collector id (on its metrics) and its gRPC address."""

    collector_id: str
    instance: str
    address: str


def event_id_base(number: int, now_ns: int | None = None) -> int:
    """The smallest event id a member may give now: milliseconds, then its number, then a counter."""
    millis = max((now_ns or time.time_ns()) // 1_000_000 - EPOCH_MS, 0)
    return ((millis << MEMBER_BITS) | (number % MEMBER_NUMBERS)) << COUNTER_BITS


class Tier:
    """This collector's membership and the leases of the nodes it owns."""

    def __init__(self, url: str, collector_id: str, address: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.url = url
        self.collector_id = collector_id
        self.address = address
        self.lease_s = lease_s
        self.renew_s = lease_s / RENEWALS
        self.instance = ""  # this process's membership, named when it joins
        self.number = 0
        self.peers: list[Member] = []
        # Told to let nodes go (stop acknowledging and exporting, write what is held); then adopt.
        self.on_release: Callable[[list[str]], Awaitable[None]] = _nothing
        self.on_drop: Callable[[list[str]], None] = lambda ids: None
        self.on_adopt: Callable[[list[str]], Awaitable[None]] = _nothing
        self._held: dict[str, int] = {}
        self._releasing: set[str] = set()
        # Nodes claimed and being read back from the database, and the future of their reading.
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._lost: set[str] = set()
        self._renewed_at = float("-inf")
        self._pool: ConnectionPool[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._listener: threading.Thread | None = None
        self._stopping = False
        self._last_failure = ""

    # -- membership ------------------------------------------------------------------------

    def open(self) -> None:
        """Join the tier (in the caller's thread); raises CollectorIdInUse or psycopg.Error."""
        self.instance = f"{self.collector_id}/{uuid.uuid4().hex[:12]}"
        self._pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True, "connect_timeout": 5},
            check=ConnectionPool.check_connection,  # one lost with the database is not handed out
            open=False,
        )
        self._pool.open(wait=True, timeout=5)
        self._register()

    def _register(self) -> None:
        """Become a live member: a number no live member has, and no leases left from before.

        A live membership under the same collector id is waited out for one lease (this collector
        restarted after a crash: its old membership lapses); one still renewed after that is
        another collector with this id, and refused.
        """
        deadline = time.monotonic() + self.lease_s + self.renew_s
        said = False
        while (other := self._try_register()) is not None:
            if time.monotonic() > deadline:
                raise CollectorIdInUse(
                    f"collector id {self.collector_id!r} is in use by a live collector at {other}; "
                    "give each collector its own --collector-id"
                )
            if not said:
                log.info(
                    "collector id %s has a live membership (at %s): waiting up to %.0f s for it to lapse "
                    "(this collector restarted after a crash?)",
                    self.collector_id,
                    other,
                    self.lease_s + self.renew_s,
                )
                said = True
            time.sleep(REGISTER_POLL_S)
        self._renewed_at = time.monotonic()
        self._held.clear()

    def _try_register(self) -> str | None:
        """Join, or the address of the live member that has this collector id."""
        with self._connection() as db, db.transaction():
            db.execute("LOCK TABLE members IN EXCLUSIVE MODE")
            db.execute("DELETE FROM members WHERE expires_at < now() - interval '1 hour'")
            row = db.execute(
                "SELECT address FROM members "
                "WHERE collector_id = %s AND instance <> %s AND expires_at > now()",
                (self.collector_id, self.instance),
            ).fetchone()
            if row:
                return str(row[0])
            used = {n for (n,) in db.execute("SELECT number FROM members WHERE expires_at > now()")}
            self.number = next(n for n in range(MEMBER_NUMBERS + 1) if n not in used) % MEMBER_NUMBERS
            db.execute(
                "INSERT INTO members (instance, collector_id, address, number, expires_at) "
                "VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s)) ON CONFLICT (instance) DO UPDATE "
                "SET address = excluded.address, number = excluded.number, expires_at = excluded.expires_at",
                (self.instance, self.collector_id, self.address, self.number, self.lease_s),
            )
            db.execute("UPDATE leases SET owner = NULL, wanted_by = NULL WHERE owner = %s", (self.instance,))
        return None

    def _connection(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        assert self._pool is not None
        return self._pool.connection(timeout=self.renew_s)

    @property
    def fenced(self) -> bool:
        """True once the membership may have lapsed in the database: nothing may be acknowledged."""
        return time.monotonic() - self._renewed_at > self.lease_s - self.renew_s

    def owns(self, node_id: str) -> bool:
        """Whether this member may acknowledge and export the node now."""
        return (
            node_id in self._held
            and node_id not in self._loading
            and node_id not in self._releasing
            and node_id not in self._lost
            and not self.fenced
        )

    def held(self) -> list[str]:
        """The nodes held now (a copy)."""
        return list(self._held)

    def epoch(self, node_id: str) -> int | None:
        """The epoch of a node's lease held here (the store's writer checks its writes against it)."""
        return self._held.get(node_id)

    def __len__(self) -> int:
        return len(self._held)

    def lost(self, node_ids: Iterable[str]) -> None:
        """The store found these leases gone while writing (from its thread): they are dropped."""
        self._lost.update(node_ids)

    # -- acquiring ---------------------------------------------------------------------------

    async def acquire(self, node_id: str) -> tuple[bool, str]:
        """Claim a node's lease: (True, "") once owned, else (False, the owner asked to let go),
        or (False, "") when this member cannot claim anything (fenced, or the store is away)."""
        if self.owns(node_id):
            return True, ""
        if node_id in self._loading:
            await asyncio.shield(self._loading[node_id])
            if self.owns(node_id):
                return True, ""
        if self.fenced:
            return False, ""
        try:
            epochs, owner = await asyncio.to_thread(self._claim_or_ask, node_id)
            if not epochs:
                return False, owner
            await self._take(epochs)
        except (psycopg.Error, OSError) as exc:
            log.warning("cannot claim node %s: %s", node_id, " ".join(str(exc).split()))
            return False, ""
        if node_id in self._loading:  # read back by a renewal that claimed it at the same time
            await asyncio.shield(self._loading[node_id])
        return self.owns(node_id), ""

    def _claim_or_ask(self, node_id: str) -> tuple[dict[str, int], str]:
        """The node's lease claimed ({node_id: epoch}), else ({}, the owner now asked to let go)."""
        with self._connection() as db:
            epochs = dict(db.execute(_CLAIM, {"me": self.instance, "nodes": [node_id]}).fetchall())
            if node_id in epochs:
                return epochs, ""
            row = db.execute(
                "UPDATE leases l SET wanted_by = %s FROM members m WHERE l.node_id = %s "
                "AND m.instance = l.owner RETURNING m.collector_id",
                (self.instance, node_id),
            ).fetchone()
            return {}, row[0] if row else "another collector"

    async def _take(self, epochs: dict[str, int]) -> None:
        """Claimed leases: held from now on, and served once read back from the database
        (until then the nodes are loading: nothing of them is taken in or acknowledged)."""
        new = [n for n in sorted(epochs) if n not in self._held and n not in self._loading]
        for node_id, epoch in epochs.items():
            self._lost.discard(node_id)
            self._held[node_id] = epoch
        if not new:
            return
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for node_id in new:
            self._loading[node_id] = loaded
        try:
            await self.on_adopt(new)
        except BaseException:
            for node_id in new:
                self._held.pop(node_id, None)  # still ours in the database: adopted again next renewal
            raise
        finally:
            for node_id in new:
                self._loading.pop(node_id, None)
            loaded.set_result(None)

    def load(self, reader: Callable[[Any, list[K]], T], keys: list[K]) -> T:
        """``reader(db, keys)`` on a connection of the pool (in the caller's thread)."""
        with self._connection() as db:
            return reader(db, keys)

    # -- renewing ------------------------------------------------------------------------------

    def start(self, on_peer_events: Callable[[list[int]], None] | None = None) -> None:
        """Renew from now on; ``on_peer_events`` hears the ids of events other members commit."""
        self._task = asyncio.create_task(self._run(), name="tier-renewal")
        if on_peer_events is not None:
            loop = asyncio.get_running_loop()
            self._listener = threading.Thread(
                target=self._listen, args=(loop, on_peer_events), name="tier-events", daemon=True
            )
            self._listener.start()

    def _listen(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[int]], None]) -> None:
        """LISTEN for the events other members commit (a thread; reconnects after losing the store)."""
        while not self._stopping:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as db:
                    db.execute(f"LISTEN {CHANNEL}")
                    while not self._stopping:
                        for notify in db.notifies(timeout=LISTEN_POLL_S):
                            instance, _, ids = notify.payload.partition(" ")
                            if instance != self.instance and ids:
                                loop.call_soon_threadsafe(deliver, [int(i) for i in ids.split(",")])
            except (psycopg.Error, OSError, ValueError, RuntimeError):
                time.sleep(LISTEN_POLL_S)  # the store is away (or the loop closed): again soon

    async def _run(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._renew(started)
            except (psycopg.Error, OSError) as exc:
                why = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                if why != self._last_failure:
                    log.warning("cannot renew this collector's membership of the tier: %s", why)
                    self._last_failure = why
                self._fence_if_due(why)
            except Exception:
                log.exception("renewing the tier's leases failed")
                self._fence_if_due("an error (logged above)")
            await asyncio.sleep(max(self.renew_s - (time.monotonic() - started), 0.05))

    def _fence_if_due(self, why: str) -> None:
        if self.fenced and self._held:
            log.error(
                "cannot renew this collector's membership for %.0f s (%s): dropping its %d nodes; "
                "their agents go to another collector",
                self.lease_s - self.renew_s,
                why,
                len(self._held),
            )
            dropped = list(self._held)
            self._held.clear()
            self.on_drop(dropped)

    async def _renew(self, started: float) -> None:
        was_fenced = self.fenced
        renewed, wanted, lost, handed, peers = await asyncio.to_thread(self._renew_in_db)
        if not renewed or was_fenced:
            # The membership lapsed (or may have): join again, holding nothing.
            if self._held:
                dropped = list(self._held)
                self._held.clear()
                self.on_drop(dropped)
            await asyncio.to_thread(self._register)
            log.info("collector %s joined the tier again", self.collector_id)
            return
        self._renewed_at = started
        self._last_failure = ""
        self.peers = peers
        lost |= self._lost & set(self._held)
        if lost:
            for node_id in lost:
                self._held.pop(node_id, None)
            self._lost -= lost
            log.warning("lost the lease of %d nodes to another collector", len(lost))
            self.on_drop(sorted(lost))
        if wanted:
            await self.release(wanted)
        if handed:
            # Nodes another collector let go to this one (it asked): served from now on.
            await self._take(await asyncio.to_thread(self._claim_many, sorted(handed)))
        await self.adopt_orphans()

    def _renew_in_db(self) -> tuple[bool, list[str], set[str], set[str], list[Member]]:
        with self._connection() as db, db.transaction():
            renewed = db.execute(
                "UPDATE members SET expires_at = now() + make_interval(secs => %s) "
                "WHERE instance = %s AND expires_at > now() RETURNING 1",
                (self.lease_s, self.instance),
            ).fetchone()
            if not renewed:
                return False, [], set(), set(), []
            wanted = [
                n
                for (n,) in db.execute(
                    "SELECT node_id FROM leases WHERE owner = %s AND wanted_by IS NOT NULL", (self.instance,)
                )
            ]
            lost: set[str] = set()
            handed: set[str] = set()
            (count,) = db.execute(
                "SELECT count(*) FROM leases WHERE owner = %s", (self.instance,)
            ).fetchone() or (0,)
            if count != len(self._held):
                mine = {
                    n for (n,) in db.execute("SELECT node_id FROM leases WHERE owner = %s", (self.instance,))
                }
                lost = set(self._held) - mine
                handed = mine - set(self._held)
            peers = [
                Member(*row)
                for row in db.execute(
                    "SELECT collector_id, instance, address FROM members WHERE expires_at > now() "
                    "AND instance <> %s ORDER BY collector_id",
                    (self.instance,),
                )
            ]
        return True, [n for n in wanted if n in self._held], lost, handed, peers

    async def release(self, node_ids: list[str]) -> None:
        """Let nodes go: stop acknowledging and exporting them, write what is held, free the leases."""
        node_ids = [n for n in node_ids if n in self._held]
        if not node_ids:
            return
        self._releasing.update(node_ids)
        try:
            await self.on_release(node_ids)
            await asyncio.to_thread(self._free, node_ids)
        finally:
            for node_id in node_ids:
                self._held.pop(node_id, None)
            self._releasing.difference_update(node_ids)
        log.info("let %d nodes go to the collectors that asked for them", len(node_ids))

    def _free(self, node_ids: list[str]) -> None:
        with self._connection() as db:
            # To the collector that asked (it adopts them at its next renewal, or when their agents
            # come back to it), else to nobody.
            db.execute(
                "UPDATE leases SET owner = wanted_by, epoch = epoch + 1, wanted_by = NULL "
                "WHERE owner = %s AND node_id = ANY(%s)",
                (self.instance, node_ids),
            )

    async def adopt_orphans(self) -> None:
        """Claim the nodes nobody owns whose agents would prefer this collector among the live ones."""
        members = [self.address, *(peer.address for peer in self.peers)]
        orphans = await asyncio.to_thread(self._orphans)
        mine = [n for n in orphans if rank(n, members)[0] == self.address and n not in self._held]
        if not mine:
            return
        await self._take(await asyncio.to_thread(self._claim_many, mine))

    def _orphans(self) -> list[str]:
        with self._connection() as db:
            return [n for (n,) in db.execute(_ORPHANS, (ADOPT_BATCH,))]

    def _claim_many(self, node_ids: list[str]) -> dict[str, int]:
        with self._connection() as db:
            return dict(db.execute(_CLAIM, {"me": self.instance, "nodes": node_ids}).fetchall())

    def forget(self, node_id: str) -> None:
        """An operator forgot the node: its lease goes with its rows (the store deletes both)."""
        self._held.pop(node_id, None)

    def live_members(self) -> list[Member]:
        return [Member(self.collector_id, self.instance, self.address), *self.peers]

    # -- leaving ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Leave the tier: every lease and the membership are freed, so others take over at once."""
        self._stopping = True
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, LISTEN_POLL_S * 3)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pool is None:
            return
        with contextlib.suppress(psycopg.Error, OSError):
            await asyncio.to_thread(self._leave)
        await asyncio.to_thread(self._pool.close)
        self._pool = None

    def _leave(self) -> None:
        with self._connection() as db, db.transaction():
            db.execute("UPDATE leases SET owner = NULL, wanted_by = NULL WHERE owner = %s", (self.instance,))
            db.execute("DELETE FROM members WHERE instance = %s", (self.instance,))
        self._held.clear()


async def _nothing(node_ids: list[str]) -> None:
    return None
