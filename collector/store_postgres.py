"""The fleet's durable state in PostgreSQL (`--db postgresql://...`), instead of the embedded SQLite.

The same tables, batches and guarantees as `store.py` (a report is acknowledged once the batch
holding it is committed), written through psycopg 3 in the store's writer thread, one
transaction per batch with pipelined statements. The schema is created and migrated by the
collector and versioned in `gpufleet_schema`; a database whose schema is newer than this
collector's is refused at start, as is one that cannot be reached or logged into: one line,
exit 2 (an operator who points a collector at PostgreSQL wants the shared state, not a fleet
kept only in memory). A connection lost while running takes the store down as with SQLite (the
batch is not acknowledged, the agents resend it, and the collector runs from memory), but the
writer then connects again, RECONNECT_S apart: once back, it writes the whole fleet as memory
holds it (nodes, verdicts, XID totals, reliability records) and the events logged meanwhile.

The GPUs' reliability records (`gpu_reliability`) are keyed by serial and shared by the tier: a
collector reads those of a node's GPUs back when it takes the node, and writes a record while
the GPU is installed in a node it holds (under that node's lease).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Sequence
from typing import Any

import psycopg

from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.reliability import SerialRecord
from gpufleet.collector.selfmetrics import CollectorMetrics
from gpufleet.collector.state import FleetState, NodeRecord
from gpufleet.collector.store import (
    HEALTH_COLUMNS,
    NODE_COLUMNS,
    XID_COLUMNS,
    Batch,
    Store,
    attach_serial_records,
    build_records,
    serial_records,
)
from gpufleet.collector.tier import CHANNEL, NOTIFY_IDS, Tier
from gpufleet.v1 import events_pb2

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    interval_s DOUBLE PRECISION NOT NULL,
    last_seen_unix_ns BIGINT NOT NULL,
    last_sequence BIGINT NOT NULL,
    inventory BYTEA NOT NULL,
    missing_gpus BYTEA NOT NULL
);
CREATE TABLE xid_totals (
    node_id TEXT NOT NULL,
    gpu_index INTEGER NOT NULL,
    xid INTEGER NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (node_id, gpu_index, xid)
);
CREATE TABLE events (
    id BIGINT PRIMARY KEY,
    time_unix_ns BIGINT NOT NULL,
    node_id TEXT NOT NULL,
    event BYTEA NOT NULL
);
CREATE INDEX events_by_node ON events (node_id, id);
CREATE TABLE gpu_health (
    node_id TEXT NOT NULL,
    gpu_index INTEGER NOT NULL,
    health INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    action TEXT NOT NULL,
    xids_this_boot TEXT NOT NULL,
    PRIMARY KEY (node_id, gpu_index)
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
""",
    # The tier (collector/tier.py): members and their leases, one per node.
    2: """
CREATE TABLE members (
    instance TEXT PRIMARY KEY,
    collector_id TEXT NOT NULL,
    address TEXT NOT NULL,
    number INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE leases (
    node_id TEXT PRIMARY KEY,
    owner TEXT,
    epoch BIGINT NOT NULL,
    wanted_by TEXT
);
CREATE INDEX leases_by_owner ON leases (owner);
-- The agent's own counters (its last report's), for the collector a node moves to.
ALTER TABLE nodes ADD COLUMN agent_stats BYTEA NOT NULL DEFAULT '';
""",
    # One reliability record per GPU serial (collector/reliability.py), across nodes and collectors.
    3: """
CREATE TABLE gpu_reliability (
    serial TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    record TEXT NOT NULL,
    updated_unix_nano BIGINT NOT NULL
);
""",
}
CONNECT_TIMEOUT_S = 5
# The advisory lock that migrations hold (any number; the same in every collector).
MIGRATION_LOCK = 0x6770_7566_6C74  # "gpuflt"
# Events written back after a reconnection, at most (the newest; the log keeps a share per node).
EVENTS_CAUGHT_UP = 1_000_000
# How long apart the writer tries to connect again after losing the database.
RECONNECT_S = 1.0


class DatabaseRefused(Exception):
    """The PostgreSQL database cannot be used at start; the message says what to do."""


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """The URL without its password, for log lines."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def migrate(db: psycopg.Connection[Any]) -> int:
    """Bring the schema to SCHEMA_VERSION; return the version it had. Refuses a newer one."""
    with db.transaction():
        # Collectors starting together (a StatefulSet, --workers) migrate one at a time: even
        # CREATE TABLE IF NOT EXISTS is not safe when two run it at once.
        db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS gpufleet_schema (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM gpufleet_schema").fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise DatabaseRefused(
                f"the database's schema is version {found}, newer than this collector's "
                f"({SCHEMA_VERSION}): upgrade the collector, or give it another database"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            db.execute(MIGRATIONS[version])
        if not row:
            db.execute("INSERT INTO gpufleet_schema VALUES (%s)", (SCHEMA_VERSION,))
        elif found < SCHEMA_VERSION:
            db.execute("UPDATE gpufleet_schema SET version = %s", (SCHEMA_VERSION,))
    return found


class PostgresStore(Store):
    """The Store, kept in PostgreSQL."""

    engine_errors = (psycopg.Error,)
    acknowledge_when_down = False

    def __init__(self, url: str, state: FleetState, metrics: CollectorMetrics, tier: Tier) -> None:
        super().__init__(None, state, metrics)
        self.url = url
        self.tier = tier

    def describe(self) -> str:
        return f"PostgreSQL {redacted(self.url)}"

    def open(self) -> None:
        """Connect, migrate and restore; raises DatabaseRefused (nothing is kept only in memory)."""
        try:
            db = psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)
        except psycopg.Error as exc:
            raise DatabaseRefused(f"cannot connect to {self.describe()}: {_gist(exc)}") from None
        try:
            found = migrate(db)
            if found < SCHEMA_VERSION:
                log.info("%s: schema version %d -> %d", self.describe(), found, SCHEMA_VERSION)
            self._meta = dict(db.execute("SELECT key, value FROM meta"))
        except DatabaseRefused:
            db.close()
            raise
        except psycopg.Error as exc:
            db.close()
            raise DatabaseRefused(f"cannot use {self.describe()}: {_gist(exc)}") from None
        self._db = db
        self._metrics.store_up.set(1)
        self._dirty.clear()

    # The collector's own small numbers are its own in a database the tier shares.
    def get_meta(self, key: str, default: int = 0) -> int:
        return super().get_meta(f"{self.tier.collector_id}/{key}", default)

    def set_meta(self, key: str, value: int) -> None:
        super().set_meta(f"{self.tier.collector_id}/{key}", value)

    async def _back_up(self) -> bool:
        """Connect again; once connected, the next batch writes what memory holds."""
        while not self._stopping:
            await asyncio.sleep(RECONNECT_S)
            try:
                db, last_event_id = await asyncio.to_thread(self._connect_again)
            except psycopg.Error:
                continue
            self._db = db
            self._catch_up(last_event_id)
            self._metrics.store_up.set(1)
            log.info("%s is back: writing the fleet as it stands", self.describe())
            return True
        return False

    def _connect_again(self) -> tuple[psycopg.Connection[Any], int]:
        """A new connection, and the newest event id the database holds."""
        db = psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)
        try:
            # The newest of this collector's nodes' events (other collectors' ids are theirs).
            row = db.execute(
                "SELECT coalesce(max(id), 0) FROM events WHERE node_id = ANY(%s)", (self.tier.held(),)
            ).fetchone()
        except psycopg.Error:
            db.close()
            raise
        return db, int(row[0]) if row else 0

    def _catch_up(self, last_event_id: int) -> None:
        """Have the next batch write every node, the XID totals and the events the database missed."""
        self._written_inventory.clear()
        self._written_health.clear()
        self._written_reliability.clear()
        batch = self._pending
        for node in self._state.nodes():
            self._dirty.add(node.node_id)
            for index, gpu in node.gpus.items():
                for xid, count in gpu.xid_totals.items():
                    batch.xid_totals[(node.node_id, index, xid)] = count
        batch.xids.clear()
        batch.events.extend(
            (e.id, e.time_unix_nano, e.node_id, e.SerializeToString())
            for e in self._state.events.query(EventMatch(after_id=last_event_id), limit=EVENTS_CAUGHT_UP)
        )
        self._mark_pending()
        self._wake.set()

    def _write(self, batch: Batch) -> None:
        db: psycopg.Connection[Any] = self._db
        with db.transaction(), db.cursor() as cursor:
            self._fence(cursor, batch)
            _many(
                cursor,
                "INSERT INTO nodes VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (node_id) "
                "DO UPDATE SET name = excluded.name, interval_s = excluded.interval_s, "
                "last_seen_unix_ns = excluded.last_seen_unix_ns, last_sequence = excluded.last_sequence, "
                "inventory = excluded.inventory, missing_gpus = excluded.missing_gpus, "
                "agent_stats = excluded.agent_stats",
                list(batch.nodes.values()),
            )
            if batch.watermarks:
                # Most batches are only this: one statement for all of them, whatever their number.
                cursor.execute(
                    "UPDATE nodes n SET interval_s = v.interval_s, last_seen_unix_ns = v.seen, "
                    "last_sequence = v.sequence, agent_stats = v.stats FROM unnest("
                    "%s::float8[], %s::bigint[], %s::bigint[], %s::bytea[], %s::text[]) "
                    "AS v(interval_s, seen, sequence, stats, node_id) WHERE n.node_id = v.node_id",
                    [list(column) for column in zip(*batch.watermarks.values(), strict=True)],
                )
            _many(
                cursor,
                "INSERT INTO xid_totals VALUES (%s, %s, %s, %s) ON CONFLICT (node_id, gpu_index, xid) "
                "DO UPDATE SET count = xid_totals.count + excluded.count",
                [(node_id, gpu, xid, count) for (node_id, gpu, xid), count in batch.xids.items()],
            )
            _many(
                cursor,
                "INSERT INTO xid_totals VALUES (%s, %s, %s, %s) ON CONFLICT (node_id, gpu_index, xid) "
                "DO UPDATE SET count = excluded.count",
                [(node_id, gpu, xid, count) for (node_id, gpu, xid), count in batch.xid_totals.items()],
            )
            _many(
                cursor,
                "INSERT INTO events VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                "time_unix_ns = excluded.time_unix_ns, node_id = excluded.node_id, event = excluded.event",
                batch.events,
            )
            # Each node keeps its own newest events, as in memory and in SQLite.
            _many(
                cursor,
                "DELETE FROM events WHERE node_id = %s AND id < (SELECT id FROM events WHERE node_id = %s "
                "ORDER BY id DESC LIMIT 1 OFFSET %s)",
                [(node_id, node_id, batch.events_per_node - 1) for node_id in {e[2] for e in batch.events}],
            )
            _many(
                cursor,
                "INSERT INTO gpu_health VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (node_id, gpu_index) "
                "DO UPDATE SET health = excluded.health, reasons = excluded.reasons, "
                "action = excluded.action, xids_this_boot = excluded.xids_this_boot",
                batch.verdicts,
            )
            _many(
                cursor,
                "INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(batch.meta.items()),
            )
            _many(
                cursor,
                "INSERT INTO gpu_reliability VALUES (%s, %s, %s, %s) ON CONFLICT (serial) DO UPDATE SET "
                "uuid = excluded.uuid, record = excluded.record, "
                "updated_unix_nano = excluded.updated_unix_nano",
                [row for _, row in batch.reliability.values()],
            )
            for table in ("nodes", "xid_totals", "gpu_health", "leases"):
                _many(cursor, f"DELETE FROM {table} WHERE node_id = %s", [(n,) for n in batch.forgotten])
            # Followers on every collector of the tier hear of the events once they are committed.
            ids = [str(event[0]) for event in batch.events]
            for start in range(0, len(ids), NOTIFY_IDS):
                payload = f"{self.tier.instance} {','.join(ids[start : start + NOTIFY_IDS])}"
                cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    def _fence(self, cursor: psycopg.Cursor[Any], batch: Batch) -> None:
        """Keep only what this collector still owns (its leases, checked and held in this transaction)."""
        nodes = {
            *batch.nodes,
            *batch.watermarks,
            *(n for n, _, _ in batch.xids),
            *(n for n, _, _ in batch.xid_totals),
        }
        nodes.update(event[2] for event in batch.events)
        nodes.update(str(row[0]) for row in batch.verdicts)
        nodes.update(node_id for node_id, _ in batch.reliability.values())
        if not nodes:
            return
        cursor.execute(
            "SELECT l.node_id, l.epoch FROM leases l JOIN members m ON m.instance = l.owner "
            "WHERE l.owner = %s AND m.expires_at > now() AND l.node_id = ANY(%s) FOR SHARE OF l",
            (self.tier.instance, sorted(nodes)),
        )
        owned = {node_id for node_id, epoch in cursor.fetchall() if self.tier.epoch(node_id) == epoch}
        lost = nodes - owned
        if not lost:
            return
        self.tier.lost(lost)
        batch.nodes = {n: row for n, row in batch.nodes.items() if n in owned}
        batch.watermarks = {n: row for n, row in batch.watermarks.items() if n in owned}
        batch.xids = {key: count for key, count in batch.xids.items() if key[0] in owned}
        batch.xid_totals = {key: count for key, count in batch.xid_totals.items() if key[0] in owned}
        batch.events = [event for event in batch.events if event[2] in owned]
        batch.verdicts = [row for row in batch.verdicts if row[0] in owned]
        batch.reliability = {s: entry for s, entry in batch.reliability.items() if entry[0] in owned}

    def read_nodes(
        self, db: psycopg.Connection[Any], node_ids: list[str]
    ) -> tuple[list[NodeRecord], list[events_pb2.Event]]:
        """Nodes as the database holds them, with their GPUs' reliability records, and their events
        (oldest first), for their new owner."""
        where = " WHERE node_id = ANY(%s)"
        records = build_records(
            db.execute(f"SELECT {XID_COLUMNS} FROM xid_totals" + where, (node_ids,)),
            db.execute(f"SELECT {HEALTH_COLUMNS} FROM gpu_health" + where, (node_ids,)),
            db.execute(f"SELECT {NODE_COLUMNS} FROM nodes" + where, (node_ids,)),
        )
        serials = sorted({g.inventory.serial for n in records for g in n.gpus.values() if g.inventory.serial})
        if serials:
            rows = db.execute("SELECT record FROM gpu_reliability WHERE serial = ANY(%s)", (serials,))
            attach_serial_records(records, serial_records(rows))
        events = [
            events_pb2.Event.FromString(blob)
            for (blob,) in db.execute("SELECT event FROM events" + where + " ORDER BY id", (node_ids,))
        ]
        return records, events

    def read_serials(self, db: psycopg.Connection[Any], serials: list[str]) -> list[SerialRecord]:
        """The reliability records of these serials the tier holds (a GPU moved in from elsewhere)."""
        rows = db.execute("SELECT record FROM gpu_reliability WHERE serial = ANY(%s)", (serials,))
        return list(serial_records(rows).values())

    def read_events(self, db: psycopg.Connection[Any], ids: list[int]) -> list[events_pb2.Event]:
        """Events by id (what a peer's NOTIFY named), oldest first."""
        rows = db.execute("SELECT event FROM events WHERE id = ANY(%s) ORDER BY id", (ids,))
        return [events_pb2.Event.FromString(blob) for (blob,) in rows]


def _many(cursor: psycopg.Cursor[Any], query: str, rows: Sequence[Sequence[Any]]) -> None:
    """``executemany``, skipping the round trip when there is nothing to write."""
    if rows:
        cursor.executemany(query, rows)


def _gist(exc: psycopg.Error) -> str:
    """psycopg's message, on one line."""
    return " ".join(str(exc).split())
