"""The kinds of fleet events: one vocabulary for the collector, the CLI and subscribers."""

from __future__ import annotations

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

# What a node is made of, over time (`gpufleet history`).
INVENTORY_KINDS = (NODE_REGISTERED, NODE_REBOOTED, GPU_ADDED, GPU_REMOVED, GPU_REPLACED, DRIVER_UPGRADED)
ALL_KINDS = (XID, HEALTH_CHANGED, NODE_STATE_CHANGED, NODE_ID_CONFLICT, *INVENTORY_KINDS)
