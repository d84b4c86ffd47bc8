"""Three collectors, one PostgreSQL, 1,250 simulated nodes (10,000 GPUs), VictoriaMetrics on top.

kill -9 one collector: the others serve its nodes within two report intervals (three on a busy
machine), every GPU is exported exactly once, XID counters equal what the agents sent, every
event is logged once, and the global sum in VictoriaMetrics is off for about a scrape at most.
Restart it: its nodes move back.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psycopg
import yaml

from gpufleet.cli.client import FleetClient
from gpufleet.ports import free_port
from gpufleet.v1 import events_pb2, query_pb2
from tests.conftest import ROOT, Processes, http_get, wait_until
from tests.postgres_server import PostgresServer
from tests.prometheus_server import victoria_metrics
from tests.test_delivery import stop

SCRAPE_CONFIG = ROOT / "deploy" / "victoria-metrics" / "scrape.yml"
NODES = 1250
GPUS = NODES * 8
INTERVAL_S = 5.0
LEASE_S = 3.0
# VictoriaMetrics scrapes each collector this often. A lease at least 1.25 times as long means
# a dead collector's first failed scrape (which drops its series) comes before anyone takes its
# nodes (at least lease - lease/5 after its last renewal): its GPUs are not counted twice.
SCRAPE_S = 2.0
FAULTS = ("--faults", "healthy", "--fault-rate-multiplier", "2e5")
GPU_INFO = re.compile(rb'^gpufleet_gpu_info\{node="([^"]*)",gpu="(\d+)"', re.M)
XIDS = re.compile(rb'^gpufleet_gpu_xid_errors_total\{node="([^"]*)",[^}]*\} (\d+)', re.M)


def bodies(bases: list[str]) -> list[bytes]:
    return [http_get(f"{base}/metrics/nodes", timeout=10)[1] for base in bases]


def gpus_served(bases: list[str]) -> Counter[tuple[bytes, bytes]]:
    """How many collectors export each GPU (node, index)."""
    return Counter(match for body in bodies(bases) for match in GPU_INFO.findall(body))


def every_gpu_once(bases: list[str]) -> bool:
    served = gpus_served(bases)
    return len(served) == GPUS and set(served.values()) == {1}


def xids_per_node(bases: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for body in bodies(bases):
        for node, count in XIDS.findall(body):
            counts[node.decode()] += int(count)
    return counts


def test_three_collectors_serve_every_gpu_once_through_a_kill_9_and_a_restart(
    processes: Processes, postgresql: PostgresServer, tmp_path: Path
) -> None:
    ports = [(free_port(), free_port()) for _ in range(3)]

    def start(index: int) -> tuple[object, str, str]:
        grpc_port, http_port = ports[index]
        return processes.collector(
            "--db",
            postgresql.dsn,
            "--collector-id",
            f"c{index}",
            "--lease-seconds",
            str(LEASE_S),
            grpc_port=grpc_port,
            http_port=http_port,
        )

    tier = [start(i) for i in range(3)]
    targets = [target for _, target, _ in tier]
    bases = [base for _, _, base in tier]
    agents = processes.sim_fleet(
        "--nodes",
        str(NODES),
        "--interval",
        str(INTERVAL_S),
        "--collector",
        ",".join(targets),
        "--failback-after",
        "2",
        *FAULTS,
    )
    wait_until(lambda: every_gpu_once(bases), timeout=120, interval=1, what="every GPU served once")
    # The reference global view of deploy/victoria-metrics, pointed at these three collectors.
    jobs = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    for job in jobs:
        job["scrape_interval"] = f"{SCRAPE_S:.0f}s"
        job["static_configs"] = [{"targets": [base.removeprefix("http://") for base in bases]}]
    with victoria_metrics(tmp_path, yaml.safe_dump(jobs)) as vm:
        wait_until(
            lambda: vm.scalar("sum(gpufleet_fleet_gpus)") == GPUS, timeout=60, what="VM sees the fleet"
        )
        wait_until(
            lambda: vm.scalar("count(gpufleet_gpu_info)") == GPUS, timeout=30, what="VM sees every GPU"
        )
        seen_whole = time.time()
        before = xids_per_node(bases)
        # The collectors' own series carry their names; the per-GPU ones do not.
        assert len(vm.query("gpufleet_collector_tier_nodes")) == 3
        assert vm.query('count(gpufleet_gpu_info{collector!=""})') == []
        # kill -9 the first collector: its nodes are served by the others within two intervals.
        victim, _, _ = tier[0]
        killed = time.monotonic()
        victim.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        victim.wait()  # type: ignore[attr-defined]
        wait_until(lambda: every_gpu_once(bases[1:]), timeout=60, interval=0.5, what="the others serving all")
        failover_s = time.monotonic() - killed
        # Two report intervals by design (a lease shorter than an interval, then each agent's next
        # report); a third when the rest of the suite shares the machine's two cores.
        assert failover_s <= 3 * INTERVAL_S, f"failover took {failover_s:.1f} s"
        # Counters continue (what the dead one took in but had not acknowledged is sent again).
        wait_until(
            lambda: all(xids_per_node(bases[1:])[node] >= count for node, count in before.items()),
            timeout=INTERVAL_S * 2,
            interval=0.5,
            what="XID counters continuing",
        )
        time.sleep(2 * SCRAPE_S + 1)  # the others scraped after the takeover
        # The global sum, second by second: short of 10,000 from the dead collector's first failed
        # scrape until the others have taken over and been scraped; over it for at most a scrape
        # (a node moving between the live two, each one's last scrape standing until its next).
        sums = vm.range("sum(gpufleet_fleet_gpus)", seen_whole, time.time(), step=1)
        assert sums[0] == sums[-1] == GPUS, sums
        # (the others' scrapes lag a little when the machine is busy: up to three scrape intervals)
        assert sum(value < GPUS for value in sums) <= failover_s + 3 * SCRAPE_S, (failover_s, sums)
        assert sum(value > GPUS for value in sums) <= SCRAPE_S + 1, sums
        assert vm.scalar("count(gpufleet_gpu_info)") == GPUS
        # Back: the restarted collector takes its nodes again (after the agents' hold-down).
        tier[0] = start(0)
        wait_until(
            lambda: every_gpu_once(bases) and len(gpus_served(bases[:1])) > GPUS // 5,
            timeout=90,
            interval=1,
            what="nodes back on the restarted collector",
        )
    stop(agents)
    time.sleep(2)
    with FleetClient(targets[1]) as client:
        views = {view.name: view for view in client.nodes(query_pb2.ListNodesRequest())}
        assert client.missing == set() and client.collectors == 3
    assert len(views) == NODES
    sent = {name: view.agent_stats.xid_events_total for name, view in views.items()}
    assert sum(sent.values()) > 0
    counted = xids_per_node(bases)
    assert {name: counted.get(name, 0) for name in sent} == sent
    assert all(view.agent_stats.reports_dropped_total == 0 for view in views.values())
    # Every event logged once: no two with the same node, kind, GPU and time, ids unique.
    with psycopg.connect(postgresql.dsn) as db:
        events = [events_pb2.Event.FromString(blob) for (blob,) in db.execute("SELECT event FROM events")]
    keys = Counter((e.node_id, e.kind, e.gpu_index, e.time_unix_nano, e.reason) for e in events)
    assert keys and max(keys.values()) == 1, keys.most_common(3)
    assert len({e.id for e in events}) == len(events)


def test_the_global_view_files_are_what_victoria_metrics_and_vmalert_accept() -> None:
    scrape = subprocess.run(
        ["victoria-metrics", f"-promscrape.config={SCRAPE_CONFIG}", "-promscrape.config.dryRun"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert scrape.returncode == 0, scrape.stderr
    rules = ROOT / "deploy" / "prometheus"
    vmalert = subprocess.run(
        ["vmalert", "-dryRun", f"-rule={rules / 'recording.yml'}", f"-rule={rules / 'alerts.yml'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert vmalert.returncode == 0, vmalert.stderr


def test_a_collector_cut_off_from_postgresql_stops_and_its_agents_fail_over_losing_nothing(
    processes: Processes, postgresql: PostgresServer
) -> None:
    nodes = 50
    # a reaches PostgreSQL through the proxy that the test cuts; b directly.
    _, target_a, base_a = processes.collector(
        "--db", postgresql.proxy_dsn, "--collector-id", "a", "--lease-seconds", "2"
    )
    _, target_b, base_b = processes.collector(
        "--db", postgresql.dsn, "--collector-id", "b", "--lease-seconds", "2"
    )
    agents = processes.sim_fleet(
        "--nodes",
        str(nodes),
        "--interval",
        "1",
        "--collector",
        f"{target_a},{target_b}",
        *("--faults", "healthy", "--fault-rate-multiplier", "2e6"),
    )

    def served(base: str) -> Counter[tuple[bytes, bytes]]:
        return gpus_served([base])

    wait_until(lambda: len(served(base_a) + served(base_b)) == nodes * 8, timeout=60, what="every GPU served")
    assert served(base_a), "no node chose a"
    postgresql.block()
    twice = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        on_a, on_b = served(base_a), served(base_b)
        twice = max(twice, len(set(on_a) & set(on_b)))
        if not on_a and len(on_b) == nodes * 8:
            break
        time.sleep(0.2)
    assert not served(base_a) and len(served(base_b)) == nodes * 8, "a's agents did not move to b"
    assert twice == 0, f"{twice} GPUs exported by both at once"
    time.sleep(2)
    stop(agents)
    time.sleep(1)
    with FleetClient(target_b) as client:
        views = {view.name: view for view in client.nodes(query_pb2.ListNodesRequest())}
    sent = {name: view.agent_stats.xid_events_total for name, view in views.items()}
    assert len(views) == nodes and sum(sent.values()) > 0
    counted = xids_per_node([base_b])
    assert {name: counted.get(name, 0) for name in sent} == sent
    postgresql.unblock()
