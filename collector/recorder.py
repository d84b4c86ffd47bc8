"""The recorder: turns what changed in the fleet into events an operator reads.

The fleet's state says what happened (a node registered, a GPU vanished, an XID, a verdict
changed); the recorder decides what that is worth telling: the kind, the severity, the reason
in words, what to do, and the attributes. It also keeps each node within its event budget, so
that a storm on one node is counted in full but logged only in part, with a summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet import event_kinds as kinds
from gpufleet.collector import health
from gpufleet.collector.admission import TokenBucket
from gpufleet.collector.eventlog import CRITICAL, INFO, WARNING, EventLog
from gpufleet.v1 import events_pb2, inventory_pb2

if TYPE_CHECKING:
    from gpufleet.collector.state import NodeRecord

HEALTH_SEVERITY = {
    health.HEALTHY: INFO,
    health.AT_RISK: WARNING,
    health.DEGRADED: WARNING,
    health.UNHEALTHY: CRITICAL,
    health.LOST: CRITICAL,
    health.UNREACHABLE: WARNING,
}
# Kinds a storm on one node can multiply; beyond the budget they are counted and summarised.
BUDGETED_KINDS = frozenset({kinds.XID, kinds.HEALTH_CHANGED})
# At most one summary of what was not logged per node in this many seconds (or its interval).
SUMMARY_MIN_INTERVAL_S = 1.0


@dataclass(frozen=True)
class EventBudget:
    """XID and health events a node may add to the log: per second, and at once."""

    per_second: float = 10.0
    burst: int = 200


class EventRecorder:
    def __init__(
        self,
        events: EventLog,
        budget: EventBudget | None = None,
        on_suppressed: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events
        self.budget = budget or EventBudget()
        self._on_suppressed = on_suppressed
        self._clock = clock

    # -- what happened ---------------------------------------------------------------------

    def registered(self, node: NodeRecord) -> None:
        gpus = len(node.inventory.gpus)
        self._emit(
            node,
            kinds.NODE_REGISTERED,
            INFO,
            f"registered with {gpus} GPUs",
            hostname=node.inventory.hostname,
        )

    def conflict(self, node: NodeRecord, other: inventory_pb2.NodeInventory) -> str:
        """Another host reports under this node's id; returns the reason (for the refusal too)."""
        reason = (
            f"node id {node.node_id} is already reporting from host {node.inventory.hostname!r}; "
            f"refused host {other.hostname!r}: give each host its own --node-id"
        )
        self._emit(
            node,
            kinds.NODE_ID_CONFLICT,
            WARNING,
            reason,
            action="fix the node ids",
            other_hostname=other.hostname,
        )
        return reason

    def rebooted(self, node: NodeRecord, boot_id: str) -> None:
        self._emit(node, kinds.NODE_REBOOTED, INFO, "node rebooted (new boot id)", boot_id=boot_id)

    def driver_upgraded(self, node: NodeRecord, old: str, new: str) -> None:
        self._emit(
            node, kinds.DRIVER_UPGRADED, INFO, f"driver {old} -> {new}", old_driver=old, new_driver=new
        )

    def gpu_added(self, node: NodeRecord, gpu: inventory_pb2.GpuInventory, *, again: bool) -> None:
        reason = f"GPU {gpu.index} is visible again" if again else f"GPU {gpu.index} added ({gpu.name})"
        self._emit(node, kinds.GPU_ADDED, INFO, reason, gpu_index=gpu.index, uuid=gpu.uuid, serial=gpu.serial)

    def gpu_replaced(
        self, node: NodeRecord, old: inventory_pb2.GpuInventory, new: inventory_pb2.GpuInventory
    ) -> None:
        self._emit(
            node,
            kinds.GPU_REPLACED,
            INFO,
            f"GPU {new.index} replaced: serial {old.serial} -> {new.serial}",
            gpu_index=new.index,
            old_uuid=old.uuid,
            new_uuid=new.uuid,
            old_serial=old.serial,
            new_serial=new.serial,
        )

    def gpu_removed(self, node: NodeRecord, gpu: inventory_pb2.GpuInventory, action: str) -> None:
        self._emit(
            node,
            kinds.GPU_REMOVED,
            CRITICAL,
            f"GPU {gpu.index} ({gpu.serial}) vanished from the node's inventory",
            gpu_index=gpu.index,
            action=action,
            uuid=gpu.uuid,
            serial=gpu.serial,
        )

    def xid(self, node: NodeRecord, gpu_index: int, code: int, time_unix_nano: int) -> None:
        rule = health.XID_RULES.get(code, health.UNKNOWN_XID)
        self._emit(
            node,
            kinds.XID,
            HEALTH_SEVERITY[rule.health],
            f"XID {code}: {rule.meaning}",
            gpu_index=gpu_index,
            action=rule.action,
            time_unix_nano=time_unix_nano or None,
            xid=str(code),
        )

    def health_changed(
        self,
        node: NodeRecord,
        gpu_index: int,
        before: health.Verdict,
        after: health.Verdict,
        time_unix_nano: int | None = None,
    ) -> None:
        """A GPU's verdict changed, as of the sample that changed it (``time_unix_nano``)."""
        self._emit(
            node,
            kinds.HEALTH_CHANGED,
            HEALTH_SEVERITY[after.health],
            f"GPU {gpu_index} {before.name} -> {after.name}: " + ("; ".join(after.reasons) or "no findings"),
            gpu_index=gpu_index,
            action=after.action,
            time_unix_nano=time_unix_nano,
            old=before.name,
            new=after.name,
        )

    def rma_due(
        self,
        node: NodeRecord,
        gpu: inventory_pb2.GpuInventory,
        reason: str,
        occurrences: int,
        time_unix_nano: int,
    ) -> None:
        """A GPU meets the RMA criteria (its serial's record says why)."""
        self._emit(
            node,
            kinds.RMA_DUE,
            CRITICAL,
            f"GPU {gpu.index} ({gpu.serial}) is due for RMA: {reason}",
            gpu_index=gpu.index,
            action="drain node; hardware inspection and RMA",
            time_unix_nano=time_unix_nano,
            uuid=gpu.uuid,
            serial=gpu.serial,
            occurrences=str(occurrences),
        )

    def state_changed(self, node: NodeRecord, before: str, after: str, severity: events_pb2.Severity) -> None:
        self._emit(
            node,
            kinds.NODE_STATE_CHANGED,
            severity,
            f"node {before} -> {after}",
            action="check the node and its agent" if after != "up" else "",
            old=before,
            new=after,
        )

    def forgotten(self, node: NodeRecord) -> None:
        self._emit(node, kinds.NODE_FORGOTTEN, INFO, f"node {node.name} forgotten by an operator")

    # -- the budget --------------------------------------------------------------------------

    def _emit(
        self,
        node: NodeRecord,
        kind: str,
        severity: events_pb2.Severity,
        reason: str,
        *,
        gpu_index: int | None = None,
        action: str = "",
        time_unix_nano: int | None = None,
        **attributes: str,
    ) -> None:
        if kind in BUDGETED_KINDS and not self._within_budget(node):
            node.suppressed[kind] = node.suppressed.get(kind, 0) + 1
            if self._on_suppressed is not None:
                self._on_suppressed(1)
            return
        self.events.emit(
            kind,
            severity,
            reason,
            node_id=node.node_id,
            node_name=node.name,
            datacenter=node.inventory.datacenter,
            cluster=node.inventory.cluster,
            gpu_index=gpu_index,
            action=action,
            attributes=attributes,
            time_unix_nano=time_unix_nano,
        )

    def _within_budget(self, node: NodeRecord) -> bool:
        if node.event_budget is None:
            node.event_budget = TokenBucket(self.budget.per_second, self.budget.burst, self._clock)
        return node.event_budget.take()

    def summarise_suppressed(self, node: NodeRecord) -> None:
        """One event that says what a node's storm left out of the log (its counters have it all)."""
        now = self._clock()
        if not node.suppressed or now - node.suppressed_said_monotonic < max(
            node.interval_s, SUMMARY_MIN_INTERVAL_S
        ):
            return
        counts = ", ".join(f"{kind} x{count}" for kind, count in sorted(node.suppressed.items()))
        total = sum(node.suppressed.values())
        node.suppressed.clear()
        node.suppressed_said_monotonic = now
        self.events.emit(
            kinds.EVENTS_SUPPRESSED,
            WARNING,
            f"{total} events not logged ({counts}): over {self.budget.per_second:g} per second "
            f"(bursts of {self.budget.burst}) from one node; counters and verdicts still count them",
            node_id=node.node_id,
            node_name=node.name,
            datacenter=node.inventory.datacenter,
            cluster=node.inventory.cluster,
            action="look at the node's GPUs: an XID storm",
            attributes={"suppressed": str(total)},
        )
