"""The health scorer's small version: a real collector, a scenario fleet, every goal met for a fixed seed.

The full run (`python -m bench.health --gpus 10000 --days 30`) writes docs/health-score.md;
this one runs the same command on 64 GPUs over 48 simulated hours with the faults of 3,000
days and ten times the background noise, so that each kind of fault, precursor, repeat
offender and noise occurs, in about ten seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.conftest import ROOT

SMALL = ["--gpus", "64", "--hours", "48", "--days", "3000", "--noise-multiplier", "10", "--seed", "1"]


def test_the_small_scored_fleet_meets_every_goal(tmp_path: Path) -> None:
    scores, truth, events = tmp_path / "score.json", tmp_path / "truth.jsonl", tmp_path / "events.jsonl"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.health", *SMALL, "--db", "none", "--no-write"),
            *("--json", str(scores), "--truth", str(truth), "--events", str(events)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    goals = json.loads(scores.read_text())["goals"]
    assert len(goals) >= 9 and all(goal["met"] for goal in goals), goals
    assert "simulated hours (100 %)" in result.stdout  # progress is shown

    rows = [json.loads(line) for line in truth.read_text().splitlines()]
    run, episodes = rows[0], rows[1:]
    assert run["type"] == "run" and run["gpus"] == 64 and run["fault_rate_multiplier"] == 1500
    categories = Counter(e["category"] for e in episodes)
    assert {"hard", "weak", "precursor", "noise"} <= set(categories), categories
    kinds = {e["kind"] for e in episodes}
    assert {"hung_collective", "clock_sag", "throttle_blip", "read_error", "app_xid", "ce_burst"} <= kinds
    # Repeat offenders: one serial failing three times, on two nodes (moved after its second).
    by_serial: dict[str, set[str]] = {}
    for e in episodes:
        if e["category"] == "hard" and e["occurrence"] >= 2:
            by_serial.setdefault(e["serial"], set()).add(e["node_id"])
    assert any(len(nodes) == 2 for nodes in by_serial.values()), by_serial
    # The verdicts scored are the collector's own events, timed by the samples that changed them.
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    assert {e["kind"] for e in logged} == {"health_changed", "rma_due"}
    assert all(run["start_unix_nano"] <= e["time_unix_nano"] <= run["end_unix_nano"] for e in logged)
