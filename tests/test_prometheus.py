"""A real Prometheus scrapes the real collector; PromQL sees the fleet."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Processes, wait_until
from tests.prometheus_server import prometheus

NODES = 25


def test_prometheus_counts_the_fleets_gpus(processes: Processes, tmp_path: Path) -> None:
    _, target, base = processes.collector()
    processes.sim_fleet(
        "--nodes",
        str(NODES),
        "--interval",
        "1",
        "--clusters",
        "2",
        "--collector",
        target,
    )
    host_port = base.removeprefix("http://")
    scrape = f"  - job_name: gpufleet\n    static_configs:\n      - targets: ['{host_port}']\n"
    with prometheus(tmp_path, scrape) as server:
        wait_until(
            lambda: server.scalar("count(gpufleet_gpu_info)") == NODES * 8,
            timeout=60,
            what="prometheus to see every GPU",
        )
        assert server.scalar('sum(gpufleet_fleet_gpus{health="healthy"})') == NODES * 8
        assert server.scalar('sum(gpufleet_fleet_nodes{state="up"})') == NODES
        assert server.scalar('up{job="gpufleet"}') == 1
        # Per-GPU series join to their metadata through the info metric.
        joined = server.query(
            "gpufleet_gpu_utilization_ratio * on(node, gpu) group_left(model) gpufleet_gpu_info"
        )
        assert len(joined) == NODES * 8 and joined[0]["metric"]["model"] == "NVIDIA H100 80GB HBM3"
        clusters = server.query("gpufleet_fleet_gpu_utilization_mean_ratio")
        assert len(clusters) == 2
