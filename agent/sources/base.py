"""The one small interface every GPU source implements."""

from __future__ import annotations

from typing import Protocol

from gpufleet.v1 import inventory_pb2, telemetry_pb2


class SourceUnavailable(Exception):
    """The source cannot start on this host (no driver, no library); the message says what to do."""


class GpuSource(Protocol):
    """Reads one node's GPUs. Calls may block (NVML does): run them off the event loop.

    A source reports trouble with one GPU, or with its library, in the samples
    (read_status LOST or ERROR, with read_error) rather than by raising.
    """

    @property
    def errors_total(self) -> int:
        """Failed reads since the source started (sent as AgentStats.nvml_errors_total)."""
        ...

    @property
    def inventory_stale(self) -> bool:
        """True when the GPUs may have changed since the last inventory() (NVML came back)."""
        ...

    def inventory(self) -> inventory_pb2.NodeInventory:
        """Driver versions and the GPUs; node identity and labels are filled in by the caller."""
        ...

    def sample(self, *, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        """One sample per GPU, with the XID events seen since the previous call."""
        ...

    def close(self) -> None:
        """Release the source (stop event threads, shut NVML down)."""
        ...
