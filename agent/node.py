"""One node's agent loop: sample the source every interval, hand reports to the uplink."""

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
from agent.sources.base import GpuSource
from agent.spool import Spool
from agent.uplink import Uplink
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


# Fields whose change is an event worth keeping through a full buffer.
EVENT_FIELDS = (
    "ecc_uncorrected_volatile",
    "ecc_uncorrected_aggregate",
    "remapped_rows_uncorrectable",
    "row_remap_pending",
    "row_remap_failure",
    "recovery_action",
)


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
    ) -> None:
        self.source = source
        self.identity = identity
        self.schedule = schedule
        self._blocking = blocking_source
        self._collectors = list(collectors)
        self._delivery = delivery or Delivery()
        self._invalid_values_dropped = 0
        self._xids_seen = 0
        self._memory_errors: dict[int, tuple[object, ...]] = {}
        self.uplink: Uplink | None = None

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` off the event loop if the source blocks (NVML does)."""
        return await asyncio.to_thread(fn) if self._blocking else fn()

    async def sample(self, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        gpus = await self._call(functools.partial(self.source.sample, with_processes=with_processes))
        for gpu in gpus:
            self._invalid_values_dropped += drop_implausible(gpu)
            self._xids_seen += len(gpu.xid_events)
        return gpus

    def _memory_errors_changed(self, gpus: Sequence[telemetry_pb2.GpuSample]) -> bool:
        """True if an ECC or row-remap counter moved since the previous sample (an event)."""
        changed = False
        for gpu in gpus:
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
        )

    async def run(self, stop: asyncio.Event) -> None:
        inventory = await self._call(functools.partial(node_inventory, self.source, self.identity))
        self.uplink = uplink = self._uplink(inventory)
        uplink_task = asyncio.create_task(uplink.run(stop), name=f"uplink-{self.identity.hostname}")
        try:
            await self._sample_loop(uplink, inventory, stop)
        finally:
            stop.set()
            await uplink_task

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
                current = await self._call(functools.partial(node_inventory, self.source, self.identity))
                if current != inventory:
                    log.info("inventory of %s changed; telling the collector", self.identity.hostname)
                    inventory = current
                    uplink.update_inventory(current)
            gpus = await self.sample(with_processes)
            uplink.stats.invalid_values_dropped_total = self._invalid_values_dropped
            uplink.stats.nvml_errors_total = getattr(self.source, "errors_total", 0)
            uplink.stats.xid_events_total = self._xids_seen
            uplink.submit(gpus, carries_events=self._memory_errors_changed(gpus))
            next_at += schedule.interval_s
            if await _sleep_or_stop(stop, max(next_at - time.monotonic(), 0.0)):
                return


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True if ``stop`` was set meanwhile."""
    if seconds > 0:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()
