"""`gpufleet demo`: 10,000 GPUs visible within 60 s, and nothing left behind after Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, http_get


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
        children = children_of(demo.pid)
        assert len(children) == 2
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0, rest
    assert "no process left behind" in rest
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
