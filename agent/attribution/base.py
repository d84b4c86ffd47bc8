"""What every attribution source shares: the GPUs and MIG instances that device ids can name."""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.v1 import allocation_pb2, inventory_pb2


class AttributionFailed(Exception):
    """A source could not be read this time (its message says why); the agent carries on."""


@dataclass(frozen=True)
class Target:
    """A GPU, or one MIG instance of it (gpu_instance_id set)."""

    gpu_index: int
    gpu_instance_id: int | None = None

    def allocation(self, source: str, **values: str) -> allocation_pb2.Allocation:
        allocation = allocation_pb2.Allocation(gpu_index=self.gpu_index, source=source)
        for name, value in values.items():
            setattr(allocation, name, value)
        if self.gpu_instance_id is not None:
            allocation.gpu_instance_id = self.gpu_instance_id
        return allocation


class Targets:
    """Every id a scheduler or device plugin may use for a node's GPUs and MIG instances.

    GPU UUIDs (``GPU-...``) and MIG UUIDs (``MIG-...``), as the NVIDIA device plugin reports by
    default; GPU indices (``"3"``) and MIG indices (``"3:1"``: GPU 3, MIG device 1), as it reports
    with the index id strategy. Built from the node's inventory, so simulated GPUs are named
    exactly as real ones.
    """

    def __init__(self, inventory: inventory_pb2.NodeInventory) -> None:
        self.by_id: dict[str, Target] = {}
        self.gpu_indices: set[int] = set()
        # (GPU index, GPU instance id) of every MIG instance.
        self.mig: set[tuple[int, int]] = set()
        for gpu in inventory.gpus:
            target = Target(gpu.index)
            self.gpu_indices.add(gpu.index)
            self.by_id[str(gpu.index)] = target
            if gpu.uuid:
                self.by_id[gpu.uuid] = target
            for mig in gpu.mig_instances:
                mig_target = Target(gpu.index, mig.gpu_instance_id)
                self.mig.add((gpu.index, mig.gpu_instance_id))
                self.by_id[f"{gpu.index}:{mig.index}"] = mig_target
                if mig.uuid:
                    self.by_id[mig.uuid] = mig_target

    def find(self, device_id: str) -> Target | None:
        """The GPU or MIG instance a device id names; None if it names none of this node's."""
        return self.by_id.get(device_id.strip())
