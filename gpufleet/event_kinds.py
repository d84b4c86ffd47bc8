"""The kinds of fleet events: one vocabulary for the collector, the CLI and subscribers."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from gpufleet.v1 import events_pb2

XID = "xid"
HEALTH_CHANGED = "health_changed"
NODE_STATE_CHANGED = "node_state_changed"
NODE_REGISTERED = "node_registered"
NODE_REBOOTED = "node_rebooted"
NODE_ID_CONFLICT = "node_id_conflict"
GPU_ADDED = "gpu_added"
GPU_REMOVED = "gpu_removed"
GPU_REPLACED = "gpu_replaced"
DRIVER_UPGRADED = "driver_upgraded"
NODE_FORGOTTEN = "node_forgotten"
EVENTS_SUPPRESSED = "events_suppressed"
RMA_DUE = "rma_due"

# What a node is made of, over time (`gpufleet history`).
INVENTORY_KINDS = (NODE_REGISTERED, NODE_REBOOTED, GPU_ADDED, GPU_REMOVED, GPU_REPLACED, DRIVER_UPGRADED)
ALL_KINDS = (
    XID,
    HEALTH_CHANGED,
    RMA_DUE,
    NODE_STATE_CHANGED,
    NODE_ID_CONFLICT,
    NODE_FORGOTTEN,
    EVENTS_SUPPRESSED,
    *INVENTORY_KINDS,
)


def event_row(event: events_pb2.Event) -> dict[str, Any]:
    """An event as JSON-ready data: what `gpufleet events -o json` prints and MQTT carries."""
    return {
        "id": event.id,
        "time": datetime.fromtimestamp(event.time_unix_nano / 1e9, timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "severity": events_pb2.Severity.Name(event.severity).removeprefix("SEVERITY_").lower(),
        "datacenter": event.datacenter,
        "cluster": event.cluster,
        "node": event.node_name,
        "node_id": event.node_id,
        "gpu": event.gpu_index if event.HasField("gpu_index") else None,
        "kind": event.kind,
        "reason": event.reason,
        "action": event.action,
        "attributes": dict(event.attributes),
    }
