"""Real processes: a collector and simulated agents on free ports, the CLI against them."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.ports import free_port
from gpufleet.v1 import inventory_pb2, telemetry_pb2
from tests.conftest import ROOT, Processes, http_get, wait_until

NODES = 20
SEED = 11


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def metric_samples(base: str) -> dict[tuple[str, str, str], float]:
    """(name, node, gpu) -> value for every per-GPU series."""
    _, body, _ = http_get(f"{base}/metrics")
    return {
        (s.name, s.labels.get("node", ""), s.labels.get("gpu", "")): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def expected_fleet() -> dict[str, tuple[inventory_pb2.NodeInventory, list[telemetry_pb2.GpuSample]]]:
    """What the simulator produced for each node's first report (same seed, same node index)."""
    fleet = {}
    for index in range(NODES):
        source = SimulatedSource("H100", 8, seed=SEED, node_index=index, interval_s=3600)
        fleet[f"sim-node-{index:05d}"] = (source.inventory(), source.sample(with_processes=True))
    return fleet


def test_every_simulated_gpu_appears_with_the_simulated_values(processes: Processes) -> None:
    _, target, base = processes.collector()
    processes.sim_fleet(
        "--nodes",
        str(NODES),
        "--seed",
        str(SEED),
        "--interval",
        "3600",
        "--collector",
        target,
    )
    wait_until(
        lambda: sum(1 for k in metric_samples(base) if k[0] == "gpufleet_gpu_utilization_ratio") == NODES * 8,
        what="every GPU's first report",
    )
    series = metric_samples(base)
    listed = json.loads(cli("gpus", "--collector", target, "--output", "json").stdout)
    by_key = {(row["node"], row["gpu"]): row for row in listed}
    assert len(listed) == NODES * 8
    for node, (inventory, samples) in expected_fleet().items():
        for gpu_inventory, sample in zip(inventory.gpus, samples, strict=True):
            gpu = str(sample.index)
            assert (
                series[("gpufleet_gpu_utilization_ratio", node, gpu)] == sample.gpu_utilization_percent / 100
            )
            assert series[("gpufleet_gpu_power_watts", node, gpu)] == sample.power_draw_milliwatts / 1000
            assert series[("gpufleet_gpu_memory_used_bytes", node, gpu)] == sample.memory_used_bytes
            assert series[("gpufleet_gpu_temperature_celsius", node, gpu)] == sample.gpu_temperature_celsius
            assert series[("gpufleet_gpu_processes", node, gpu)] == len(sample.processes.processes)
            row = by_key[(node, sample.index)]
            assert row["uuid"] == gpu_inventory.uuid
            assert row["utilization_ratio"] == sample.gpu_utilization_percent / 100
            assert row["memory_used_bytes"] == sample.memory_used_bytes
            assert row["power_watts"] == sample.power_draw_milliwatts / 1000
            assert row["temperature_celsius"] == sample.gpu_temperature_celsius
            assert row["health"] == "healthy"


def test_cli_tables_csv_and_filters(processes: Processes) -> None:
    _, target, _ = processes.collector()
    processes.sim_fleet(
        "--nodes",
        "4",
        "--interval",
        "1",
        "--collector",
        target,
        "--model",
        "A100",
    )
    wait_until(
        lambda: json.loads(cli("summary", "--collector", target, "-o", "json").stdout)[0]["gpus"] == 32,
        what="4 nodes",
    )
    summary = cli("summary", "--collector", target).stdout
    assert "NVIDIA A100-SXM4-80GB" in summary and "32" in summary
    table = cli("gpus", "--collector", target, "--node", "sim-node-00002").stdout.splitlines()
    assert table[0].split()[:4] == ["NODE", "GPU", "MODEL", "HEALTH"]
    assert len(table) == 9
    assert len({line.index("A100") for line in table[1:]}) == 1  # aligned columns
    rows = list(csv.DictReader(io.StringIO(cli("gpus", "--collector", target, "-o", "csv").stdout)))
    assert len(rows) == 32 and rows[0]["model"] == "NVIDIA A100-SXM4-80GB"
    nodes = cli("nodes", "--collector", target).stdout
    assert nodes.count("sim-node-") == 4 and " up " in nodes
    detail = cli("node", "sim-node-00001", "--collector", target).stdout
    assert "sim-node-00001" in detail and "UUID" in detail
    missing = cli("node", "nope", "--collector", target, check=False)
    assert missing.returncode == 1 and "no node" in missing.stderr and "Traceback" not in missing.stderr


def test_unreachable_collector_is_one_line_and_a_nonzero_exit() -> None:
    result = cli("summary", "--collector", f"127.0.0.1:{free_port()}", "--timeout", "2", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot reach the collector" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_without_nvml_suggests_the_simulator() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.agent.main", "--once"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--source sim" in result.stderr and "Traceback" not in result.stderr


def test_agent_once_prints_inventory_and_a_sample() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.agent.main", "--source", "sim", "--once", "--model", "B200"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["inventory"]["gpus"][0]["name"] == "NVIDIA B200"
    assert [g["index"] for g in data["gpus"]] == list(range(8))


def test_sigterm_stops_agent_and_collector_cleanly(processes: Processes) -> None:
    collector, target, base = processes.collector()
    agent = processes.sim_fleet("--nodes", "3", "--interval", "0.5", "--collector", target)
    wait_until(lambda: b'state="up"} 3' in http_get(f"{base}/metrics/fleet")[1], what="3 nodes up")
    for process in (agent, collector):
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, processes.log(process)
        assert time.monotonic() - started < 10


def test_killed_agents_become_stale_then_down(processes: Processes) -> None:
    _, target, base = processes.collector("--stale-after-intervals", "3", "--down-after-intervals", "6")
    agent = processes.sim_fleet("--nodes", "2", "--interval", "0.5", "--collector", target)
    wait_until(lambda: b'state="up"} 2' in http_get(f"{base}/metrics/fleet")[1], what="2 nodes up")
    agent.send_signal(signal.SIGKILL)
    wait_until(lambda: b'state="stale"} 2' in http_get(f"{base}/metrics/fleet")[1], timeout=10, what="stale")
    wait_until(lambda: b'state="down"} 2' in http_get(f"{base}/metrics/fleet")[1], timeout=10, what="down")
    _, body, _ = http_get(f"{base}/metrics")
    assert body.count(b'state="unreachable"} 1') == 16
    listed = json.loads(cli("gpus", "--collector", target, "-o", "json").stdout)
    assert {row["health"] for row in listed} == {"unreachable"} and len(listed) == 16


def test_events_listed_and_followed(processes: Processes) -> None:
    _, target, _ = processes.collector()
    processes.sim_fleet(
        "--nodes",
        "5",
        "--interval",
        "0.5",
        "--collector",
        target,
        "--faults",
        "healthy",
        "--fault-rate-multiplier",
        "1e7",
    )
    wait_until(
        lambda: json.loads(cli("events", "--collector", target, "--kind", "xid", "-o", "json").stdout),
        what="XID events",
    )
    table = cli("events", "--collector", target, "--since", "10m").stdout.splitlines()
    assert table[0].split() == ["TIME", "SEVERITY", "NODE", "GPU", "KIND", "REASON", "ACTION"]
    assert any("node_registered" in line for line in table)
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "events",
            "--follow",
            "--kind",
            "xid",
            "-o",
            "json",
            "--collector",
            target,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert follower.stdout is not None
        followed = [json.loads(follower.stdout.readline()) for _ in range(2)]
        assert [event["kind"] for event in followed] == ["xid", "xid"]
        assert followed[0]["id"] < followed[1]["id"]
    finally:
        follower.send_signal(signal.SIGINT)
        _, errors = follower.communicate(timeout=10)
    assert "Traceback" not in errors
