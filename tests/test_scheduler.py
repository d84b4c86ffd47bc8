"""The simulated scheduler: realistic jobs on simulated nodes, and the attribution seams it answers."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from gpufleet.agent.attribution.base import AttributionFailed, Targets
from gpufleet.agent.sources.scheduler import (
    GPU_RESOURCE,
    JOB_SIZES,
    SimNode,
    SimPodLister,
    SimScheduler,
)
from gpufleet.agent.sources.sim import SimulatedSource

UNIX_START = 1_780_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def fleet(
    nodes: int = 24, clusters: tuple[str, ...] = ("sim-0", "sim-1"), model: str = "H100", gpus: int = 8
) -> list[SimNode]:
    return [
        SimNode(
            f"sim-node-{i:05d}",
            clusters[i * len(clusters) // nodes],
            SimulatedSource(model, gpus, seed=0, node_index=i),
        )
        for i in range(nodes)
    ]


def scheduler(
    nodes: list[SimNode], kind: str = "mixed", seed: int = 0, clock: FakeClock | None = None, **kwargs: float
) -> SimScheduler:
    return SimScheduler(
        nodes, kind, seed=seed, clock=clock or FakeClock(), unix_clock=lambda: UNIX_START, **kwargs
    )


def by_node(rows: list[dict[str, object]]) -> dict[object, list[dict[str, object]]]:
    grouped: dict[object, list[dict[str, object]]] = {}
    for row in rows:
        grouped.setdefault(row["node"], []).append(row)
    return grouped


def test_same_seed_same_jobs_other_seed_other_jobs() -> None:
    clocks = [FakeClock() for _ in range(3)]
    a, b, c = (scheduler(fleet(), seed=s, clock=k) for s, k in zip((1, 1, 2), clocks, strict=True))
    assert a.truth() == b.truth()
    assert a.truth() != c.truth()
    for clock in clocks:
        clock.now += 3 * 7200
    assert a.tick()
    assert b.tick()
    assert a.truth() == b.truth()
    assert a.version == b.version > 1


def test_job_sizes_and_allocation_level() -> None:
    sizes: Counter[int] = Counter()
    for seed in range(4):
        nodes = fleet(200, clusters=("big",))
        sched = scheduler(nodes, "slurm", seed=seed)
        allocated = len(sched.truth())
        assert 0.78 * 1600 <= allocated <= 0.95 * 1600
        jobs = sched.jobs()
        assert sum(job.gpu_count for job in jobs) == allocated
        sizes.update(job.gpu_count for job in jobs)
        for job in jobs:
            assert job.gpu_count in JOB_SIZES
            assert job.ends > 1_000.0 >= job.started  # running when the scheduler started
    small = sum(n for size, n in sizes.items() if size <= 8)
    assert small > 0.8 * sum(sizes.values())  # mostly small jobs...
    assert any(size >= 64 for size in sizes)  # ...and a few big ones


def test_jobs_over_several_nodes_take_whole_nodes() -> None:
    nodes = fleet(200, clusters=("big",))
    sched = scheduler(nodes, "kubernetes", seed=3)
    multi = [job for job in sched.jobs() if job.gpu_count > 8]
    assert multi
    for job in multi:
        assert len({p.hostname for p in job.placements}) == len(job.placements) == job.gpu_count // 8
        for placement in job.placements:
            assert placement.gpus == tuple(range(8))
        assert [p.pod for p in job.placements] == [
            f"{job.name}-worker-{n}" for n in range(len(job.placements))
        ]
    for job in sched.jobs():
        if job.gpu_count <= 8:
            assert len(job.placements) == 1


def test_kinds_per_cluster_and_their_seams() -> None:
    nodes = fleet(12, clusters=("west", "east", "north"))
    sched = scheduler(nodes, "mixed")
    # Sorted by name, the clusters alternate, Kubernetes first.
    assert sched.kinds == {"east": "kubernetes", "north": "slurm", "west": "kubernetes"}
    for node in nodes:
        kubernetes = sched.kinds[node.cluster] == "kubernetes"
        assert (sched.pod_lister(node.hostname) is not None) == kubernetes
        assert (sched.job_mapping(node.hostname) is not None) == (not kubernetes)
        assert sched.environs(node.hostname) is not None
    assert set(scheduler(fleet(6), "slurm").kinds.values()) == {"slurm"}
    with pytest.raises(ValueError, match="kubernetes"):
        scheduler(fleet(6), "pbs")
    with pytest.raises(ValueError, match="sim-node-99999"):
        sched.pod_lister("sim-node-99999")


async def test_pods_on_each_node_hold_that_nodes_gpus() -> None:
    nodes = fleet(16)
    sched = scheduler(nodes, "kubernetes", seed=4)
    truth = by_node(sched.truth())
    seen = 0
    for node in nodes:
        lister = sched.pod_lister(node.hostname)
        assert isinstance(lister, SimPodLister)
        response = await lister.list()
        targets = Targets(node.source.inventory())
        held: dict[int, tuple[str, str, str]] = {}
        for pod in response.pod_resources:
            for container in pod.containers:
                for devices in container.devices:
                    assert devices.resource_name == GPU_RESOURCE
                    for device_id in devices.device_ids:
                        assert device_id.startswith("GPU-")
                        target = targets.find(device_id)
                        assert target is not None
                        held[target.gpu_index] = (pod.namespace, pod.name, container.name)
        assert {"kube-system", "gpu-operator"} <= {pod.namespace for pod in response.pod_resources}
        expected = {
            row["gpu_index"]: (row["namespace"], row["pod"], row["container"])
            for row in truth.get(node.hostname, [])
        }
        assert held == expected
        seen += len(held)
    assert seen == len(sched.truth()) > 0
    for row in sched.truth():
        assert row["job"] == row["user"] == ""
        if row["behaviour"] == "inference":
            assert re.fullmatch(rf"{row['workload']}-[a-z0-9]{{10}}-[a-z0-9]{{5}}", str(row["pod"]))
        else:
            assert re.fullmatch(rf"{row['workload']}-worker-\d+", str(row["pod"]))


def test_job_files_on_each_slurm_node() -> None:
    nodes = fleet(16)
    sched = scheduler(nodes, "slurm", seed=5)
    truth = by_node(sched.truth())
    for node in nodes:
        mapping = sched.job_mapping(node.hostname)
        assert mapping is not None
        files = mapping.read()
        rows = truth.get(node.hostname, [])
        assert files == {str(row["gpu_index"]): f"{row['job']}\n".encode() for row in rows}
        for row in rows:
            assert str(row["job"]).isdigit() and row["user"] and row["namespace"] == row["pod"] == ""


def test_job_processes_carry_their_jobs_environment() -> None:
    nodes = fleet(16)
    sched = scheduler(nodes, "mixed", seed=6)
    truth = {(row["node"], row["gpu_index"]): row for row in sched.truth()}
    slurm = 0
    for node in nodes:
        environs = sched.environs(node.hostname)
        pids = []
        for sample in node.source.sample(with_processes=True):
            row = truth.get((node.hostname, sample.index))
            processes = sample.processes.processes
            if row is None:
                assert not processes  # nobody holds the GPU
                continue
            (process,) = processes
            assert process.pid == row["pid"]
            pids.append(process.pid)
            environ = environs.environ(process.pid)
            if row["scheduler"] == "slurm":
                slurm += 1
                assert environ["SLURM_JOB_ID"] == row["job"]
                assert environ["SLURM_JOB_USER"] == row["user"] == environs.owner(process.pid)
                assert environ["SLURM_JOB_ACCOUNT"] == row["account"]
                assert environ["SLURM_JOB_PARTITION"] == row["partition"]
                assert environ["SLURM_JOB_NAME"] == row["job_name"]
                assert str(sample.index) in environ["SLURM_JOB_GPUS"].split(",")
            else:
                assert not any(name.startswith("SLURM_") for name in environ)
                assert environ["HOSTNAME"] == row["pod"]
                assert environs.owner(process.pid) == "1000"
        assert len(set(pids)) == len(pids)  # one process per GPU, each its own pid
        with pytest.raises(AttributionFailed, match="no process 1 "):
            environs.environ(1)
        with pytest.raises(AttributionFailed):
            environs.owner(1)
    assert slurm > 0


def test_jobs_end_and_others_start_as_the_clock_advances() -> None:
    clock = FakeClock()
    nodes = fleet(24)
    sched = scheduler(nodes, clock=clock, mean_job_s=600)
    first = {id(job): job for job in sched.jobs()}
    version = sched.version
    assert not sched.tick()  # nothing due yet: nothing changes
    assert sched.version == version
    soonest = min(job.ends for job in first.values())
    clock.now = soonest
    assert sched.tick()
    assert sched.version == version + 1
    assert all(job.ends > soonest for job in sched.jobs())
    clock.now += 50 * 600
    ended = [job for job in first.values() if job.ends <= clock.now]
    assert ended
    gone = ended[0].placements[0]
    assert sched.tick()
    assert not any(id(job) in first and job.ends <= clock.now for job in sched.jobs())
    new = [job for job in sched.jobs() if id(job) not in first]
    assert new and all(job.started == clock.now for job in new)
    assert 0.75 * 24 * 8 <= len(sched.truth()) <= 0.95 * 24 * 8
    # The ended job's process is gone; its GPU is free, or a new job's.
    with pytest.raises(AttributionFailed):
        sched.environs(gone.hostname).environ(gone.pids[0])
    source = next(node.source for node in nodes if node.hostname == gone.hostname)
    row = next(
        (r for r in sched.truth() if (r["node"], r["gpu_index"]) == (gone.hostname, gone.gpus[0])), None
    )
    if row is None:
        assert source.behaviour_of(gone.gpus[0]) == "free"
    else:
        assert row["since"] == pytest.approx(UNIX_START + clock.now - 1_000.0, abs=0.001)
        assert source.behaviour_of(gone.gpus[0]) == row["behaviour"]


def test_truth_matches_the_sources_and_is_written_whole(tmp_path: Path) -> None:
    nodes = fleet(16)
    sched = scheduler(nodes, "mixed", seed=8)
    rows = sched.truth()
    held = {(row["node"], row["gpu_index"]): row for row in rows}
    for node in nodes:
        uuids = {gpu.index: gpu.uuid for gpu in node.source.inventory().gpus}
        for index, uuid in uuids.items():
            row = held.get((node.hostname, index))
            assert node.source.behaviour_of(index) == (row["behaviour"] if row else "free")
            if row:
                assert row["gpu_uuid"] == uuid and row["cluster"] == node.cluster
                assert row["scheduler"] == sched.kinds[node.cluster]
                assert UNIX_START - 20 * 7200 <= float(str(row["since"])) <= UNIX_START
    path = tmp_path / "truth.json"
    sched.write_truth(path)
    written = json.loads(path.read_text())
    assert written == {"version": sched.version, "allocations": rows}
    assert [p.name for p in tmp_path.iterdir()] == ["truth.json"]  # no temporary file left


def behaviour_rows(kind: str, behaviour: str) -> tuple[list[SimNode], list[dict[str, object]]]:
    """A fleet (and its truth rows) with some GPUs that behave so, from the first seed that has them."""
    for seed in range(50):
        nodes = fleet(16)
        rows = [row for row in scheduler(nodes, kind, seed=seed).truth() if row["behaviour"] == behaviour]
        if rows:
            return nodes, rows
    raise AssertionError(f"no seed gives a {behaviour} job")


@pytest.mark.parametrize("kind", ["kubernetes", "slurm"])
def test_stuck_gpus_read_busy_to_nvml_and_idle_to_gpm(kind: str) -> None:
    nodes, rows = behaviour_rows(kind, "stuck")
    sources = {node.hostname: node.source for node in nodes}
    for _ in range(5):
        for row in rows:
            sample = sources[str(row["node"])].sample(with_processes=True)[int(str(row["gpu_index"]))]
            assert sample.gpu_utilization_percent >= 98
            assert sample.sm_active_ppm <= 20_000
            assert sample.tensor_active_ppm == 0
            assert sample.nvlink_tx_bytes_per_second == sample.nvlink_rx_bytes_per_second == 0
            assert [p.pid for p in sample.processes.processes] == [row["pid"]]


def test_idle_and_training_gpus_in_the_sources_samples() -> None:
    nodes, rows = behaviour_rows("slurm", "idle")
    sources = {node.hostname: node.source for node in nodes}
    for row in rows:
        sample = sources[str(row["node"])].sample(with_processes=False)[int(str(row["gpu_index"]))]
        assert sample.gpu_utilization_percent == sample.sm_active_ppm == 0
    nodes, rows = behaviour_rows("slurm", "training")
    sources = {node.hostname: node.source for node in nodes}
    for row in rows:
        sample = sources[str(row["node"])].sample(with_processes=False)[int(str(row["gpu_index"]))]
        assert sample.sm_active_ppm >= 700_000 and sample.tensor_active_ppm >= 300_000


def test_a100_nodes_have_no_gpm_fields() -> None:
    nodes = fleet(8, model="A100")
    scheduler(nodes, "slurm")
    for node in nodes:
        for sample in node.source.sample(with_processes=True):
            assert not sample.HasField("sm_active_ppm")
            assert not sample.HasField("graphics_active_ppm")
            assert not sample.HasField("nvlink_tx_bytes_per_second")
            assert sample.HasField("gpu_utilization_percent")


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="positive"):
        scheduler(fleet(2), mean_job_s=0)
    nodes = fleet(2)
    with pytest.raises(ValueError, match="distinct hostnames"):
        scheduler([nodes[0], nodes[0]])
