"""Benchmarks, separate from the test suite: `python -m bench` (see docs/benchmarks.md)."""
