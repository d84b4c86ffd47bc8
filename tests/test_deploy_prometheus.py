"""deploy/prometheus and deploy/grafana against a real Prometheus that scrapes a real collector.

The collector serves a simulated fleet, a node that stopped reporting, and two nodes streamed
from this process (over the wire contract) with a fault on every GPU and an idle cluster, and
with pods and Slurm jobs holding some of their GPUs (idle, busy, stuck, shared).
Prometheus runs the scrape jobs and rule files of deploy/prometheus; every rule expression and
every dashboard query must return data, and each alert must pick the GPUs it is about.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector import health
from gpufleet.ports import free_port
from gpufleet.v1 import allocation_pb2, ingest_pb2, ingest_pb2_grpc, inventory_pb2, telemetry_pb2
from tests.conftest import ROOT, Processes, http_get, wait_until
from tests.prometheus_server import PrometheusServer, prometheus
from tests.promtool import promtool

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS_DIR / "recording.yml", PROMETHEUS_DIR / "alerts.yml"]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
SIM_NODES = 12
FAULTY = "faulty-node"
IDLE = "idle-node"
GONE = "gone-00100"
PRICE = "H100=2.50"


def run_promtool(*args: str) -> str:
    result = subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_checks_the_config_and_rules() -> None:
    out = run_promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert "SUCCESS: 2 rule files found" in out
    run_promtool("check", "rules", *map(str, RULE_FILES))


def test_promtool_rule_unit_tests_pass() -> None:
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert len(tests) >= 2
    run_promtool("test", "rules", *map(str, tests))


def test_application_xids_in_the_rules_are_those_the_health_rules_call_harmless() -> None:
    harmless = {code for code, rule in health.XID_RULES.items() if rule.health == health.HEALTHY}
    pattern = "|".join(str(code) for code in sorted(harmless))
    texts = [path.read_text() for path in [*RULE_FILES, *DASHBOARDS]]
    mentions = {m for text in texts for m in re.findall(r'xid!~\\?"([0-9|]+)\\?"', text)}
    assert mentions == {pattern}


# -- a fleet with faults ---------------------------------------------------------------------


class FaultySource(SimulatedSource):
    """An H100 node with a fault on each GPU but 0 (busy) and 7 (stuck: a hung job)."""

    def __init__(self) -> None:
        super().__init__("H100", 8, seed=7, node_index=500, interval_s=1.0)
        self.thermal_ns = 0

    def sample(self, *, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        gpus = super().sample(with_processes=with_processes)
        now = time.time_ns()
        gpus[1] = telemetry_pb2.GpuSample(index=1, read_status=telemetry_pb2.GPU_READ_STATUS_LOST)
        gpus[2].xid_events.add(code=48, time_unix_nano=now)  # double-bit ECC: hardware
        gpus[2].ecc_uncorrected_volatile = 1
        gpus[3].xid_events.add(code=13, time_unix_nano=now)  # the application's fault
        gpus[4].row_remap_pending = True
        gpus[5].row_remap_failure = True
        # Time compressed: 30 s of thermal throttling per 1 s report, so that the alert's
        # 5-minute rate crosses its threshold within seconds of the first reports.
        self.thermal_ns += 30_000_000_000
        gpus[6].throttle_hw_thermal_nanoseconds = self.thermal_ns
        gpus[6].clock_event_reasons |= 0x40
        gpus[6].gpu_temperature_celsius = 91
        busy = {"gpu_utilization_percent": 90, "sm_active_ppm": 600_000, "tensor_active_ppm": 400_000}
        stuck = {"gpu_utilization_percent": 100, "sm_active_ppm": 10_000, "tensor_active_ppm": 0}
        for index, values in ((0, busy), (7, stuck)):
            for name, value in values.items():
                setattr(gpus[index], name, value)
            gpus[index].dram_active_ppm = 200_000
        return gpus


class IdleSource(SimulatedSource):
    def __init__(self) -> None:
        super().__init__("H100", 8, seed=7, node_index=501, interval_s=1.0)

    def sample(self, *, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        gpus = super().sample(with_processes=with_processes)
        for gpu in gpus:
            gpu.gpu_utilization_percent = 0
            gpu.sm_active_ppm = 0
        return gpus


def kubernetes(gpu: int, namespace: str, pod: str) -> allocation_pb2.Allocation:
    return allocation_pb2.Allocation(
        gpu_index=gpu, source="kubernetes", namespace=namespace, pod=pod, container="main"
    )


def slurm(gpu: int, job: str, user: str) -> allocation_pb2.Allocation:
    return allocation_pb2.Allocation(gpu_index=gpu, source="slurm", job=job, user=user, account="ml")


# Who holds the streamed nodes' GPUs. The idle node: a pod, two pods sharing GPU 1, a Slurm job.
# The faulty node: a Slurm job on busy GPU 0 and one stuck on GPU 7.
ALLOCATIONS = {
    IDLE: [
        kubernetes(0, "research", "train-0"),
        kubernetes(1, "infer", "server-a"),
        kubernetes(1, "infer", "server-b"),
        slurm(2, "4242", "alice"),
    ],
    FAULTY: [slurm(0, "4300", "bob"), slurm(7, "4301", "bob")],
}
# GpufleetAllocatedGpuIdle's (node, gpu, namespace, pod, Slurm job, user): every allocation of an
# idle or stuck GPU, one per workload on a shared GPU; not the busy GPU 0 of the faulty node, nor
# the idle node's unallocated GPUs.
IDLE_ALLOCATIONS = {
    (IDLE, "0", "research", "train-0", "", ""),
    (IDLE, "1", "infer", "server-a", "", ""),
    (IDLE, "1", "infer", "server-b", "", ""),
    (IDLE, "2", "", "", "4242", "alice"),
    (FAULTY, "7", "", "", "4301", "bob"),
}


class StreamedNode:
    """One node speaking the agent protocol to the collector from a thread of this process."""

    def __init__(
        self,
        target: str,
        hostname: str,
        source: SimulatedSource,
        allocations: list[allocation_pb2.Allocation],
    ) -> None:
        self.source = source
        self.allocations = allocation_pb2.Allocations(
            allocations=allocations,
            sources=[
                allocation_pb2.AttributionSource(name="kubernetes", available=True),
                allocation_pb2.AttributionSource(name="slurm", available=True),
            ],
        )
        self.inventory = source.inventory()
        self.inventory.MergeFrom(
            inventory_pb2.NodeInventory(
                node_id=f"test-{hostname}", hostname=hostname, boot_id="boot-1", cluster="faults"
            )
        )
        self._channel = grpc.insecure_channel(target)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"node-{hostname}", daemon=True)

    def _messages(self) -> Iterator[ingest_pb2.AgentMessage]:
        hello = ingest_pb2.Hello(
            protocol_version=wire.PROTOCOL_VERSION,
            inventory=self.inventory,
            report_interval_ms=1000,
            allocations=self.allocations,
        )
        yield ingest_pb2.AgentMessage(hello=hello)
        sequence = 0
        while not self._stop.is_set():
            sequence += 1
            gpus = self.source.sample(with_processes=True)
            report = ingest_pb2.Report(sequence=sequence, time_unix_nano=time.time_ns(), gpus=gpus)
            yield ingest_pb2.AgentMessage(report=report)
            self._stop.wait(1.0)

    def _run(self) -> None:
        stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        try:
            for _ in stub.Connect(self._messages()):
                pass
        except grpc.RpcError:
            if not self._stop.is_set():
                raise

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._channel.close()
        self._thread.join(10)


def scrape_configs(instance: str) -> str:
    """deploy/prometheus/prometheus.yml's jobs aimed at this collector, and a job nobody answers."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = config["scrape_configs"]
    for job in jobs:
        for static in job["static_configs"]:
            static["targets"] = [instance if t == "collector:9490" else t for t in static["targets"]]
    jobs.append(
        {"job_name": "gpufleet-unreachable", "static_configs": [{"targets": [f"127.0.0.1:{free_port()}"]}]}
    )
    return yaml.safe_dump(jobs, sort_keys=False)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus with deploy/prometheus's jobs and rules, scraping the fleet with faults."""
    tmp = tmp_path_factory.mktemp("deploy-prometheus")
    procs = Processes(tmp)
    streamed: list[StreamedNode] = []
    try:
        _, target, base = procs.collector(
            "--stale-after-intervals", "2", "--down-after-intervals", "3", "--price", PRICE
        )
        sim = ("--source", "sim", "--interval", "1", "--collector", target)
        gone = procs.start(
            "gpufleet.agent.main", *sim, "--node-offset", "100", "--hostname", "gone", "--cluster", "faults"
        )
        procs.start("gpufleet.agent.main", *sim, "--nodes", str(SIM_NODES), "--clusters", "2", "--seed", "3")
        streamed = [
            StreamedNode(target, FAULTY, FaultySource(), ALLOCATIONS[FAULTY]),
            StreamedNode(target, IDLE, IdleSource(), ALLOCATIONS[IDLE]),
        ]
        for node in streamed:
            node.start()
        wait_until(lambda: f'node="{GONE}"'.encode() in http_get(f"{base}/metrics/nodes")[1], what=GONE)
        gone.kill()
        with prometheus(tmp, scrape_configs(base.removeprefix("http://")), RULE_FILES) as server:
            yield server
    finally:
        for node in streamed:
            node.stop()
        procs.stop_all()


def wait_for_data(server: PrometheusServer, queries: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Every query's result once all return data (rates and rules need a few scrapes)."""
    results: dict[str, list[dict[str, Any]]] = {}

    def all_answer() -> bool:
        results.update(
            {name: server.query(query) for name, query in queries.items() if not results.get(name)}
        )
        return all(results.values())

    try:
        wait_until(all_answer, timeout=45, interval=0.5, what="every query to return data")
    except AssertionError:
        empty = {name: queries[name] for name, result in results.items() if not result}
        raise AssertionError(f"no data for: {json.dumps(empty, indent=2)}") from None
    return results


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_scrape_jobs_cover_every_node_once_and_every_target_answers(fleet: PrometheusServer) -> None:
    server = fleet
    wait_until(
        lambda: (
            server.scalar("count(count by (node) (gpufleet_node_info))") == SIM_NODES + 3
            and len(server.query("up")) == 5
        ),
        timeout=30,
        what="Prometheus to see every node and scrape every target",
    )
    up = {(r["metric"]["job"], r["metric"].get("shard", "")): r["value"][1] for r in server.query("up")}
    assert up == {
        ("gpufleet-fleet", ""): "1",
        ("gpufleet-nodes", "0"): "1",
        ("gpufleet-nodes", "1"): "1",
        ("gpufleet-dcgm", ""): "1",
        ("gpufleet-unreachable", ""): "0",
    }
    # Each node's series come from exactly one shard.
    assert server.query("count by (node) (gpufleet_node_info) > 1") == []
    assert server.scalar("count(count by (shard) (gpufleet_node_info))") == 2
    # Every reachable GPU in the dcgm view (a shared GPU has a copy per workload, as in dcgm-exporter).
    assert server.scalar("count(count by (Hostname, gpu) (DCGM_FI_DEV_XID_ERRORS))") == (SIM_NODES + 2) * 8


def test_every_rule_expression_returns_data(fleet: PrometheusServer) -> None:
    queries = {rule.get("record") or rule["alert"]: rule["expr"] for rule in rules()}
    # Recorded series exist only if the rule ran in Prometheus.
    queries.update({f"recorded {r['record']}": r["record"] for r in rules() if "record" in r})
    wait_for_data(fleet, queries)


def alert_targets(result: list[dict[str, Any]], *labels: str) -> set[tuple[str, ...]]:
    return {tuple(r["metric"].get(label, "") for label in labels) for r in result}


def test_each_alert_picks_the_faults_it_is_about(fleet: PrometheusServer) -> None:
    alerts = {rule["alert"]: rule["expr"] for rule in rules() if "alert" in rule}
    results = wait_for_data(fleet, alerts)
    by_gpu = {name: alert_targets(result, "node", "gpu") for name, result in results.items()}
    assert by_gpu["GpufleetGpuLost"] == {(FAULTY, "1")}
    assert by_gpu["GpufleetHardwareXid"] == {(FAULTY, "2")}  # not GPU 3's application XID 13
    assert by_gpu["GpufleetRowRemapPending"] == {(FAULTY, "4")}
    assert by_gpu["GpufleetRowRemapFailure"] == {(FAULTY, "5")}
    assert by_gpu["GpufleetThermalThrottling"] == {(FAULTY, "6")}
    assert by_gpu["GpufleetGpuUnhealthy"] == {(FAULTY, "2"), (FAULTY, "5")}
    assert by_gpu["GpufleetGpuAtRisk"] == {(FAULTY, "4")}  # the pending remap: an early warning
    assert by_gpu["GpufleetGpuDueForRma"] == {(FAULTY, "5")}  # the failed remap: NVIDIA's RMA rule
    assert alert_targets(results["GpufleetNodeDown"], "node") == {(GONE,)}
    assert alert_targets(results["GpufleetIdleCapacityHigh"], "cluster") >= {("faults",)}
    assert alert_targets(results["GpufleetCollectorDown"], "job") == {("gpufleet-unreachable",)}
    # The simulated fleet may hold idle allocations of its own: only the streamed nodes' count.
    held = alert_targets(
        results["GpufleetAllocatedGpuIdle"], "node", "gpu", "namespace", "pod", "hpc_job", "user"
    )
    assert {target for target in held if target[0] in ALLOCATIONS} == IDLE_ALLOCATIONS
    # Prometheus loaded the alerting rules and evaluates them.
    _, body, _ = http_get(f"{fleet.url}/api/v1/rules?type=alert")
    loaded = {r["name"] for g in json.loads(body)["data"]["groups"] for r in g["rules"]}
    assert loaded == set(alerts)


def query_error(server: PrometheusServer, expression: str) -> str:
    """Prometheus's error for this query ('' when it answers)."""
    _, body, _ = http_get(f"{server.url}/api/v1/query?query={urllib.parse.quote(expression)}")
    answer = json.loads(body)
    return "" if answer["status"] == "success" else str(answer["error"])


def test_the_idle_alert_joins_a_shared_gpu_where_a_plain_join_fails(fleet: PrometheusServer) -> None:
    """GPU 1 of the idle node is held by two pods: two allocation series for one GPU."""
    (alert,) = [rule["expr"] for rule in rules() if rule.get("alert") == "GpufleetAllocatedGpuIdle"]
    shared = f'({alert}) and on (node, gpu) gpufleet_gpu_info{{node="{IDLE}", gpu="1"}}'
    result = wait_for_data(fleet, {"shared": shared})["shared"]
    assert sorted(r["metric"]["pod"] for r in result) == ["server-a", "server-b"]
    plain = (
        "gpufleet_gpu_utilization_ratio * on (node, gpu) group_left (namespace, pod)"
        ' gpufleet_gpu_allocation_info{mig=""}'
    )
    assert "many-to-many matching not allowed" in query_error(fleet, plain)


def doc_queries() -> list[str]:
    """The PromQL shown in docs/attribution.md."""
    text = (ROOT / "docs" / "attribution.md").read_text()
    return [" ".join(block.split()) for block in re.findall(r"^```promql\n(.*?)^```", text, re.S | re.M)]


def test_the_promql_in_the_attribution_doc_returns_data(fleet: PrometheusServer) -> None:
    queries = doc_queries()
    assert len(queries) >= 2
    results = wait_for_data(fleet, {str(i): q for i, q in enumerate(queries)})
    # The join gives one series per workload and GPU, a shared GPU's two pods included.
    joined = results["0"]
    assert len(
        {(r["metric"]["node"], r["metric"]["gpu"], r["metric"].get("pod", "")) for r in joined}
    ) == len(joined)


def test_the_slurm_job_keeps_its_own_label_beside_the_scrape_job(fleet: PrometheusServer) -> None:
    """`job` is the scrape job's: the collector names the Slurm job `hpc_job`, as dcgm-exporter does."""
    series = wait_for_data(fleet, {"job": 'gpufleet_gpu_allocation_info{hpc_job="4242"}'})["job"]
    assert {(r["metric"]["job"], r["metric"]["node"], r["metric"]["user"]) for r in series} == {
        ("gpufleet-nodes", IDLE, "alice")
    }
    workloads = wait_for_data(fleet, {"w": 'gpufleet_workload_gpus{hpc_job="4242"}'})["w"]
    assert {r["metric"]["job"] for r in workloads} == {"gpufleet-fleet"}


# -- Grafana dashboards ----------------------------------------------------------------------

GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
PANEL_TYPES = {"stat", "timeseries", "bargauge", "table"}
# A recording rule's name in an expression: level:metric:operations (the level may be empty).
RECORDED_NAME = re.compile(r"(?<![\w:])[a-zA-Z_]*:[a-zA-Z0-9_:]*[a-zA-Z0-9_]")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's panels, rows left out (a collapsed row holds its panels)."""
    return [
        panel
        for item in dashboard["panels"]
        for panel in (item["panels"] if item["type"] == "row" else [item])
    ]


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"{dashboard['uid']} / {panel['title']} / {target['refId']}", target["expr"])
        for panel in panels(dashboard)
        for target in panel["targets"]
    ]


def custom_options(variable: dict[str, Any]) -> list[str]:
    return [option.strip() for option in variable["query"].split(",")]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_has_the_structure_grafana_needs(path: Path) -> None:
    dashboard = load(path)
    assert dashboard["uid"] == path.stem and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables_ = variables(dashboard)
    assert (
        variables_["datasource"]["type"] == "datasource" and variables_["datasource"]["query"] == "prometheus"
    )
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    rows = [item for item in dashboard["panels"] if item["type"] == "row"]
    ids = [panel["id"] for panel in [*rows, *panels(dashboard)]]
    assert len(ids) == len(set(ids)) and dashboard["panels"]
    # A row is a header across the dashboard; an open one owns the panels below it.
    for row in rows:
        assert row["title"] and row["gridPos"] | {"y": 0} == {"x": 0, "y": 0, "w": 24, "h": 1}, row["title"]
        assert row["collapsed"] or row["panels"] == [], row["title"]
    # Panels of the open rows, and the rows, do not overlap.
    taken: dict[tuple[int, int], str] = {}
    for item in dashboard["panels"]:
        grid = item["gridPos"]
        for cell in (
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        ):
            assert cell not in taken, f"{item['title']} overlaps {taken[cell]}"
            taken[cell] = item["title"]
    for panel in panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["datasource"] == datasource, panel["title"]
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource and target["expr"].strip(), panel["title"]
    for name, variable in variables_.items():
        if variable["type"] == "query":
            assert variable["datasource"] == datasource, name
        if variable["type"] == "custom":
            options = custom_options(variable)
            assert [option["value"] for option in variable["options"]] == options, name
            assert variable["current"]["value"] in options, name
    # Every $variable used is defined or one of Grafana's own.
    used = {m for _, expr in panel_queries(dashboard) for m in re.findall(r"\$\{?(\w+)", expr)}
    assert used <= set(variables_) | set(GRAFANA_BUILTINS), used - set(variables_)
    # Links point at dashboards that exist.
    uids = {load(p)["uid"] for p in DASHBOARDS}
    for link in re.findall(r"/d/([\w-]+)/", path.read_text()):
        assert link in uids


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, expr
    return expr


def label_values(query: str) -> tuple[str, str]:
    """Grafana's label_values(METRIC, LABEL) variable query: (METRIC, LABEL)."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert match, query
    return match.group(1), match.group(2)


def test_dashboards_read_recording_rules_that_exist() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for path in DASHBOARDS:
        for name, expr in panel_queries(load(path)):
            used = set(RECORDED_NAME.findall(expr))
            assert used <= recorded, f"{name}: no recording rule for {sorted(used - recorded)}"


def test_every_dashboard_query_and_variable_returns_data(fleet: PrometheusServer) -> None:
    # Multi-value variables set to "All" (".*"); the node dashboard on the faulty node.
    values = {**GRAFANA_BUILTINS, "cluster": ".*", "model": ".*", "node": FAULTY}
    queries: dict[str, str] = {}
    labels: dict[str, str] = {}
    for path in DASHBOARDS:
        dashboard = load(path)
        # Custom variables at their current value, and each of their other options.
        custom = {name: v for name, v in variables(dashboard).items() if v["type"] == "custom"}
        current = {**values, **{name: v["current"]["value"] for name, v in custom.items()}}
        for name, expr in panel_queries(dashboard):
            queries[name] = substitute(expr, current)
            for custom_name, custom_variable in custom.items():
                if not re.search(rf"\$\{{?{custom_name}\b", expr):
                    continue
                for option in custom_options(custom_variable):
                    if option != current[custom_name]:
                        choice = {**current, custom_name: option}
                        queries[f"{name} [{custom_name}={option}]"] = substitute(expr, choice)
        # Grafana asks for METRIC's series and offers the values of LABEL.
        for name, variable in variables(dashboard).items():
            if variable["type"] == "query":
                key = f"{dashboard['uid']} / ${name}"
                metric, labels[key] = label_values(variable["query"])
                queries[key] = substitute(metric, values)
    results = wait_for_data(fleet, queries)
    for key, label in labels.items():
        assert all(label in r["metric"] for r in results[key]), key
