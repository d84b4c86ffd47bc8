"""The full reference fleet (1,250 nodes x 8 GPUs) comes back within two report intervals of a restart."""

from __future__ import annotations

import signal
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Processes, free_port, http_get, wait_until

NODES = 1250
INTERVAL_S = 10.0


def nodes_seen_since(base: str, unix_time: float) -> int:
    _, body, _ = http_get(f"{base}/metrics/nodes")
    return sum(
        1
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "gpufleet_node_last_seen_timestamp_seconds" and sample.value > unix_time
    )


def collector_value(base: str, name: str) -> float:
    _, body, _ = http_get(f"{base}/metrics/fleet")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def test_restart_under_the_full_fleet(processes: Processes) -> None:
    grpc_port, http_port = free_port(), free_port()
    collector, target, base = processes.collector(grpc_port=grpc_port, http_port=http_port)
    processes.start(
        "agent.main",
        "--source",
        "sim",
        "--nodes",
        str(NODES),
        "--interval",
        str(INTERVAL_S),
        "--collector",
        target,
    )
    wait_until(
        lambda: collector_value(base, "gpufleet_collector_agent_streams") == NODES,
        timeout=60,
        what="the fleet to connect",
    )
    collector.send_signal(signal.SIGTERM)
    assert collector.wait(timeout=30) == 0
    restarted = time.monotonic()
    collector, _, _ = processes.collector(grpc_port=grpc_port, http_port=http_port)
    wait_until(
        lambda: (
            collector_value(base, "gpufleet_collector_agent_streams") == NODES
            and collector_value(base, "gpufleet_collector_reports_total") >= NODES
        ),
        timeout=2 * INTERVAL_S + 10,
        interval=0.25,
        what="every node to reconnect and report",
    )
    took = time.monotonic() - restarted
    print(f"all {NODES} nodes reconnected and reported {took:.1f} s after the restart")
    assert took < 2 * INTERVAL_S
