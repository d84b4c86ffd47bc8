"""`gpufleet demo`: 10,000 GPUs visible within 60 s, and nothing left behind after Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, http_get, wait_until


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


# A placement the collector must show: older than a report interval (the demo's: 10 s) and more.
SETTLED_S = 12.0


def placements(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], tuple[int, float, int]]:
    """(cluster, namespace, pod, job, user) -> (GPUs, since, idle GPUs) of each pod and Slurm job."""
    found: dict[tuple[str, ...], tuple[int, float, int]] = {}
    for r in rows:
        key = (
            r["cluster"],
            r["namespace"],
            r["pod"],
            r["job"],
            r["user"] if r["scheduler"] == "slurm" else "",
        )
        gpus, since, idle = found.get(key, (0, r["since"], 0))
        found[key] = (gpus + 1, min(since, r["since"]), idle + (r["behaviour"] in ("idle", "stuck")))
    return found


def assert_jobs_and_idle_match_the_simulation(target: str, truth_file: Path) -> None:
    """`gpufleet jobs` and `gpufleet idle --by namespace` show what the simulated scheduler placed.

    The demo's jobs come and go (two hours on average, over a thousand of them), so the check is
    against what held steady while the collector was asked: each settled placement exactly, and
    nothing that the scheduler had not placed within the last few seconds.
    """

    def cli(*args: str) -> Any:
        result = subprocess.run(
            [sys.executable, "-m", "gpufleet.cli", *args, "--collector", target, "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(result.stdout)

    def truth() -> dict[tuple[str, ...], tuple[int, float, int]]:
        return placements(json.loads(truth_file.read_text())["allocations"])

    ever: set[tuple[str, ...]] = set()
    problems: list[object] = []

    def consistent() -> bool:
        before = truth()
        shown: dict[tuple[str, ...], int] = {
            (j["cluster"], j["namespace"], j["pod"], j["job"], j["user"]): j["gpus"] for j in cli("jobs")
        }
        idle: Counter[tuple[str, str]] = Counter()
        for row in cli("idle", "--by", "namespace"):
            idle[(row["cluster"], row["namespace"])] += row["idle_gpus"]
        after = truth()
        ever.update(before, after)
        settled = {
            key: value
            for key, value in before.items()
            if after.get(key) == value and value[1] < time.time() - SETTLED_S
        }
        problems[:] = [
            *((key, gpus, shown.get(key)) for key, (gpus, _, _) in settled.items() if shown.get(key) != gpus),
            *(("never placed", key) for key in set(shown) - ever),
        ]
        for (cluster, namespace), count in idle.items():
            if not namespace:
                continue
            sure = sum(v[2] for k, v in settled.items() if k[:2] == (cluster, namespace))
            maybe = sum(
                v[0]
                for k, v in {**before, **after}.items()
                if k[:2] == (cluster, namespace) and k not in settled
            )
            if not sure <= count <= sure + maybe:
                problems.append(("idle", cluster, namespace, count, sure, maybe))
        return not problems and len(settled) > 0.9 * len(before) and sum(idle.values()) > 0

    try:
        wait_until(
            consistent, timeout=60, interval=1.0, what="jobs and idle GPUs as the scheduler placed them"
        )
    except AssertionError:
        raise AssertionError(problems[:10]) from None


def assert_some_gpus_failing_and_some_at_risk(target: str) -> None:
    """Not a fleet where everything is green: the realistic scenario has faults and precursors."""

    def by_health() -> dict[str, int]:
        result = subprocess.run(
            [sys.executable, "-m", "gpufleet.cli", "summary", "--collector", target, "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        (summary,) = json.loads(result.stdout)
        return {key.removeprefix("gpus_"): value for key, value in summary.items() if key.startswith("gpus_")}

    counts: dict[str, int] = {}

    def failing_and_at_risk() -> bool:
        counts.update(by_health())
        failing = counts.get("unhealthy", 0) + counts.get("lost", 0)
        return 0 < failing < 100 and 0 < counts.get("at_risk", 0) < 100

    wait_until(failing_and_at_risk, timeout=30, interval=1.0, what="a few GPUs failing and a few at risk")


def test_demo_shows_the_whole_fleet_within_60_seconds_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    demo = subprocess.Popen(
        [sys.executable, "-m", "gpufleet.cli", "demo", "--grpc-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    output = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            output.append(line)
            if line.startswith("Running"):
                break
        ready_after = time.monotonic() - started
        text = "".join(output)
        assert "Running" in text, text
        assert ready_after < 60, text
        assert re.search(r"Nodes\s+1250\s+1250 up", text), text
        assert re.search(r"GPUs\s+10000", text), text
        metrics_url = re.search(r"(http://127\.0\.0\.1:\d+/metrics)\n", text)
        assert metrics_url, text
        _, body, _ = http_get(metrics_url.group(1), timeout=30)
        assert body.count(b"\ngpufleet_gpu_info{") == 10_000
        # The printed map URL serves the page and every GPU's row behind it.
        map_url = re.search(r"Fleet map\s+(http://127\.0\.0\.1:\d+/)\n", text)
        assert map_url, text
        status, page, _ = http_get(map_url.group(1), timeout=30)
        assert status == 200 and b'<canvas id="map"' in page
        fleet = json.loads(http_get(map_url.group(1) + "api/fleet", timeout=30)[1])
        assert sum(len(node["gpus"]) for node in fleet["nodes"]) == 10_000
        children = children_of(demo.pid)
        assert len(children) == 2
        target = re.search(r"gpufleet summary --collector (\S+)", text)
        assert target, text
        assert_jobs_and_idle_match_the_simulation(target.group(1), tmp_path / ".demo" / "sim-truth.json")
        assert_some_gpus_failing_and_some_at_risk(target.group(1))
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0, rest
    assert "no process left behind" in rest
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
