"""The workload ledger: allocated and idle GPUs per workload, their GPU-seconds and cost."""

from __future__ import annotations

import pytest

from gpufleet import wire
from gpufleet.allocations import Prices
from gpufleet.collector.state import FleetState, Liveness, NodeRecord
from gpufleet.collector.workload import RETENTION_S, WorkloadLedger, mig_units
from gpufleet.v1 import allocation_pb2, ingest_pb2, inventory_pb2, telemetry_pb2

H100 = "NVIDIA H100 80GB HBM3"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall_ns(self) -> int:
        return int(self.now * 1e9)


def inventory(gpus: int = 2, mig: list[tuple[int, str]] | None = None) -> inventory_pb2.NodeInventory:
    node = inventory_pb2.NodeInventory(node_id="n1", hostname="host-1", boot_id="b1", cluster="c1")
    for index in range(gpus):
        gpu = node.gpus.add(index=index, uuid=f"GPU-{index}", name=H100)
        if index == 0 and mig:
            for position, (gi, profile) in enumerate(mig):
                gpu.mig_instances.add(index=position, uuid=f"MIG-{gi}", gpu_instance_id=gi, profile=profile)
    return node


def sample(index: int, util: int | None = 90, sm_ppm: int | None = 800_000) -> telemetry_pb2.GpuSample:
    s = telemetry_pb2.GpuSample(index=index, read_status=telemetry_pb2.GPU_READ_STATUS_OK)
    if util is not None:
        s.gpu_utilization_percent = util
    if sm_ppm is not None:
        s.sm_active_ppm = sm_ppm
    return s


def allocation(gpu: int, gi: int | None = None, **values: str) -> allocation_pb2.Allocation:
    a = allocation_pb2.Allocation(gpu_index=gpu, source=values.pop("source", "kubernetes"))
    if gi is not None:
        a.gpu_instance_id = gi
    for key, value in values.items():
        setattr(a, key, value)
    return a


class Fleet:
    def __init__(self, node_inventory: inventory_pb2.NodeInventory, prices: dict[str, float] | None = None):
        self.clock = Clock()
        self.state = FleetState(Liveness(), clock=self.clock)
        self.ledger = WorkloadLedger(self.state, Prices(prices), self.clock, self.clock.wall_ns)
        self.state.sinks.add(self.ledger)
        self.node: NodeRecord = self.state.hello(
            ingest_pb2.Hello(
                protocol_version=wire.PROTOCOL_VERSION, inventory=node_inventory, report_interval_ms=10_000
            )
        )

    def report(
        self,
        samples: list[telemetry_pb2.GpuSample],
        allocations: list[allocation_pb2.Allocation] | None = None,
    ) -> None:
        report = ingest_pb2.Report(sequence=self.node.last_sequence + 1, time_unix_nano=1, gpus=samples)
        if allocations is not None:
            report.allocations.allocations.extend(allocations)
        self.state.apply_report(self.node, report)
        self.ledger.refresh()

    def rows(self) -> dict[tuple[str, str, str, str], object]:
        return {row.key: row for row in self.ledger.rows()}


def test_allocated_idle_and_unallocated_gpus_per_workload() -> None:
    fleet = Fleet(inventory(gpus=3))
    fleet.report(
        [sample(0), sample(1, util=0, sm_ppm=0), sample(2)],
        [allocation(0, namespace="ml", pod="train-0"), allocation(1, namespace="ml", pod="train-1")],
    )
    (row,) = fleet.ledger.rows()
    assert row.key == ("c1", "ml", "", "")
    assert row.gpus == 2
    assert row.idle_gpus == {"utilization": 1, "sm_active": 1}
    allocated, unallocated = fleet.ledger.fleet_gpus()
    assert allocated == {("c1", H100): 2}
    assert unallocated == {("c1", H100): 1}


def test_a_stuck_gpu_is_idle_by_sm_activity_though_fully_utilized() -> None:
    fleet = Fleet(inventory(gpus=1))
    fleet.report([sample(0, util=100, sm_ppm=10_000)], [allocation(0, source="slurm", job="77", user="ana")])
    (row,) = fleet.ledger.rows()
    assert row.key == ("c1", "", "77", "ana")
    assert row.idle_gpus == {"utilization": 0, "sm_active": 1}


def test_gpu_seconds_accrue_with_time_and_follow_changes() -> None:
    fleet = Fleet(inventory(gpus=2), prices={"H100": 3.6})
    held = [allocation(0, namespace="ml"), allocation(1, namespace="ml")]
    fleet.report([sample(0), sample(1)], held)
    fleet.clock.now += 100
    fleet.report([sample(0), sample(1, util=0, sm_ppm=0)], held)  # GPU 1 goes idle
    fleet.clock.now += 50
    (row,) = fleet.ledger.rows()
    assert row.gpu_seconds == pytest.approx(300)
    assert row.idle_gpu_seconds == {"utilization": pytest.approx(50), "sm_active": pytest.approx(50)}
    # 3.60 per GPU-hour is 0.001 per GPU-second.
    assert row.cost == pytest.approx(0.3)
    assert row.idle_cost is not None
    assert row.idle_cost["utilization"] == pytest.approx(0.05)
    assert row.idle_cost["sm_active"] == pytest.approx(0.05)


def test_no_prices_no_cost() -> None:
    fleet = Fleet(inventory(gpus=1))
    fleet.report([sample(0)], [allocation(0, namespace="ml")])
    (row,) = fleet.ledger.rows()
    assert row.cost is None
    assert b"gpufleet_workload_cost_total{" not in fleet.ledger.render()


def test_prices_match_the_longest_part_of_the_model_name() -> None:
    prices = Prices({"H100": 2.5, "h100 80gb": 3.0, "A100": 1.5})
    assert prices.per_hour(H100) == 3.0
    assert prices.per_hour("NVIDIA A100-SXM4-80GB") == 1.5
    assert prices.per_hour("NVIDIA B200") is None


def test_mig_instances_count_their_slices() -> None:
    assert mig_units("1g.10gb") * 7 == mig_units("7g.80gb")
    assert mig_units("1c.3g.40gb") == mig_units("1g.10gb")
    fleet = Fleet(inventory(gpus=1, mig=[(1, "3g.40gb"), (2, "1g.10gb")]))
    gpu = sample(0, util=None, sm_ppm=None)
    gpu.mig_instances.add(gpu_instance_id=1, sm_active_ppm=700_000)
    gpu.mig_instances.add(gpu_instance_id=2, sm_active_ppm=0)
    fleet.report([gpu], [allocation(0, gi=1, namespace="a"), allocation(0, gi=2, namespace="b")])
    rows = fleet.rows()
    assert rows[("c1", "a", "", "")].gpus == pytest.approx(3 / 7)  # type: ignore[attr-defined]
    assert rows[("c1", "b", "", "")].gpus == pytest.approx(1 / 7)  # type: ignore[attr-defined]
    assert rows[("c1", "b", "", "")].idle_gpus["sm_active"] == pytest.approx(1 / 7)  # type: ignore[attr-defined]
    _, unallocated = fleet.ledger.fleet_gpus()
    assert unallocated == {}


def test_a_shared_gpu_is_split_between_its_workloads() -> None:
    fleet = Fleet(inventory(gpus=1))
    fleet.report(
        [sample(0)],
        [allocation(0, source="slurm", job="1", user="a"), allocation(0, source="slurm", job="2", user="b")],
    )
    assert [row.gpus for row in fleet.ledger.rows()] == [0.5, 0.5]


def test_a_node_that_stops_reporting_stops_counting_and_its_counters_expire() -> None:
    fleet = Fleet(inventory(gpus=1))
    fleet.report([sample(0)], [allocation(0, namespace="ml")])
    fleet.clock.now += 10
    fleet.state.sweep()  # not yet stale
    fleet.clock.now += 200  # silent: down
    fleet.state.sweep()
    fleet.ledger.refresh()
    (row,) = fleet.ledger.rows()
    assert row.gpus == 0
    assert row.gpu_seconds == pytest.approx(210)
    fleet.clock.now += RETENTION_S + 1
    assert fleet.ledger.rows() == []


def test_since_when_a_gpu_is_held_and_idle() -> None:
    fleet = Fleet(inventory(gpus=1))
    start = fleet.clock.wall_ns()
    fleet.report([sample(0)], [allocation(0, namespace="ml", pod="p")])
    fleet.clock.now += 60
    fleet.report([sample(0, util=0, sm_ppm=0)])
    fleet.clock.now += 60
    fleet.report([sample(0, util=1, sm_ppm=0)])
    ((_, slot),) = list(fleet.ledger.slots())
    assert slot.allocated_since_ns == start
    assert slot.idle_since_ns == start + 60 * 10**9
    fleet.report([sample(0)], [allocation(0, namespace="ml", pod="other")])
    ((_, slot),) = list(fleet.ledger.slots())
    assert slot.allocated_since_ns == start + 120 * 10**9
    assert slot.idle_since_ns == 0


def test_rendered_families_escape_hostile_values() -> None:
    fleet = Fleet(inventory(gpus=1), prices={"H100": 2})
    fleet.report([sample(0, util=0)], [allocation(0, namespace='a"b\\c\nd', user="<script>")])
    text = fleet.ledger.render().decode()
    labels = 'cluster="c1",namespace="a\\"b\\\\c\\nd",hpc_job="",user="<script>"'
    assert f"gpufleet_workload_gpus{{{labels}}} 1" in text
    assert f'gpufleet_workload_idle_gpus{{{labels},by="utilization"}} 1' in text
    assert "# TYPE gpufleet_workload_idle_cost_total counter" in text
    assert f'gpufleet_fleet_allocated_gpus{{cluster="c1",model="{H100}"}} 1' in text
