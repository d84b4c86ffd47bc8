"""`python -m bench.views` runs end to end (shortened: 20 nodes, 2 s windows)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_the_views_benchmark_measures_the_map_and_top() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.views", "--nodes", "20", "--window", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["gpus"] == 160 and report["fleet_bytes"] > report["fleet_gzip_bytes"] > 0
    assert report["page_load_s"] is not None and report["page_load_s"] > 0
    assert report["stream_bytes_per_s"] > 0
    assert all(report[f"cpu_{name}_cores"] >= 0 for name in ("idle", "pages", "tops", "viewed"))
    assert (
        report["ingest_many_streams"]["streams"] == 500 and report["ingest_no_streams"]["reports_per_s"] > 0
    )
    assert "page load to every cell drawn" in result.stdout
