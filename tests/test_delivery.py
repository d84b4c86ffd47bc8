"""Nothing lost, with real processes and real signals: collector crashes, hangs and restarts."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from gpufleet.cli.client import FleetClient
from gpufleet.ports import free_port
from gpufleet.v1 import query_pb2
from tests.conftest import Processes, http_get, wait_until

# About 4 faults a second over 400 simulated GPUs: XIDs keep coming during the test.
FAULTY = ("--faults", "healthy", "--fault-rate-multiplier", "2e6")


def xids_per_node(base: str) -> Counter[str]:
    _, body, _ = http_get(f"{base}/metrics/nodes")
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "gpufleet_gpu_xid_errors_total":
                counts[sample.labels["node"]] += int(sample.value)
    return counts


def agent_view(target: str) -> dict[str, query_pb2.NodeView]:
    with FleetClient(target) as client:
        return {node.name: node for node in client.nodes(query_pb2.ListNodesRequest())}


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def assert_every_xid_counted_once(target: str, base: str, nodes: int) -> int:
    """Each node's XID counters equal what its agent says it sent (its last, flushed report)."""
    views = agent_view(target)
    assert len(views) == nodes
    counted = xids_per_node(base)
    sent = {name: view.agent_stats.xid_events_total for name, view in views.items()}
    assert sum(sent.values()) > 0
    assert {n: counted.get(n, 0) for n in sent} == sent
    assert all(view.agent_stats.reports_dropped_total == 0 for view in views.values())
    return sum(sent.values())


def test_kill_9_the_collector_every_xid_counted_exactly_once(processes: Processes) -> None:
    grpc_port, http_port = free_port(), free_port()
    collector, target, base = processes.collector(grpc_port=grpc_port, http_port=http_port)
    agents = processes.sim_fleet(
        "--nodes",
        "50",
        "--interval",
        "0.5",
        "--collector",
        target,
        *FAULTY,
    )
    wait_until(lambda: sum(xids_per_node(base).values()) >= 5, timeout=30, what="XIDs flowing")
    before = xids_per_node(base)
    collector.send_signal(signal.SIGKILL)
    collector.wait()
    time.sleep(2)  # agents buffer while nobody listens
    collector, _, _ = processes.collector(grpc_port=grpc_port, http_port=http_port)
    assert len(agent_view(target)) == 50  # no node forgotten, before any agent is back
    after = xids_per_node(base)
    assert all(after[node] >= count for node, count in before.items())  # counters continue
    wait_until(
        lambda: b'state="up"} 50' in http_get(f"{base}/metrics/fleet")[1], timeout=30, what="agents back"
    )
    time.sleep(2)
    stop(agents)
    assert_every_xid_counted_once(target, base, 50)
    stop(collector)


def test_a_hung_collector_is_noticed_and_everything_arrives_after(processes: Processes) -> None:
    collector, target, base = processes.collector()
    agents = processes.sim_fleet(
        "--nodes",
        "10",
        "--interval",
        "0.5",
        "--keepalive",
        "5",
        "--collector",
        target,
        *FAULTY,
    )
    wait_until(lambda: b'state="up"} 10' in http_get(f"{base}/metrics/fleet")[1], timeout=30, what="10 nodes")
    collector.send_signal(signal.SIGSTOP)  # hung, not dead
    time.sleep(20)  # well past the 10 s the agents give an unacknowledged report (keepalive 5 s + 5 s)
    collector.send_signal(signal.SIGCONT)
    wait_until(
        lambda: "connected to collector" in processes.log(agents).split("retrying")[-1],
        timeout=60,
        what="agents to reconnect",
    )
    log = processes.log(agents)
    assert "retrying" in log, "the agents never noticed the collector hang"
    time.sleep(2)
    stop(agents)
    assert_every_xid_counted_once(target, base, 10)


def test_admission_control_spreads_a_reconnection_storm(processes: Processes) -> None:
    _, target, base = processes.collector("--admission-rate", "20", "--admission-burst", "5")
    processes.sim_fleet("--nodes", "60", "--interval", "1", "--collector", target)
    wait_until(lambda: b'state="up"} 60' in http_get(f"{base}/metrics/fleet")[1], timeout=30, what="60 nodes")
    _, body, _ = http_get(f"{base}/metrics/fleet")
    rejections = next(
        s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if s.name == "gpufleet_collector_admission_rejections_total"
    )
    assert rejections > 0  # some were told when to come back, and came back
