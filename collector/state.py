"""The fleet as the collector knows it: nodes, their GPUs, latest samples and verdicts.

Sinks (the exposition, the query API) read it; ``FleetState`` tells listeners which
node changed so they redo only that node's work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from collector import health
from gpufleet.v1 import ingest_pb2, inventory_pb2, query_pb2, telemetry_pb2

log = logging.getLogger(__name__)

UP = query_pb2.NODE_STATE_UP
STALE = query_pb2.NODE_STATE_STALE
DOWN = query_pb2.NODE_STATE_DOWN
NODE_STATE_NAMES = {UP: "up", STALE: "stale", DOWN: "down"}

# A GPU whose utilization is below this is idle (it is worth nothing then).
IDLE_UTILIZATION_PERCENT = 5


@dataclass
class GpuRecord:
    inventory: inventory_pb2.GpuInventory
    sample: telemetry_pb2.GpuSample | None = None
    verdict: health.Verdict = health.HEALTHY_VERDICT
    # Cumulative XID counts per code, for the counter metric.
    xid_totals: dict[int, int] = field(default_factory=dict)
    # XID counts since the node booted, for the verdict.
    xids_this_boot: dict[int, int] = field(default_factory=dict)
    processes: int | None = None

    @property
    def model(self) -> str:
        return self.inventory.name or "unknown"

    def is_idle(self) -> bool:
        s = self.sample
        return (
            s is not None
            and s.read_status == telemetry_pb2.GPU_READ_STATUS_OK
            and s.HasField("gpu_utilization_percent")
            and s.gpu_utilization_percent < IDLE_UTILIZATION_PERCENT
        )


@dataclass
class NodeRecord:
    node_id: str
    name: str
    inventory: inventory_pb2.NodeInventory
    interval_s: float
    state: query_pb2.NodeState = UP
    last_seen_unix_ns: int = 0
    last_seen_monotonic: float = 0.0
    last_sequence: int = 0
    gpus: dict[int, GpuRecord] = field(default_factory=dict)
    agent_stats: telemetry_pb2.AgentStats = field(default_factory=telemetry_pb2.AgentStats)
    streams: int = 0

    @property
    def cluster(self) -> str:
        return self.inventory.cluster

    def gpu_verdict(self, gpu: GpuRecord) -> health.Verdict:
        return gpu.verdict if self.state == UP else health.UNREACHABLE_VERDICT


@dataclass(frozen=True)
class Liveness:
    """A node is stale after this many missed report intervals, and down after more."""

    stale_after_intervals: float = 3.0
    down_after_intervals: float = 10.0


Listener = Callable[[NodeRecord], None]


class FleetState:
    def __init__(self, liveness: Liveness | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.liveness = liveness or Liveness()
        self._clock = clock
        self._nodes: dict[str, NodeRecord] = {}
        self._ids_by_name: dict[str, str] = {}
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _changed(self, node: NodeRecord) -> None:
        for listener in self._listeners:
            listener(node)

    def __len__(self) -> int:
        return len(self._nodes)

    def nodes(self) -> Iterator[NodeRecord]:
        return iter(self._nodes.values())

    def find(self, key: str) -> NodeRecord | None:
        """A node by id or by name."""
        node = self._nodes.get(key)
        if node is None and key in self._ids_by_name:
            node = self._nodes.get(self._ids_by_name[key])
        return node

    def hello(self, hello: ingest_pb2.Hello) -> NodeRecord:
        """A node opened a stream: register it or refresh its inventory."""
        inventory = hello.inventory
        interval_s = (hello.report_interval_ms or 10_000) / 1000
        node = self._nodes.get(inventory.node_id)
        if node is None:
            node = NodeRecord(inventory.node_id, self._unique_name(inventory), inventory, interval_s)
            self._nodes[node.node_id] = node
            self._ids_by_name[node.name] = node.node_id
            log.info("node %s (%s) registered with %d GPUs", node.name, node.node_id, len(inventory.gpus))
        else:
            if node.inventory.boot_id != inventory.boot_id:
                node.last_sequence = 0
                for gpu in node.gpus.values():
                    gpu.xids_this_boot.clear()
            node.interval_s = interval_s
        self._set_inventory(node, inventory)
        node.streams += 1
        self._mark_seen(node)
        self._changed(node)
        return node

    def disconnected(self, node: NodeRecord) -> None:
        node.streams = max(node.streams - 1, 0)

    def _unique_name(self, inventory: inventory_pb2.NodeInventory) -> str:
        name = inventory.hostname or inventory.node_id
        if name in self._ids_by_name:
            name = f"{name}~{inventory.node_id[:8]}"
        return name

    def _set_inventory(self, node: NodeRecord, inventory: inventory_pb2.NodeInventory) -> None:
        node.inventory = inventory
        gpus = {gpu.index: gpu for gpu in inventory.gpus}
        for index, gpu_inventory in gpus.items():
            record = node.gpus.get(index)
            if record is None:
                node.gpus[index] = GpuRecord(gpu_inventory)
            else:
                record.inventory = gpu_inventory
        for index in set(node.gpus) - set(gpus):
            del node.gpus[index]

    def apply_report(self, node: NodeRecord, report: ingest_pb2.Report) -> bool:
        """Take a report in; False if it was a duplicate (already taken in)."""
        if report.sequence <= node.last_sequence:
            return False
        node.last_sequence = report.sequence
        if report.HasField("inventory"):
            self._set_inventory(node, report.inventory)
        for sample in report.gpus:
            gpu = node.gpus.get(sample.index)
            if gpu is None:
                gpu = node.gpus[sample.index] = GpuRecord(inventory_pb2.GpuInventory(index=sample.index))
            self._apply_sample(gpu, sample)
        node.agent_stats = report.agent_stats
        node.last_seen_unix_ns = time.time_ns()
        self._mark_seen(node)
        self._changed(node)
        return True

    @staticmethod
    def _apply_sample(gpu: GpuRecord, sample: telemetry_pb2.GpuSample) -> None:
        for event in sample.xid_events:
            gpu.xid_totals[event.code] = gpu.xid_totals.get(event.code, 0) + 1
            gpu.xids_this_boot[event.code] = gpu.xids_this_boot.get(event.code, 0) + 1
        if sample.HasField("processes"):
            gpu.processes = len(sample.processes.processes)
        gpu.sample = sample
        gpu.verdict = health.judge(sample, gpu.xids_this_boot)

    def _mark_seen(self, node: NodeRecord) -> None:
        node.last_seen_monotonic = self._clock()
        if not node.last_seen_unix_ns:
            node.last_seen_unix_ns = time.time_ns()
        if node.state != UP:
            log.info("node %s is up", node.name)
            node.state = UP

    def sweep(self) -> list[NodeRecord]:
        """Move nodes that stopped reporting to stale, then down; return those that changed."""
        now = self._clock()
        changed = []
        for node in self._nodes.values():
            silent_intervals = (now - node.last_seen_monotonic) / node.interval_s
            if silent_intervals >= self.liveness.down_after_intervals:
                state = DOWN
            elif silent_intervals >= self.liveness.stale_after_intervals:
                state = STALE
            else:
                state = UP
            if state != node.state:
                log.info("node %s is %s", node.name, NODE_STATE_NAMES[state])
                node.state = state
                changed.append(node)
                self._changed(node)
        return changed
