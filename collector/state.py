"""The fleet as the collector knows it: nodes, their GPUs, latest samples and verdicts.

The state records what changes; its sinks are told which node changed (so they redo only
that node's work), and its recorder turns what happened into events for operators.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gpufleet.collector import health
from gpufleet.collector.admission import TokenBucket
from gpufleet.collector.eventlog import CRITICAL, INFO, WARNING, EventLog
from gpufleet.collector.recorder import EventBudget, EventRecorder
from gpufleet.collector.reliability import Reliability, SerialRecord
from gpufleet.collector.sinks import Sinks
from gpufleet.definitions import IDLE_UTILIZATION_PERCENT
from gpufleet.v1 import allocation_pb2, ingest_pb2, inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)


class NodeState(enum.IntEnum):
    """A node's liveness (the same numbers as the wire contract's NodeState)."""

    UP = 1
    STALE = 2
    DOWN = 3


UP, STALE, DOWN = NodeState.UP, NodeState.STALE, NodeState.DOWN
NODE_STATE_NAMES = {UP: "up", STALE: "stale", DOWN: "down"}
NODE_STATE_SEVERITY = {UP: INFO, STALE: WARNING, DOWN: CRITICAL}


GONE_VERDICT = health.Verdict(
    health.LOST, ("GPU no longer visible to NVML on a live node (fell off the bus?)",), "reboot node"
)


class NodeIdConflict(Exception):
    """Another host already reports under this node id."""


@dataclass(slots=True)
class GpuRecord:
    inventory: inventory_pb2.GpuInventory
    sample: telemetry_pb2.GpuSample | None = None
    verdict: health.Verdict = health.HEALTHY_VERDICT
    # Cumulative XID counts per code, for the counter metric (kept across restarts).
    xid_totals: dict[int, int] = field(default_factory=dict)
    # XID counts since the node booted, for the verdict.
    xids_this_boot: dict[int, int] = field(default_factory=dict)
    processes: int | None = None
    # In the node's inventory before, gone from it now: the GPU vanished.
    missing: bool = False
    # What the health rules remember between reports (streaks, error rates).
    window: health.GpuWindow = field(default_factory=health.GpuWindow)
    # The reliability record of the GPU's serial (None while the GPU has no serial).
    serial_record: SerialRecord | None = None

    @property
    def model(self) -> str:
        return self.inventory.name or "unknown"

    def is_idle(self) -> bool:
        s = self.sample
        return (
            not self.missing
            and s is not None
            and s.read_status == telemetry_pb2.GPU_READ_STATUS_OK
            and s.HasField("gpu_utilization_percent")
            and s.gpu_utilization_percent < IDLE_UTILIZATION_PERCENT
        )


@dataclass(slots=True)
class NodeRecord:
    node_id: str
    name: str
    inventory: inventory_pb2.NodeInventory
    interval_s: float
    state: NodeState = UP
    last_seen_unix_ns: int = 0
    last_seen_monotonic: float = 0.0
    last_sequence: int = 0
    gpus: dict[int, GpuRecord] = field(default_factory=dict)
    agent_stats: telemetry_pb2.AgentStats = field(default_factory=telemetry_pb2.AgentStats)
    streams: int = 0
    # Bumped when the inventory changes, so the store rewrites it only then.
    inventory_version: int = 0
    # Bumped when a GPU's verdict or its XIDs since boot change (the store keeps both).
    health_version: int = 0
    # Who holds the node's GPUs, as its agent said last (None: it attributes nothing);
    # the version is bumped when they change.
    allocations: allocation_pb2.Allocations | None = None
    allocation_version: int = 0
    # The node's budget of XID and health events, what it went over by (per kind), and when last said.
    event_budget: TokenBucket | None = None
    suppressed: dict[str, int] = field(default_factory=dict)
    suppressed_said_monotonic: float = 0.0

    @property
    def cluster(self) -> str:
        return self.inventory.cluster

    def set_allocations(self, allocations: allocation_pb2.Allocations) -> None:
        if allocations != self.allocations:
            self.allocations = allocations
            self.allocation_version += 1

    def allocations_of(self, gpu_index: int) -> list[allocation_pb2.Allocation]:
        """The allocations of one GPU and of its MIG instances."""
        if self.allocations is None:
            return []
        return [a for a in self.allocations.allocations if a.gpu_index == gpu_index]

    def gpu_verdict(self, gpu: GpuRecord) -> health.Verdict:
        if self.state != UP:
            return health.UNREACHABLE_VERDICT
        return GONE_VERDICT if gpu.missing else gpu.verdict


@dataclass(frozen=True)
class Liveness:
    """A node is stale after this many missed report intervals, and down after more."""

    stale_after_intervals: float = 3.0
    down_after_intervals: float = 10.0

    def state_after(self, silent_intervals: float) -> NodeState:
        if silent_intervals >= self.down_after_intervals:
            return DOWN
        if silent_intervals >= self.stale_after_intervals:
            return STALE
        return UP


class FleetState:
    def __init__(
        self,
        liveness: Liveness | None = None,
        clock: Callable[[], float] = time.monotonic,
        events: EventLog | None = None,
        event_budget: EventBudget | None = None,
        on_suppressed: Callable[[int], None] | None = None,
        reliability: Reliability | None = None,
    ) -> None:
        self.liveness = liveness or Liveness()
        self.events = events or EventLog()
        # One record per GPU serial, across nodes and restarts.
        self.reliability = reliability or Reliability()
        self.recorder = EventRecorder(self.events, event_budget, on_suppressed, clock)
        self._clock = clock
        self._nodes: dict[str, NodeRecord] = {}
        self._ids_by_name: dict[str, str] = {}
        # Told of every change; the collector registers its sinks here.
        self.sinks = Sinks()
        self.events.sink = self.sinks

    def _changed(self, node: NodeRecord) -> None:
        self.sinks.node_changed(node)

    def __len__(self) -> int:
        return len(self._nodes)

    def nodes(self) -> Iterator[NodeRecord]:
        return iter(self._nodes.values())

    def get(self, node_id: str) -> NodeRecord | None:
        """A node by id (what the collector's own parts use)."""
        return self._nodes.get(node_id)

    def find(self, key: str) -> NodeRecord | None:
        """A node by name (what operators see), else by id; for what operators type."""
        node_id = self._ids_by_name.get(key)
        return self._nodes.get(key if node_id is None else node_id)

    # -- registration ------------------------------------------------------------------

    def hello(self, hello: ingest_pb2.Hello) -> NodeRecord:
        """A node opened a stream: register it, or take in what changed since it last did."""
        inventory = hello.inventory
        interval_s = (hello.report_interval_ms or 10_000) / 1000
        node = self._nodes.get(inventory.node_id)
        if node is None:
            node = NodeRecord(inventory.node_id, self._unique_name(inventory), inventory, interval_s)
            self._nodes[node.node_id] = node
            self._ids_by_name[node.name] = node.node_id
            self._set_inventory(node, inventory, announce=False)
            self.recorder.registered(node)
            log.info("node %s (%s) registered with %d GPUs", node.name, node.node_id, len(inventory.gpus))
        else:
            self._check_conflict(node, inventory)
            if node.inventory.boot_id != inventory.boot_id:
                self._rebooted(node, inventory.boot_id)
            node.interval_s = interval_s
            self._set_inventory(node, inventory)
        if hello.HasField("allocations"):
            node.set_allocations(hello.allocations)
        node.streams += 1
        self._mark_seen(node)
        self._changed(node)
        return node

    def _check_conflict(self, node: NodeRecord, inventory: inventory_pb2.NodeInventory) -> None:
        """Two hosts with one node id are flagged and kept apart, never merged."""
        known = node.inventory
        if node.streams and (known.hostname != inventory.hostname or known.boot_id != inventory.boot_id):
            raise NodeIdConflict(self.recorder.conflict(node, inventory))

    def _rebooted(self, node: NodeRecord, boot_id: str) -> None:
        node.last_sequence = 0
        node.health_version += 1
        for gpu in node.gpus.values():
            gpu.xids_this_boot.clear()
            gpu.window = health.GpuWindow()
            if gpu.serial_record is not None:
                self.reliability.rebooted(gpu.serial_record)
        if node.inventory.boot_id:
            self.recorder.rebooted(node, boot_id)

    def disconnected(self, node: NodeRecord) -> None:
        node.streams = max(node.streams - 1, 0)

    def _unique_name(self, inventory: inventory_pb2.NodeInventory) -> str:
        """The hostname, unless another node has it (as a name or as an id): then made unique."""
        node_id = inventory.node_id
        base = inventory.hostname or node_id
        candidates = (base, f"{base}~{node_id[:8]}", f"{base}~{node_id}")
        for name in candidates:
            if self._name_is_free(name, node_id):
                return name
        suffix = 2
        while not self._name_is_free(f"{candidates[-1]}~{suffix}", node_id):
            suffix += 1
        return f"{candidates[-1]}~{suffix}"

    def _name_is_free(self, name: str, node_id: str) -> bool:
        return name not in self._ids_by_name and (name == node_id or name not in self._nodes)

    def _set_inventory(
        self, node: NodeRecord, inventory: inventory_pb2.NodeInventory, announce: bool = True
    ) -> None:
        """Take in a node's inventory; GPUs that changed or vanished become events."""
        old_driver = node.inventory.driver_version
        node.inventory = inventory
        node.inventory_version += 1
        if announce and old_driver and old_driver != inventory.driver_version:
            self.recorder.driver_upgraded(node, old_driver, inventory.driver_version)
        present = {gpu.index: gpu for gpu in inventory.gpus}
        for index, gpu_inventory in present.items():
            record = node.gpus.get(index)
            if record is None:
                node.gpus[index] = GpuRecord(gpu_inventory)
                if announce:
                    self.recorder.gpu_added(node, gpu_inventory, again=False)
                continue
            old = record.inventory
            if old.uuid and (old.uuid, old.serial) != (gpu_inventory.uuid, gpu_inventory.serial):
                record.xids_this_boot.clear()
                record.window = health.GpuWindow()
                record.verdict = health.HEALTHY_VERDICT
                node.health_version += 1
                self.recorder.gpu_replaced(node, old, gpu_inventory)
            elif record.missing:
                self.recorder.gpu_added(node, gpu_inventory, again=True)
            record.inventory = gpu_inventory
            record.missing = False
        self.link_serials(node)
        for index, record in node.gpus.items():
            if index not in present and not record.missing:
                record.missing = True
                self.recorder.gpu_removed(node, record.inventory, GONE_VERDICT.action)

    def link_serials(self, node: NodeRecord) -> None:
        """Each GPU of the node to its serial's reliability record (a new slot is a new install)."""
        now = time.time_ns()
        for index, gpu in node.gpus.items():
            serial = gpu.inventory.serial
            if not serial or gpu.missing:
                continue
            gpu.serial_record = self.reliability.seen(
                serial, gpu.inventory.uuid, gpu.model, node.node_id, node.inventory.hostname, index, now
            )

    # -- reports -------------------------------------------------------------------------

    def apply_report(self, node: NodeRecord, report: ingest_pb2.Report) -> bool:
        """Take a report in; False if it was a duplicate (already taken in)."""
        if report.sequence <= node.last_sequence:
            return False
        node.last_sequence = report.sequence
        if report.HasField("inventory"):
            self._set_inventory(node, report.inventory)
        if report.HasField("allocations"):
            node.set_allocations(report.allocations)
        updated = []
        for sample in report.gpus:
            gpu = node.gpus.get(sample.index)
            if gpu is None:
                gpu = node.gpus[sample.index] = GpuRecord(inventory_pb2.GpuInventory(index=sample.index))
            self._apply_sample(node, gpu, sample)
            updated.append(gpu)
        now_ns = time.time_ns()
        # The sample's own time (clamped to now at ingest): rates and history follow the GPU's clock,
        # also for reports resent after an outage.
        sampled_ns = min(report.time_unix_nano, now_ns) or now_ns
        samples = list(zip(updated, report.gpus, strict=True))
        peer_clock = health.peer_sm_clock_mhz(list(report.gpus))
        # A collective hangs all its ranks: a GPU spinning alone is not one.
        spinning = [
            health.looks_hung_alone(sample, gpu.inventory.power_limit_enforced_milliwatts)
            for gpu, sample in samples
        ]
        node_hung = sum(spinning) >= health.MIN_HUNG_PEERS
        for (gpu, sample), spins in zip(samples, spinning, strict=True):
            gpu.window.observe(sample, sampled_ns, peer_clock_mhz=peer_clock, hung=node_hung and spins)
            self._judge(node, gpu, peer_clock, sampled_ns)
        self.recorder.summarise_suppressed(node)
        node.agent_stats = report.agent_stats
        node.last_seen_unix_ns = now_ns
        self._mark_seen(node)
        self._changed(node)
        return True

    def _apply_sample(self, node: NodeRecord, gpu: GpuRecord, sample: telemetry_pb2.GpuSample) -> None:
        if sample.xid_events:
            node.health_version += 1
        for event in sample.xid_events:
            code = event.code
            gpu.xid_totals[code] = gpu.xid_totals.get(code, 0) + 1
            gpu.xids_this_boot[code] = gpu.xids_this_boot.get(code, 0) + 1
            self.recorder.xid(node, sample.index, code, event.time_unix_nano)
        if sample.HasField("processes"):
            gpu.processes = len(sample.processes.processes)
        gpu.sample = sample

    def _judge(self, node: NodeRecord, gpu: GpuRecord, peer_clock_mhz: float | None, sampled_ns: int) -> None:
        assert gpu.sample is not None
        sample = gpu.sample
        before = gpu.verdict
        verdict = health.judge(sample, gpu.xids_this_boot, gpu.window, peer_clock_mhz)
        record = gpu.serial_record
        if record is not None and health.is_fault(verdict):
            occurrences = self.reliability.occurrence(
                record, node.node_id, node.inventory.boot_id, sampled_ns, verdict
            )
            verdict = health.escalate(verdict, occurrences)
            reason = health.rma_reason(verdict, occurrences)
            if reason and self.reliability.flag_rma(record, sampled_ns, reason):
                self.recorder.rma_due(node, gpu.inventory, reason, occurrences, sampled_ns)
        gpu.verdict = verdict
        if verdict != before:
            node.health_version += 1
        if verdict.health != before.health:
            if record is not None:
                self.reliability.verdict_changed(record, sampled_ns, before, verdict)
            self.recorder.health_changed(node, sample.index, before, verdict, sampled_ns)

    # -- liveness --------------------------------------------------------------------------

    def _mark_seen(self, node: NodeRecord) -> None:
        node.last_seen_monotonic = self._clock()
        if not node.last_seen_unix_ns:
            node.last_seen_unix_ns = time.time_ns()
        if node.state != UP:
            self._set_state(node, UP)

    def _set_state(self, node: NodeRecord, state: NodeState) -> None:
        log.info("node %s is %s", node.name, NODE_STATE_NAMES[state])
        before = NODE_STATE_NAMES[node.state]
        node.state = state
        self.recorder.state_changed(node, before, NODE_STATE_NAMES[state], NODE_STATE_SEVERITY[state])

    def sweep(self) -> list[NodeRecord]:
        """Move nodes that stopped reporting to stale, then down; return those that changed."""
        now = self._clock()
        changed = []
        for node in self._nodes.values():
            state = self.liveness.state_after((now - node.last_seen_monotonic) / node.interval_s)
            if state != node.state:
                self._set_state(node, state)
                changed.append(node)
                self._changed(node)
        return changed

    def forget(self, node: NodeRecord) -> None:
        """An operator said the node is gone for good: drop it (an event records it)."""
        self.recorder.forgotten(node)
        del self._nodes[node.node_id]
        self._ids_by_name.pop(node.name, None)
        self.sinks.node_removed(node)

    def release(self, node: NodeRecord) -> None:
        """Another collector of the tier serves the node now: drop it here, quietly (no event)."""
        if self._nodes.pop(node.node_id, None) is None:
            return
        if self._ids_by_name.get(node.name) == node.node_id:
            del self._ids_by_name[node.name]
        self.events.drop(node.node_id)
        self.sinks.node_removed(node)

    # -- persistence -----------------------------------------------------------------------

    def restore(self, node: NodeRecord) -> None:
        """A node read back from the store at start-up; its liveness follows from when it was last seen."""
        silent_s = max(time.time_ns() - node.last_seen_unix_ns, 0) / 1e9
        node.last_seen_monotonic = self._clock() - silent_s
        node.state = self.liveness.state_after(silent_s / node.interval_s)
        if not self._name_is_free(node.name, node.node_id):
            node.name = self._unique_name(node.inventory)
        self._nodes[node.node_id] = node
        self._ids_by_name[node.name] = node.node_id
        self.link_serials(node)
        self._changed(node)
