"""`python -m bench.tier` runs end to end (shortened: a small fleet, a short window, a short lease)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_the_tier_benchmark_measures_the_store_failover_and_workers() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.tier",
            *("--nodes", "16", "--interval", "1", "--lease", "1", "--window", "2"),
            # --workers is run by tests/test_workers.py; here the store and failover phases.
            *("--skip", "workers"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    store = report["store"]
    assert store["sqlite"]["reports_per_s"] > 0 and store["postgresql"]["wal_bytes_per_report"] > 0
    assert store["postgresql"]["postgres_cpu_us_per_report"] >= 0  # CPU ticks: 10 ms apart
    moved = report["failover"]
    assert moved["nodes_moved"] > 0 and moved["nodes_arrived"] == moved["nodes_moved"]
    assert "PostgreSQL adds" in result.stdout and "failover of" in result.stdout
