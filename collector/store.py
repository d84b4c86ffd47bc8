"""Persistence: the fleet's inventory, per-node watermarks, XID totals, verdicts, the GPUs'
reliability records and the event log.

An embedded SQLite database in WAL mode. Changes are committed in small groups
(group commit): the ingest path acknowledges a report only once the batch that
holds it is committed, so a report acknowledged is a report that survives a
crash of the collector (synchronous=NORMAL in WAL mode survives a process crash,
not a power cut).

A database that cannot be used never takes the collector down, and a database that
is only busy is never thrown away: a file locked by another process is retried, then
the collector refuses to start (one line says which process to stop); a read-only or
unreachable one leaves the collector running from memory, with a log line and
`gpufleet_collector_store_up 0`. Only a file that fails SQLite's integrity check is
moved aside (and the log says where, or that the move failed). A write that fails for
any reason takes the store down the same way; the reports of that batch are not
acknowledged (their streams end with UNAVAILABLE and the agents resend them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet import event_kinds as kinds
from gpufleet.collector import health
from gpufleet.collector.eventlog import MIN_EVENTS_PER_NODE
from gpufleet.collector.reliability import SerialRecord
from gpufleet.collector.selfmetrics import CollectorMetrics
from gpufleet.collector.sinks import Sink
from gpufleet.collector.state import FleetState, GpuRecord, NodeRecord
from gpufleet.v1 import events_pb2, inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    interval_s REAL NOT NULL,
    last_seen_unix_ns INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL,
    inventory BLOB NOT NULL,
    missing_gpus BLOB NOT NULL,
    agent_stats BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS xid_totals (
    node_id TEXT NOT NULL,
    gpu_index INTEGER NOT NULL,
    xid INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (node_id, gpu_index, xid)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time_unix_ns INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    event BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_node ON events (node_id, id);
CREATE TABLE IF NOT EXISTS gpu_health (
    node_id TEXT NOT NULL,
    gpu_index INTEGER NOT NULL,
    health INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    action TEXT NOT NULL,
    xids_this_boot TEXT NOT NULL,
    PRIMARY KEY (node_id, gpu_index)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_reliability (
    serial TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    record TEXT NOT NULL,
    updated_unix_nano INTEGER NOT NULL
);
"""
# How long a batch waits for more changes before it is committed.
COMMIT_DELAY_S = 0.01
# A database locked by another process is tried this often, this long apart, before giving up.
LOCKED_RETRIES = 3
LOCKED_RETRY_S = 1.0
# A commit taking longer than this makes the collector not ready (/readyz 503).
STALLED_AFTER_S = 10.0
# SQLite's primary result codes (sqlite3.h).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CORRUPT, SQLITE_NOTADB = 5, 6, 11, 26


class StoreUnavailable(Exception):
    """The database cannot be used; the collector runs from memory."""


class StoreBusy(Exception):
    """The database is locked by another process: it is not ours to use, nor to discard."""


class CommitFailed(Exception):
    """The batch holding a change could not be committed: what it holds must not be acknowledged."""


@dataclass
class Batch:
    # Rows of nodes whose inventory changed, and (node_id -> watermark row) of the others.
    nodes: dict[str, tuple[object, ...]] = field(default_factory=dict)
    watermarks: dict[str, tuple[object, ...]] = field(default_factory=dict)
    xids: dict[tuple[str, int, int], int] = field(default_factory=dict)
    events: list[tuple[int, int, str, bytes]] = field(default_factory=list)
    meta: dict[str, int] = field(default_factory=dict)
    forgotten: list[str] = field(default_factory=list)
    verdicts: list[tuple[object, ...]] = field(default_factory=list)
    events_per_node: int = MIN_EVENTS_PER_NODE
    # XID counts as totals to set, not increments to add (after a reconnection: what was missed).
    xid_totals: dict[tuple[str, int, int], int] = field(default_factory=dict)
    # serial -> (the node it is installed in, its gpu_reliability row): records that changed.
    reliability: dict[str, tuple[str, tuple[object, ...]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.nodes
            or self.watermarks
            or self.xids
            or self.events
            or self.meta
            or self.forgotten
            or self.verdicts
            or self.xid_totals
            or self.reliability
        )


def open_database(path: Path) -> sqlite3.Connection:
    """Open (or create) the database. Locked: retried, then StoreBusy. Only a corrupt file is replaced."""
    for attempt in range(LOCKED_RETRIES):
        try:
            return _connect(path)
        except sqlite3.DatabaseError as exc:
            kind = _failure_kind(exc)
            if kind == "busy":
                if attempt + 1 < LOCKED_RETRIES:
                    log.warning("database %s is locked by another process; retrying", path)
                    time.sleep(LOCKED_RETRY_S)
                    continue
                raise StoreBusy(
                    f"database {path} is locked by another process (another collector on the same --db?); "
                    "stop it or give this collector its own --db"
                ) from exc
            if kind == "unavailable" or not path.exists():
                raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
            return _replace_corrupt(path, exc)
    raise AssertionError("not reached")


def _failure_kind(exc: sqlite3.DatabaseError) -> str:
    """'busy' (locked by another process), 'unavailable' (read-only, no access, I/O) or 'corrupt'."""
    code = getattr(exc, "sqlite_errorcode", None)
    message = str(exc).lower()
    if code is not None:
        primary = code & 0xFF
        if primary in (SQLITE_BUSY, SQLITE_LOCKED):
            return "busy"
        if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
            return "corrupt"
        return "unavailable"
    if "locked" in message or "busy" in message:
        return "busy"
    if isinstance(exc, sqlite3.OperationalError):
        return "unavailable"
    return "corrupt"


def _replace_corrupt(path: Path, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        path.rename(aside)
    except OSError as move:
        raise StoreUnavailable(
            f"database {path} is corrupt ({exc}) and could not be moved aside ({move.strerror}); "
            "it was left as it is"
        ) from move
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(OSError):
            Path(f"{path}{suffix}").rename(Path(f"{aside}{suffix}"))
    log.error(
        "database %s failed its integrity check (%s): moved it to %s; starting a new one", path, exc, aside
    )
    try:
        return _connect(path)
    except sqlite3.DatabaseError as again:
        raise StoreUnavailable(f"cannot create {path}: {again}") from again


def open_read_only(path: Path) -> sqlite3.Connection:
    """The database opened read-only, to restore the fleet from a file the collector may not write."""
    uri = path.resolve().as_uri()
    # A WAL database on a read-only file system cannot make its -shm file: then read it as immutable.
    for mode in ("mode=ro", "immutable=1"):
        connection = sqlite3.connect(f"{uri}?{mode}", uri=True, check_same_thread=False)
        try:
            connection.execute("SELECT count(*) FROM nodes").fetchone()
            break
        except sqlite3.OperationalError:
            connection.close()
            if mode == "immutable=1":
                raise
    return connection


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=LOCKED_RETRY_S)
    try:
        integrity = connection.execute("PRAGMA quick_check").fetchone()[0]
        if integrity != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {integrity}")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(f"{path} was written by a newer collector (schema {version})")
        connection.executescript(SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(nodes)")}
        if "agent_stats" not in columns:  # version 2: the agent's counters were not kept
            connection.execute("ALTER TABLE nodes ADD COLUMN agent_stats BLOB NOT NULL DEFAULT x''")
        connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        connection.close()
        raise
    return connection


class Store(Sink):
    """Keeps FleetState durable; `durable()` waits until everything changed so far is committed.

    The batching, the waiting and the failure handling are here; the engine is SQLite, or
    PostgreSQL in `store_postgres.py` (a subclass that replaces opening, restoring and writing).
    """

    name = "store"
    # Errors of the engine itself: logged in one line, where anything else (a bug) shows its traceback.
    engine_errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    # Whether a report may be acknowledged while the database is down (served from memory). Not
    # in a tier: another collector would take the node from the database without it.
    acknowledge_when_down = True

    def __init__(self, path: Path | None, state: FleetState, metrics: CollectorMetrics) -> None:
        self.path = path
        self._state = state
        self._metrics = metrics
        self._db: Any = None  # the engine's connection while the store is up
        self._dirty: set[str] = set()
        self._pending = Batch()
        self._written_inventory: dict[str, int] = {}
        self._written_health: dict[str, int] = {}
        # serial -> the version of its reliability record the database holds.
        self._written_reliability: dict[str, int] = {}
        self._pending_since: float | None = None
        self._meta: dict[str, int] = {}
        self._wake = asyncio.Event()
        # Resolved by the next flush to start; what changed before it is in that flush.
        self._next_commit: asyncio.Future[None] | None = None
        self._flushing = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self._db is not None

    def describe(self) -> str:
        """Where the fleet is kept, for log lines."""
        return str(self.path)

    async def open_async(self) -> None:
        """Open (the collector's start calls this; an engine that connects over the network waits here)."""
        self.open()

    def open(self) -> None:
        """Open the database and restore the fleet it holds; failures leave the store down.

        Raises StoreBusy when another process holds the database: that is not a
        database to run without, nor one to replace.
        """
        if self.path is None:
            log.info("no database configured: the fleet is kept in memory only")
            self._metrics.store_up.set(0)
            return
        try:
            self._db = open_database(self.path)
            self._restore(self._db)
        except StoreBusy:
            raise
        except (StoreUnavailable, sqlite3.Error, OSError) as exc:
            self._down(f"cannot use database {self.path}: {exc}")
            self._restore_read_only()
            return
        self._metrics.store_up.set(1)
        self._dirty.clear()  # what was just read back is what the database holds

    def _restore_read_only(self) -> None:
        """Show the fleet a database holds even when it cannot be written (read-only file system)."""
        assert self.path is not None
        if not self.path.exists():
            return
        try:
            db = open_read_only(self.path)
        except sqlite3.Error as exc:
            log.error("cannot read database %s either (%s): starting with an empty fleet", self.path, exc)
            return
        try:
            self._restore(db)
            log.warning("restored the fleet from %s read-only; changes are kept in memory only", self.path)
        except sqlite3.Error as exc:
            log.error("cannot read database %s (%s): starting with an empty fleet", self.path, exc)
        finally:
            db.close()

    def _down(self, message: str) -> None:
        log.error("%s; running from memory: nothing will survive a restart", message)
        self._metrics.store_up.set(0)
        self._metrics.store_errors.inc()
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
        self._db = None

    def _restore(self, db: Any) -> None:
        records = build_records(
            db.execute(f"SELECT {XID_COLUMNS} FROM xid_totals"),
            db.execute(f"SELECT {HEALTH_COLUMNS} FROM gpu_health"),
            db.execute(f"SELECT {NODE_COLUMNS} FROM nodes"),
        )
        # Every record, also of GPUs on no node now (taken out, perhaps for RMA).
        serials = serial_records(db.execute("SELECT record FROM gpu_reliability"))
        for record in serials.values():
            self._restore_serial(record)
        attach_serial_records(records, serials)
        self.adopt(records)
        self._meta = dict(db.execute("SELECT key, value FROM meta"))
        events = db.execute("SELECT event FROM events ORDER BY id")
        self._state.events.restore(events_pb2.Event.FromString(blob) for (blob,) in events)
        log.info("restored %d nodes and the event log from %s", len(records), self.describe())

    def adopt(self, records: list[NodeRecord]) -> None:
        """Nodes read back from the database into the fleet (what it holds of them need not be written),
        with the reliability records of their GPUs' serials (``attach_serial_records``)."""
        for node in records:
            for gpu in node.gpus.values():
                if gpu.serial_record is not None:
                    self._restore_serial(gpu.serial_record)
            self._state.restore(node)
            self._written_inventory[node.node_id] = node.inventory_version
            self._written_health[node.node_id] = node.health_version
            self._dirty.discard(node.node_id)

    def restore_serials(self, records: Iterable[SerialRecord]) -> None:
        """Reliability records read from the database (by another collector's hand) into memory."""
        for record in records:
            self._restore_serial(record)

    def _restore_serial(self, record: SerialRecord) -> None:
        """A reliability record as the database holds it, unless memory holds changes not yet written."""
        known = self._state.reliability.find(record.serial)
        if known is not None and known.version != self._written_reliability.get(known.serial):
            return
        self._state.reliability.restore(record)
        self._written_reliability[record.serial] = record.version

    def get_meta(self, key: str, default: int = 0) -> int:
        """A small named number kept with the fleet (e.g. how far the MQTT publisher got)."""
        return self._meta.get(key, default)

    def set_meta(self, key: str, value: int) -> None:
        self._meta[key] = value
        if self._db is not None:
            self._pending.meta[key] = value
            self._wake.set()

    # -- collecting changes (on the event loop) ---------------------------------------------

    def node_changed(self, node: NodeRecord) -> None:
        if self._db is not None:
            self._dirty.add(node.node_id)

    def node_removed(self, node: NodeRecord) -> None:
        self._dirty.discard(node.node_id)  # its rows go with its node_forgotten event

    def event(self, event: events_pb2.Event) -> None:
        if self._db is None:
            return
        batch = self._pending
        batch.events.append((event.id, event.time_unix_nano, event.node_id, event.SerializeToString()))
        if event.kind == kinds.NODE_FORGOTTEN:
            batch.forgotten.append(event.node_id)
            self._written_inventory.pop(event.node_id, None)
            self._written_health.pop(event.node_id, None)
        if event.kind == kinds.XID and event.HasField("gpu_index"):
            key = (event.node_id, event.gpu_index, int(event.attributes["xid"]))
            batch.xids[key] = batch.xids.get(key, 0) + 1
        self._mark_pending()
        self._wake.set()

    def _mark_pending(self) -> None:
        if self._pending_since is None:
            self._pending_since = time.monotonic()

    async def durable(self) -> None:
        """Return once every change made before this call is committed (or the store is down).

        Raises CommitFailed if the commit that held them failed: they must not be acknowledged.
        """
        if self._db is None and not self.acknowledge_when_down:
            raise CommitFailed(f"{self.describe()} is not reachable")
        if self._db is None or not (self._dirty or self._pending or self._flushing):
            return
        if self._next_commit is None:
            self._next_commit = asyncio.get_running_loop().create_future()
        future = self._next_commit
        self._mark_pending()
        self._wake.set()
        await asyncio.shield(future)

    def uncommitted_seconds(self) -> float:
        """How long the oldest change not yet committed has waited (0 when none waits)."""
        since = self._pending_since
        return 0.0 if since is None or self._db is None else time.monotonic() - since

    def stalled(self) -> bool:
        """True when a commit has been waited on for longer than STALLED_AFTER_S."""
        return self.uncommitted_seconds() > STALLED_AFTER_S

    # -- committing (a task, with the writes in a thread) -------------------------------------

    def start(self) -> None:
        if self._db is not None:
            self._task = asyncio.create_task(self._run(), name="store-writer")

    async def stop(self, timeout_s: float | None = None) -> None:
        """Commit what is left, then close (however long the last commit takes: it is what survives)."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await self._task
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self) -> None:
        """The writer: never ends on an error (it takes the store down instead and releases every waiter)."""
        while self._db is not None or await self._back_up():
            await self._wake.wait()
            if not self._stopping:
                await asyncio.sleep(COMMIT_DELAY_S)
            try:
                await self._flush()
            except Exception as exc:
                if not isinstance(exc, self.engine_errors):
                    log.exception("the database writer failed")  # a bug: its traceback helps
                self._down(f"writing to {self.describe()} failed: {type(exc).__name__}: {exc}")
                self._fail_waiters(exc)
            if self._stopping:
                return
        self._fail_waiters(StoreUnavailable("the store is down"))

    def _fail_waiters(self, exc: BaseException) -> None:
        future, self._next_commit = self._next_commit, None
        self._pending_since = None
        if future is not None and not future.done():
            future.set_exception(CommitFailed(str(exc)))
            future.exception()  # retrieved: waiters that went away leave no warning

    async def _flush(self) -> None:
        self._wake.clear()
        done, self._next_commit = self._next_commit, None
        batch, self._pending = self._pending, Batch()
        batch.events_per_node = self._state.events.share()
        try:
            for node_id in self._dirty:
                node = self._state.get(node_id)
                if node is not None:
                    self._collect(batch, node)
            self._dirty.clear()
            self._flushing = True
            if batch and self._db is not None:
                started = time.perf_counter()
                await asyncio.to_thread(self._write, batch)
                self._metrics.store_commit_seconds.observe(time.perf_counter() - started)
        except Exception as exc:
            if done is not None and not done.done():
                done.set_exception(CommitFailed(f"{type(exc).__name__}: {exc}"))
                done.exception()
            raise
        else:
            if done is not None and not done.done():
                done.set_result(None)
        finally:
            self._flushing = False
            self._pending_since = None if self._next_commit is None else time.monotonic()

    async def _back_up(self) -> bool:
        """Once down, whether the store is up again (a SQLite store stays down until a restart)."""
        return False

    def _write(self, batch: Batch) -> None:
        """Commit ``batch`` in one transaction (in the writer's thread)."""
        _write(self._db, batch)

    def _collect(self, batch: Batch, node: NodeRecord) -> None:
        """What of ``node`` changed since it was last written, into ``batch``."""
        node_id = node.node_id
        if self._written_inventory.get(node_id) != node.inventory_version:
            batch.nodes[node_id] = _node_row(node)
            self._written_inventory[node_id] = node.inventory_version
        else:
            batch.watermarks[node_id] = (
                node.interval_s,
                node.last_seen_unix_ns,
                node.last_sequence,
                node.agent_stats.SerializeToString(),
                node_id,
            )
        if self._written_health.get(node_id) != node.health_version:
            batch.verdicts.extend(_health_rows(node))
            self._written_health[node_id] = node.health_version
        for gpu in node.gpus.values():
            record = gpu.serial_record
            # Written by the node the GPU is in: a slot it left (missing) no longer speaks for it.
            if (
                record is None
                or gpu.missing
                or self._written_reliability.get(record.serial) == record.version
            ):
                continue
            row = (record.serial, record.uuid, record.to_json(), time.time_ns())
            batch.reliability[record.serial] = (node_id, row)
            self._written_reliability[record.serial] = record.version


# The columns read back, in the order build_records takes them.
NODE_COLUMNS = (
    "node_id, name, interval_s, last_seen_unix_ns, last_sequence, inventory, missing_gpus, agent_stats"
)
XID_COLUMNS = "node_id, gpu_index, xid, count"
HEALTH_COLUMNS = "node_id, gpu_index, health, reasons, action, xids_this_boot"


def build_records(
    xid_rows: Iterable[Sequence[Any]],
    health_rows: Iterable[Sequence[Any]],
    node_rows: Iterable[Sequence[Any]],
) -> list[NodeRecord]:
    """Nodes as the database holds them: inventory, watermark, XID totals, verdicts (any engine)."""
    xids: dict[str, dict[int, dict[int, int]]] = {}
    for node_id, gpu_index, xid, count in xid_rows:
        xids.setdefault(node_id, {}).setdefault(gpu_index, {})[xid] = count
    verdicts: dict[str, dict[int, tuple[health.Verdict, dict[int, int]]]] = {}
    for node_id, gpu_index, code, reasons, action, boot_xids in health_rows:
        verdict = health.Verdict(code, tuple(json.loads(reasons)), action)
        this_boot = {int(xid): count for xid, count in json.loads(boot_xids).items()}
        verdicts.setdefault(node_id, {})[gpu_index] = (verdict, this_boot)
    records = []
    for node_id, name, interval_s, last_seen, last_sequence, inventory_blob, missing_blob, stats in node_rows:
        inventory = inventory_pb2.NodeInventory.FromString(inventory_blob)
        node = NodeRecord(
            node_id,
            name,
            inventory,
            interval_s,
            last_seen_unix_ns=last_seen,
            last_sequence=last_sequence,
            agent_stats=telemetry_pb2.AgentStats.FromString(stats),
        )
        for gpu in inventory.gpus:
            node.gpus[gpu.index] = GpuRecord(gpu)
        for gpu in inventory_pb2.NodeInventory.FromString(missing_blob).gpus:
            node.gpus[gpu.index] = GpuRecord(gpu, missing=True)
        for gpu_index, totals in xids.get(node_id, {}).items():
            if gpu_index in node.gpus:
                node.gpus[gpu_index].xid_totals = totals
        for gpu_index, (verdict, this_boot) in verdicts.get(node_id, {}).items():
            if gpu_index in node.gpus:
                node.gpus[gpu_index].verdict = verdict
                node.gpus[gpu_index].xids_this_boot = this_boot
        records.append(node)
    return records


def serial_records(rows: Iterable[Sequence[Any]]) -> dict[str, SerialRecord]:
    """Reliability records from gpu_reliability's ``record`` column, by serial (any engine)."""
    records = (SerialRecord.from_json(text) for (text,) in rows)
    return {record.serial: record for record in records}


def attach_serial_records(records: list[NodeRecord], serials: dict[str, SerialRecord]) -> None:
    """Each GPU of the nodes read back to its serial's record, for ``Store.adopt`` to restore first."""
    for node in records:
        for gpu in node.gpus.values():
            gpu.serial_record = serials.get(gpu.inventory.serial) if gpu.inventory.serial else None


def _node_row(node: NodeRecord) -> tuple[object, ...]:
    missing = inventory_pb2.NodeInventory(gpus=[g.inventory for g in node.gpus.values() if g.missing])
    return (
        node.node_id,
        node.name,
        node.interval_s,
        node.last_seen_unix_ns,
        node.last_sequence,
        node.inventory.SerializeToString(),
        missing.SerializeToString(),
        node.agent_stats.SerializeToString(),
    )


def _health_rows(node: NodeRecord) -> list[tuple[object, ...]]:
    """Each GPU's verdict and the XIDs since boot it rests on: what a restart must not forget."""
    return [
        (
            node.node_id,
            index,
            int(gpu.verdict.health),
            json.dumps(gpu.verdict.reasons),
            gpu.verdict.action,
            json.dumps({str(code): count for code, count in gpu.xids_this_boot.items()}),
        )
        for index, gpu in node.gpus.items()
    ]


def _write(db: sqlite3.Connection, batch: Batch) -> None:
    """One transaction for the whole batch."""
    db.execute("BEGIN")
    try:
        db.executemany(
            "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
            "name=excluded.name, interval_s=excluded.interval_s, "
            "last_seen_unix_ns=excluded.last_seen_unix_ns, last_sequence=excluded.last_sequence, "
            "inventory=excluded.inventory, "
            "missing_gpus=excluded.missing_gpus, agent_stats=excluded.agent_stats",
            batch.nodes.values(),
        )
        db.executemany(
            "UPDATE nodes SET interval_s = ?, last_seen_unix_ns = ?, last_sequence = ?, agent_stats = ? "
            "WHERE node_id = ?",
            batch.watermarks.values(),
        )
        db.executemany(
            "INSERT INTO xid_totals VALUES (?, ?, ?, ?) ON CONFLICT (node_id, gpu_index, xid) "
            "DO UPDATE SET count = count + excluded.count",
            ((node_id, gpu, xid, count) for (node_id, gpu, xid), count in batch.xids.items()),
        )
        db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)", batch.events)
        # Each node keeps its own newest events, as in memory: a storm on one never erases another's.
        db.executemany(
            "DELETE FROM events WHERE node_id = ? AND id < (SELECT id FROM events WHERE node_id = ? "
            "ORDER BY id DESC LIMIT 1 OFFSET ?)",
            ((node_id, node_id, batch.events_per_node - 1) for node_id in {e[2] for e in batch.events}),
        )
        db.executemany("INSERT OR REPLACE INTO gpu_health VALUES (?, ?, ?, ?, ?, ?)", batch.verdicts)
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", batch.meta.items())
        db.executemany(
            "INSERT OR REPLACE INTO gpu_reliability VALUES (?, ?, ?, ?)",
            (row for _, row in batch.reliability.values()),
        )
        # A forgotten node's GPUs keep their records: a serial outlives its node.
        for table in ("nodes", "xid_totals", "gpu_health"):
            db.executemany(f"DELETE FROM {table} WHERE node_id = ?", ((n,) for n in batch.forgotten))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
