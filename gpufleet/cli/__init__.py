"""The `gpufleet` command: fleet queries, the demo, development certificates and tokens."""
