"""gpufleet: GPU fleet telemetry. Shared pieces of the agent, collector and CLI."""

__version__ = "0.1.0"
