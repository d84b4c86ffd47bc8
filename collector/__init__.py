"""gpufleet-collector: fleet state, health, Prometheus exposition, queries and events."""
