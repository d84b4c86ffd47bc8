"""One set of fleet totals: the CLI's summary and Prometheus' fleet metrics always agree."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.eventlog import EventFollowers
from gpufleet.collector.exposition import Exposition
from gpufleet.collector.query import QueryServicer
from gpufleet.collector.state import STALE, FleetState
from gpufleet.collector.workload import WorkloadLedger
from gpufleet.v1 import ingest_pb2, query_pb2, telemetry_pb2
from tests.fleet import add_node, exposition_of


def fleet_metrics(exposition: Exposition) -> dict[str, float]:
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition.fleet().decode()):
        for sample in family.samples:
            if sample.name.startswith("gpufleet_fleet_"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
                if "health" in sample.labels:
                    key = f"{sample.name}:{sample.labels['health']}"
                    sums[key] = sums.get(key, 0.0) + sample.value
    return sums


async def test_the_summary_and_the_fleet_metrics_count_by_the_same_rules() -> None:
    now = [0.0]
    state = FleetState(clock=lambda: now[0])
    exposition = exposition_of(state)
    ledger = WorkloadLedger(state)
    state.sinks.add(ledger)
    query = QueryServicer(state, exposition.totals, EventFollowers(), ledger)
    # Idle GPUs everywhere, then the awkward cases: a GPU that failed to read, one that
    # vanished from its node's inventory, and a stale node whose last samples are old.
    add_node(state, SimulatedSource("H100", 8, node_index=3, workload="idle"), 3)
    now[0] = 50.0  # node-0003 has been silent for 5 intervals: stale
    for index in range(3):
        add_node(state, SimulatedSource("H100", 8, node_index=index, workload="idle"), index)
    node = state.find("node-0001")
    assert node is not None
    failed = telemetry_pb2.GpuSample(
        index=3, read_status=telemetry_pb2.GPU_READ_STATUS_ERROR, gpu_utilization_percent=0
    )
    state.apply_report(node, ingest_pb2.Report(sequence=node.last_sequence + 1, gpus=[failed]))
    source = SimulatedSource("H100", 8, node_index=2, workload="idle")
    source.remove_gpu(5)
    add_node(state, source, 2)
    stale = state.find("node-0003")
    assert stale is not None
    stale.state = STALE
    state.sweep()  # tells its listeners, the exposition among them
    stale.state = STALE
    exposition.refresh()

    summary = await query.GetFleetSummary(query_pb2.GetFleetSummaryRequest(), None)
    metrics = fleet_metrics(exposition)
    assert summary.gpus == metrics["gpufleet_fleet_gpus"] == 32
    assert {c.key: c.count for c in summary.gpus_by_health} == {
        health: metrics[f"gpufleet_fleet_gpus:{health}"]
        for health in ("healthy", "degraded", "lost", "unreachable")
        if f"gpufleet_fleet_gpus:{health}" in metrics
    }
    # Reachable GPUs only: not the failed read, not the vanished GPU, not the stale node's 8.
    assert summary.idle_gpus == metrics["gpufleet_fleet_idle_gpus"] == 32 - 1 - 1 - 8
    assert summary.power_draw_watts == metrics["gpufleet_fleet_power_watts"]
    assert summary.nodes == metrics["gpufleet_fleet_nodes"] == 4
