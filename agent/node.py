"""One node's agent loop: sample the source every interval, hand reports to the uplink."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import gpufleet
from agent.sanity import drop_implausible
from agent.sources.base import GpuSource
from agent.uplink import Uplink
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
        max_buffered_reports: int = 360,
    ) -> None:
        self.source = source
        self.identity = identity
        self.schedule = schedule
        self._blocking = blocking_source
        self._collectors = list(collectors)
        self._max_buffered = max_buffered_reports
        self._invalid_values_dropped = 0
        self.uplink: Uplink | None = None

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` off the event loop if the source blocks (NVML does)."""
        return await asyncio.to_thread(fn) if self._blocking else fn()

    async def sample(self, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        gpus = await self._call(functools.partial(self.source.sample, with_processes=with_processes))
        for gpu in gpus:
            self._invalid_values_dropped += drop_implausible(gpu)
        return gpus

    async def run(self, stop: asyncio.Event) -> None:
        inventory = await self._call(functools.partial(node_inventory, self.source, self.identity))
        self.uplink = uplink = Uplink(
            self._collectors,
            inventory,
            report_interval_s=self.schedule.interval_s,
            max_buffered_reports=self._max_buffered,
        )
        uplink_task = asyncio.create_task(uplink.run(stop), name=f"uplink-{self.identity.hostname}")
        try:
            await self._sample_loop(uplink, stop)
        finally:
            stop.set()
            await uplink_task

    async def _sample_loop(self, uplink: Uplink, stop: asyncio.Event) -> None:
        schedule = self.schedule
        if await _sleep_or_stop(stop, schedule.start_delay_s):
            return
        next_at = time.monotonic()
        next_processes_at = next_at
        while not stop.is_set():
            with_processes = time.monotonic() >= next_processes_at
            if with_processes:
                next_processes_at += schedule.process_interval_s
            gpus = await self.sample(with_processes)
            uplink.stats.invalid_values_dropped_total = self._invalid_values_dropped
            uplink.stats.nvml_errors_total = getattr(self.source, "errors_total", 0)
            uplink.submit(gpus)
            next_at += schedule.interval_s
            if await _sleep_or_stop(stop, max(next_at - time.monotonic(), 0.0)):
                return


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True if ``stop`` was set meanwhile."""
    if seconds > 0:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()
