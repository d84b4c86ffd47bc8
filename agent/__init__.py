"""gpufleet-agent: reads a host's GPUs (NVML or simulated) and streams reports to the collector."""
