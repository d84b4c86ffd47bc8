"""One node's agent loop: sample the source every interval, hand reports to the uplink.

A source that raises is counted (AgentStats.nvml_errors_total) and logged once per kind;
its GPUs are reported with read_status ERROR and the node tries again next interval. A
node that cannot go on at all ends alone: its uplink flushes, the other nodes carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import gpufleet
from gpufleet.agent.attribution.refresh import Attribution
from gpufleet.agent.sources.base import GpuSource
from gpufleet.agent.spool import Spool
from gpufleet.agent.uplink import FAILBACK_AFTER_S, Uplink
from gpufleet.plausible import drop_implausible
from gpufleet.security import ClientSecurity
from gpufleet.v1 import inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    hostname: str
    boot_id: str
    datacenter: str = ""
    cluster: str = ""
    rack: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule:
    interval_s: float = 10.0
    # Process lists cost milliseconds per GPU in NVML: poll them less often.
    process_interval_s: float = 30.0
    # Delay before the first sample, to spread many nodes over time.
    start_delay_s: float = 0.0
    # How often the inventory is read again (GPUs added, removed, replaced; driver upgrades).
    inventory_interval_s: float = 300.0


def node_inventory(source: GpuSource, identity: NodeIdentity) -> inventory_pb2.NodeInventory:
    """The source's inventory with this node's identity and labels filled in."""
    inventory = source.inventory()
    inventory.node_id = identity.node_id
    inventory.hostname = identity.hostname
    inventory.boot_id = identity.boot_id
    inventory.datacenter = identity.datacenter
    inventory.cluster = identity.cluster
    inventory.rack = identity.rack
    inventory.labels.update(identity.labels)
    inventory.agent_version = gpufleet.__version__
    return inventory


@dataclass(frozen=True)
class Delivery:
    """How reports reach the collector."""

    max_buffered_reports: int = 360
    spool_dir: Path | None = None
    keepalive_s: float = 30.0
    security: ClientSecurity = field(default_factory=ClientSecurity)
    # On a collector other than the node's first-ranked: seconds before asking for that one again.
    failback_after_s: float = FAILBACK_AFTER_S


# Fields whose change is an event worth keeping through a full buffer.
EVENT_FIELDS = (
    "ecc_uncorrected_volatile",
    "ecc_uncorrected_aggregate",
    "remapped_rows_uncorrectable",
    "row_remap_pending",
    "row_remap_failure",
    "recovery_action",
)
# A node agent whose source cannot give an inventory this many times in a row at start gives
# up for good (when every node agent has, the process exits non-zero and is restarted).
START_ATTEMPTS = 5

# (where, exception type) of the source failures logged so far: each kind is logged once per
# process, however many simulated nodes hit it, and every occurrence is counted.
_logged_failures: set[tuple[str, str]] = set()


class NodeFailed(Exception):
    """This node agent cannot go on (its source never gave an inventory); the others carry on."""


class NodeAgent:
    """Samples one node's GPUs and streams them through an Uplink."""

    def __init__(
        self,
        source: GpuSource,
        identity: NodeIdentity,
        collectors: Sequence[str],
        schedule: Schedule,
        *,
        blocking_source: bool,
        delivery: Delivery | None = None,
        attribution: Attribution | None = None,
    ) -> None:
        self.source = source
        self.identity = identity
        self.schedule = schedule
        self._blocking = blocking_source
        self._collectors = list(collectors)
        self._delivery = delivery or Delivery()
        self._invalid_values_dropped = 0
        self._xids_seen = 0
        self._source_failures = 0
        self._memory_errors: dict[int, tuple[object, ...]] = {}
        self.uplink: Uplink | None = None
        self.attribution = attribution
        self._allocations: object = None  # the last Allocations sent

    @property
    def source_errors_total(self) -> int:
        """The source's own error count, and the times it raised instead of reporting."""
        return self.source.errors_total + self._source_failures

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` off the event loop if the source blocks (NVML does)."""
        return await asyncio.to_thread(fn) if self._blocking else fn()

    async def sample(self, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        gpus = await self._call(functools.partial(self.source.sample, with_processes=with_processes))
        for gpu in gpus:
            self._invalid_values_dropped += drop_implausible(gpu)
            self._xids_seen += len(gpu.xid_events)
        return gpus

    def _source_failed(self, where: str, exc: Exception) -> None:
        """Count a source that raised, and log each kind (where, exception type) once."""
        self._source_failures += 1
        kind = (where, type(exc).__name__)
        if kind in _logged_failures:
            return
        _logged_failures.add(kind)
        log.warning(
            "%s: %s failed: %s: %s; the node carries on (logged once, counted in nvml_errors_total)",
            self.identity.hostname,
            where,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    async def _read_inventory(self) -> inventory_pb2.NodeInventory:
        return await self._call(functools.partial(node_inventory, self.source, self.identity))

    async def _first_inventory(self, stop: asyncio.Event) -> inventory_pb2.NodeInventory | None:
        """The inventory to say hello with, tried once an interval; None if stopped meanwhile."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return await self._read_inventory()
            except Exception as exc:
                self._source_failed("reading the inventory", exc)
                if attempt == START_ATTEMPTS:
                    raise NodeFailed(
                        f"{self.identity.hostname}: no inventory after {attempt} attempts "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
            if await _sleep_or_stop(stop, self.schedule.interval_s):
                return None
        return None

    async def _sample_or_report_failure(
        self, with_processes: bool, inventory: inventory_pb2.NodeInventory
    ) -> list[telemetry_pb2.GpuSample]:
        """The GPUs' samples; if the source raised, an ERROR sample per GPU that says so."""
        try:
            return await self.sample(with_processes)
        except Exception as exc:
            self._source_failed("sampling", exc)
            reason = f"reading the GPUs failed ({type(exc).__name__}: {exc}); retrying next interval"
            return [
                telemetry_pb2.GpuSample(
                    index=gpu.index, read_status=telemetry_pb2.GPU_READ_STATUS_ERROR, read_error=reason
                )
                for gpu in inventory.gpus
            ]

    def _memory_errors_changed(self, gpus: Sequence[telemetry_pb2.GpuSample]) -> bool:
        """True if an ECC or row-remap counter moved since the previous sample (an event)."""
        changed = False
        for gpu in gpus:
            if gpu.read_status == telemetry_pb2.GPU_READ_STATUS_ERROR:
                continue  # nothing was read: the counters did not move
            values = tuple(getattr(gpu, name) if gpu.HasField(name) else None for name in EVENT_FIELDS)
            previous = self._memory_errors.get(gpu.index)
            changed |= previous is not None and previous != values
            self._memory_errors[gpu.index] = values
        return changed

    def _uplink(self, inventory: inventory_pb2.NodeInventory) -> Uplink:
        delivery = self._delivery
        spool = None
        if delivery.spool_dir is not None:
            spool = Spool(delivery.spool_dir, self.identity.node_id, self.identity.boot_id)
        return Uplink(
            self._collectors,
            inventory,
            report_interval_s=self.schedule.interval_s,
            max_buffered_reports=delivery.max_buffered_reports,
            spool=spool,
            keepalive_s=delivery.keepalive_s,
            security=delivery.security,
            failback_after_s=delivery.failback_after_s,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Report until ``stop`` is set. Raises only when this node cannot go on (NodeFailed, a bug)."""
        inventory = await self._first_inventory(stop)
        if inventory is None:
            return
        self.uplink = uplink = self._uplink(inventory)
        # This node's own stop for its uplink: if this node ends, the other nodes carry on.
        done = asyncio.Event()
        uplink_task = asyncio.create_task(uplink.run(done), name=f"uplink-{self.identity.hostname}")
        try:
            await self._sample_loop(uplink, inventory, stop)
        finally:
            done.set()
            await uplink_task

    async def _reread_inventory(
        self, uplink: Uplink, inventory: inventory_pb2.NodeInventory
    ) -> inventory_pb2.NodeInventory:
        """The inventory now; the one before if the source raised. A change goes to the collector."""
        try:
            current = await self._read_inventory()
        except Exception as exc:
            self._source_failed("reading the inventory", exc)
            return inventory
        if current != inventory:
            log.info("inventory of %s changed; telling the collector", self.identity.hostname)
            uplink.update_inventory(current)
        return current

    async def _sample_loop(
        self, uplink: Uplink, inventory: inventory_pb2.NodeInventory, stop: asyncio.Event
    ) -> None:
        schedule = self.schedule
        if await _sleep_or_stop(stop, schedule.start_delay_s):
            return
        next_at = time.monotonic()
        next_processes_at = next_at
        next_inventory_at = next_at + schedule.inventory_interval_s
        while not stop.is_set():
            now = time.monotonic()
            with_processes = now >= next_processes_at
            if with_processes:
                next_processes_at += schedule.process_interval_s
            if now >= next_inventory_at:
                next_inventory_at += schedule.inventory_interval_s
                inventory = await self._reread_inventory(uplink, inventory)
            gpus = await self._sample_or_report_failure(with_processes, inventory)
            if self.source.inventory_stale:  # NVML came back: the report carries the inventory
                inventory = await self._reread_inventory(uplink, inventory)
            uplink.stats.invalid_values_dropped_total = self._invalid_values_dropped
            uplink.stats.nvml_errors_total = self.source_errors_total
            uplink.stats.xid_events_total = self._xids_seen
            await self._attribute(uplink, inventory, gpus)
            uplink.submit(gpus, carries_events=self._memory_errors_changed(gpus))
            next_at += schedule.interval_s
            if await _sleep_or_stop(stop, max(next_at - time.monotonic(), 0.0)):
                return

    async def _attribute(
        self, uplink: Uplink, inventory: inventory_pb2.NodeInventory, gpus: Sequence[telemetry_pb2.GpuSample]
    ) -> None:
        """Who holds the GPUs now; a change goes to the collector with this report."""
        attribution = self.attribution
        if attribution is None:
            return
        try:
            allocations = await attribution.refresh(inventory, gpus)
        except Exception as exc:  # a bug in a source must not stop the node's telemetry
            self._source_failed("attribution", exc)
            return
        finally:
            uplink.stats.attribution_errors_total = attribution.errors_total
            uplink.stats.attribution_values_truncated_total = attribution.truncated_total
        if allocations != self._allocations:
            self._allocations = allocations
            uplink.update_allocations(allocations)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True if ``stop`` was set meanwhile."""
    if seconds > 0:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()
