"""Attribution end to end: real agents, a real collector, the CLI, a stand-in kubelet, job files.

The simulated scheduler's ground truth is what `gpufleet jobs` and `gpufleet idle` must show; a
simulated node pointed at a real pod-resources socket and job-mapping directory is attributed
exactly as a real host would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Processes, http_get, wait_until
from tests.fake_kubelet import ThreadedKubelet, pod

NODES = 24
CLUSTERS = 2


def cli(target: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", *args, "--collector", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def truth(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(path.read_text())["allocations"]
    return rows


def text(url: str) -> str:
    status, body, _ = http_get(url)
    assert status == 200, status
    return body.decode()


def held_in_metrics(base: str) -> int:
    return sum(
        line.startswith("gpufleet_gpu_allocation_info{") for line in text(f"{base}/metrics").splitlines()
    )


def test_jobs_and_idle_show_the_simulated_schedulers_allocations(
    processes: Processes, tmp_path: Path
) -> None:
    _, target, base = processes.collector("--price", "H100=2.50")
    truth_file = tmp_path / "truth.json"
    processes.sim_fleet(
        *("--nodes", str(NODES), "--clusters", str(CLUSTERS), "--scheduler", "mixed"),
        *("--mean-job-minutes", "100000", "--interval", "0.5", "--process-interval", "0.5"),
        *("--collector", target, "--sim-truth-file", str(truth_file), "--seed", "3"),
    )
    wait_until(truth_file.exists, timeout=30, what="the ground truth file")
    expected = truth(truth_file)
    assert {row["scheduler"] for row in expected} == {"kubernetes", "slurm"}
    wait_until(lambda: held_in_metrics(base) >= len(expected), timeout=30, what="every allocation exported")

    # gpufleet jobs: one row per pod and per Slurm job, with the GPUs the scheduler gave it.
    jobs = json.loads(cli(target, "jobs", "-o", "json"))
    shown = {(j["namespace"], j["pod"], j["job"], j["user"]): j["gpus"] for j in jobs}
    placed = Counter(
        (r["namespace"], r["pod"], "", "")
        if r["scheduler"] == "kubernetes"
        else ("", "", r["job"], r["user"])
        for r in expected
    )
    assert shown == dict(placed)

    # gpufleet idle --by namespace: the idle and stuck allocations, per team.
    def idle_by_namespace() -> dict[str, int]:
        rows = json.loads(cli(target, "idle", "--by", "namespace", "-o", "json"))
        return {row["namespace"]: row["idle_gpus"] for row in rows if row["namespace"]}

    wasted = Counter(
        r["namespace"]
        for r in expected
        if r["scheduler"] == "kubernetes" and r["behaviour"] in ("idle", "stuck")
    )
    assert wasted, "the scheduler should hold some GPUs idle or stuck"
    wait_until(lambda: idle_by_namespace() == dict(wasted), timeout=20, what="the idle GPUs per namespace")
    table = cli(target, "idle", "--by", "namespace")
    assert table.splitlines()[0].split()[:3] == ["NAMESPACE", "IDLE", "GPUS"]
    assert "COST/H" in table  # the collector's --price applies

    # The same GPUs through `gpufleet gpus --user`, and the fleet families.
    slurm_row = next(r for r in expected if r["scheduler"] == "slurm")
    gpus = json.loads(cli(target, "gpus", "--user", slurm_row["user"], "-o", "json"))
    assert {g["uuid"] for g in gpus} == {r["gpu_uuid"] for r in expected if r["user"] == slurm_row["user"]}
    fleet = text(f"{base}/metrics/fleet")
    allocated = sum(
        float(line.rsplit(" ", 1)[1])
        for line in fleet.splitlines()
        if line.startswith("gpufleet_fleet_allocated_gpus{")
    )
    assert allocated == len(expected)
    assert "gpufleet_workload_idle_cost_total{" in fleet


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[ThreadedKubelet]:
    """A stand-in kubelet on a real unix socket."""
    (tmp_path / "pod-resources").mkdir()
    server = ThreadedKubelet(tmp_path / "pod-resources" / "kubelet.sock")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def agent_once(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.agent.main", "--source", "sim", "--once", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    once: dict[str, Any] = json.loads(result.stdout)
    return once


def test_simulated_gpus_are_attributed_through_a_real_socket_and_job_files(
    processes: Processes, tmp_path: Path, kubelet: ThreadedKubelet
) -> None:
    inventory = agent_once("--gpus-per-node", "4")["inventory"]
    uuids = [gpu["uuid"] for gpu in inventory["gpus"]]

    def pods(*entries: Any) -> None:
        kubelet.pods = {(entry.namespace, entry.name): entry for entry in entries}  # one atomic swap

    # By UUID and by device index, as the device plugin may report either.
    pods(
        pod("ml", "train-0", {"main": [("nvidia.com/gpu", [uuids[0], uuids[1]])]}),
        pod("inf", "serve-0", {"server": [("nvidia.com/gpu", ["2"])]}),
    )
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "3").write_text("4242\n")
    _, target, base = processes.collector()
    agent = processes.sim_fleet(
        *("--gpus-per-node", "4", "--interval", "0.5", "--collector", target),
        *("--kubelet-socket", str(kubelet.socket_path), "--job-mapping-dir", str(jobs)),
    )

    def holders() -> set[tuple[str, ...]]:
        gpus = json.loads(cli(target, "gpus", "-o", "json"))
        return {(str(g["gpu"]), g["held_by"]) for g in gpus if g["held_by"]}

    wait_until(
        lambda: (
            holders() == {("0", "ml/train-0"), ("1", "ml/train-0"), ("2", "inf/serve-0"), ("3", "job 4242")}
        ),
        timeout=20,
        what="the kubelet's pods and the job file on the node's GPUs",
    )
    # Pods come and go: the change reaches the collector.
    pods(pod("ml", "train-1", {"main": [("nvidia.com/gpu", [uuids[1]])]}))
    wait_until(lambda: holders() == {("1", "ml/train-1"), ("3", "job 4242")}, timeout=20, what="new pods")
    metrics = text(f"{base}/metrics")
    assert 'gpufleet_node_attribution_available{node="sim-node-00000",source="kubernetes"} 1' in metrics
    assert 'gpufleet_node_attribution_available{node="sim-node-00000",source="slurm"} 1' in metrics

    # The kubelet goes away: attribution says so, telemetry carries on, one log line.
    kubelet.stop()
    wait_until(
        lambda: 'source="kubernetes"} 0' in text(f"{base}/metrics"),
        timeout=20,
        what="kubernetes attribution reported unavailable",
    )
    seen = json.loads(cli(target, "node", "sim-node-00000", "-o", "json"))["last_seen_unix"]
    wait_until(
        lambda: json.loads(cli(target, "node", "sim-node-00000", "-o", "json"))["last_seen_unix"] > seen,
        timeout=10,
        what="reports to keep coming",
    )
    assert processes.log(agent).count("kubernetes attribution unavailable") == 1
