"""Where GPU readings come from: real NVML, or a simulator for tests and demos."""

from gpufleet.agent.sources.base import GpuSource, SourceUnavailable

__all__ = ["GpuSource", "SourceUnavailable"]
