"""The full reference fleet (1,250 nodes x 8 GPUs) reports to a collector that was restarted, or
crashed and came back after an outage, within two report intervals of its return."""

from __future__ import annotations

import re
import signal
import time
from subprocess import Popen

from prometheus_client.parser import text_string_to_metric_families

from gpufleet.ports import free_port
from tests.conftest import Processes, http_get, wait_until

NODES = 1250
INTERVAL_S = 10.0
OUTAGE_S = 5.0


# /metrics/nodes holds every GPU's series too (about 36 MB for this fleet): the full
# parser takes seconds over it, a scan for the one family needed takes milliseconds.
LAST_SEEN = re.compile(rb"^gpufleet_node_last_seen_timestamp_seconds\{.*\} (\S+)$", re.MULTILINE)


def nodes_seen_since(base: str, unix_time: float) -> int:
    """Nodes whose latest report reached the collector after ``unix_time``."""
    _, body, _ = http_get(f"{base}/metrics/nodes")
    return sum(1 for value in LAST_SEEN.findall(body) if float(value) > unix_time)


def collector_value(base: str, name: str) -> float:
    _, body, _ = http_get(f"{base}/metrics/fleet")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def every_node_reported(base: str, since_unix: float) -> bool:
    # The cheap fleet-wide counters first; the per-node check only once they agree.
    return (
        collector_value(base, "gpufleet_collector_agent_streams") == NODES
        and collector_value(base, "gpufleet_collector_reports_total") >= NODES
        and nodes_seen_since(base, since_unix) == NODES
    )


def restart_and_measure(processes: Processes, grpc_port: int, http_port: int) -> tuple[Popen[bytes], str]:
    """Start the collector again on the same ports and database; time until every node reported."""
    restarted, restarted_unix = time.monotonic(), time.time()
    collector, _, base = processes.collector(grpc_port=grpc_port, http_port=http_port)
    ready = time.monotonic() - restarted
    wait_until(
        lambda: collector_value(base, "gpufleet_collector_agent_streams") == NODES,
        timeout=2 * INTERVAL_S + 10,
        interval=0.25,
        what="every node to reconnect",
    )
    connected = time.monotonic() - restarted
    wait_until(
        lambda: every_node_reported(base, restarted_unix),
        timeout=2 * INTERVAL_S + 10,
        interval=0.25,
        what="every node to report",
    )
    took = time.monotonic() - restarted
    told_to_wait = collector_value(base, "gpufleet_collector_admission_rejections_total")
    summary = (
        f"all {NODES} nodes reported {took:.1f} s after the collector was started again "
        f"(ready after {ready:.1f} s, every node connected after {connected:.1f} s, "
        f"{told_to_wait:.0f} streams told to come back later)"
    )
    print(summary)
    assert took < 2 * INTERVAL_S, summary
    return collector, summary


def test_the_fleet_reports_within_two_intervals_of_a_collector_restart_or_crash(processes: Processes) -> None:
    grpc_port, http_port = free_port(), free_port()
    collector, target, base = processes.collector(grpc_port=grpc_port, http_port=http_port)
    fleet = processes.sim_fleet(
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
        interval=0.5,
        what="the fleet to connect",
    )

    print("graceful restart:", end=" ")
    collector.send_signal(signal.SIGTERM)
    assert collector.wait(timeout=30) == 0
    collector, _ = restart_and_measure(processes, grpc_port, http_port)

    print(f"crash and a {OUTAGE_S:.0f} s outage:", end=" ")
    collector.send_signal(signal.SIGKILL)
    collector.wait(timeout=10)
    time.sleep(OUTAGE_S)
    restart_and_measure(processes, grpc_port, http_port)

    # Every stream end was one line of its own, never a crash report.
    assert "Traceback" not in processes.log(fleet)
