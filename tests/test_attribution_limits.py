"""Attribution under bad input: the agent's combiner, and a hostile agent at a real collector."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from gpufleet.agent.attribution.base import AttributionFailed
from gpufleet.agent.attribution.kubelet import KubeletPodLister
from gpufleet.agent.attribution.refresh import KEEP_LAST_S, Attribution
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.allocations import MAX_ALLOCATIONS_PER_NODE, MAX_VALUE_CHARS
from gpufleet.collector.service import Collector
from gpufleet.kubelet.podresources.v1 import api_pb2
from gpufleet.v1 import ingest_pb2, inventory_pb2, telemetry_pb2
from tests.conftest import metric
from tests.fake_kubelet import pod, running_kubelet
from tests.test_ingest import exchange, hello, report


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


class Pods:
    """A pod lister that answers what it is given, or fails."""

    def __init__(self) -> None:
        self.response = api_pb2.ListPodResourcesResponse()
        self.failing = ""

    async def list(self) -> api_pb2.ListPodResourcesResponse:
        if self.failing:
            raise AttributionFailed(self.failing)
        return self.response


class Environs:
    def __init__(self, owners: dict[int, str]) -> None:
        self.owners = owners

    def environ(self, pid: int) -> dict[str, str]:
        return {}

    def owner(self, pid: int) -> str:
        return self.owners[pid]


def node() -> inventory_pb2.NodeInventory:
    inventory = inventory_pb2.NodeInventory()
    for index in range(2):
        inventory.gpus.add(index=index, uuid=f"GPU-{index}")
    return inventory


def with_processes(*pids_per_gpu: list[int]) -> list[telemetry_pb2.GpuSample]:
    samples = []
    for index, pids in enumerate(pids_per_gpu):
        sample = telemetry_pb2.GpuSample(index=index)
        sample.processes.SetInParent()
        for pid in pids:
            sample.processes.processes.add(pid=pid)
        samples.append(sample)
    return samples


async def test_a_failing_source_is_unavailable_and_its_last_answer_stands_for_a_while() -> None:
    clock, pods = Clock(), Pods()
    pods.response.pod_resources.append(pod("ml", "train", {"main": [("nvidia.com/gpu", ["GPU-0"])]}))
    attribution = Attribution(pods=pods, clock=clock)
    first = await attribution.refresh(node(), [])
    assert [(a.namespace, a.pod) for a in first.allocations] == [("ml", "train")]
    assert [(s.name, s.available) for s in first.sources] == [("kubernetes", True)]
    pods.failing = "no kubelet socket at /x"
    clock.now += KEEP_LAST_S - 1
    held = await attribution.refresh(node(), [])
    assert [a.pod for a in held.allocations] == ["train"]
    assert [(s.available, s.error) for s in held.sources] == [(False, "no kubelet socket at /x")]
    clock.now += 2
    assert not (await attribution.refresh(node(), [])).allocations
    assert attribution.errors_total == 2


async def test_process_owners_say_who_holds_only_the_gpus_no_pod_holds() -> None:
    pods = Pods()
    pods.response.pod_resources.append(pod("ml", "train", {"main": [("nvidia.com/gpu", ["GPU-0"])]}))
    attribution = Attribution(pods=pods, environs=Environs({10: "root", 11: "ana"}))
    allocations = await attribution.refresh(node(), with_processes([10], [11]))
    assert [(a.gpu_index, a.source, a.pod, a.user) for a in allocations.allocations] == [
        (0, "kubernetes", "train", ""),
        (1, "process", "", "ana"),
    ]
    # Between process polls, the owners found last still stand.
    again = await attribution.refresh(node(), [telemetry_pb2.GpuSample(index=0)])
    assert again == allocations


async def test_values_over_the_limits_are_cut_and_counted_by_the_agent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pods = Pods()
    pods.response.pod_resources.append(pod("ml", "p" * 10_000, {"c": [("nvidia.com/gpu", ["GPU-0"])]}))
    for index in range(500):
        pods.response.pod_resources.append(pod("ml", f"pod-{index}", {"c": [("nvidia.com/gpu", ["GPU-1"])]}))
    attribution = Attribution(pods=pods)
    with caplog.at_level(logging.WARNING):
        allocations = await attribution.refresh(node(), [])
        await attribution.refresh(node(), [])
    assert [r.message for r in caplog.records if "over the limits" in r.message] != []
    assert len([r for r in caplog.records if "over the limits" in r.message]) == 1
    assert len(allocations.allocations) == MAX_ALLOCATIONS_PER_NODE
    assert max(len(a.pod) for a in allocations.allocations) == MAX_VALUE_CHARS
    assert attribution.truncated_total == 2 * (501 - MAX_ALLOCATIONS_PER_NODE + 1)


def hostile_hello(index: int) -> bytes:
    """A hello whose allocations ignore every limit: 10 KB values, a thousand allocations."""
    message = ingest_pb2.AgentMessage.FromString(hello(index))
    allocations = message.hello.allocations
    allocations.allocations.add(gpu_index=0, source="kubernetes", namespace="x" * 10_000, pod="<script>")
    for n in range(1000):
        allocations.allocations.add(gpu_index=n % 8, source="slurm", job=str(n), user="u")
    allocations.allocations.add(gpu_index=4_000_000, source="slurm", job="nowhere")
    return message.SerializeToString()


async def test_a_hostile_agents_attribution_is_cut_counted_and_stops_no_one(collector: Collector) -> None:
    honest = 3
    answers, code, details = await exchange(collector, hostile_hello(9), report(1))
    assert code == grpc.StatusCode.OK, details
    assert answers[-1].report_ack.sequence == 1  # the node's telemetry still counts
    node = collector.state.find("node-0009")
    assert node is not None and node.allocations is not None
    kept = node.allocations.allocations
    assert len(kept) == MAX_ALLOCATIONS_PER_NODE
    assert all(len(a.namespace) <= MAX_VALUE_CHARS for a in kept)
    assert metric(collector, "gpufleet_collector_attribution_values_truncated_total") >= 1000 - 256
    for index in range(honest):
        _, code, _ = await exchange(
            collector, hello(index), report(1, SimulatedSource("H100", 8, node_index=index))
        )
        assert code == grpc.StatusCode.OK
    collector.exposition.refresh()
    body = bytes(collector.exposition.everything()).decode()
    lines = [
        line for line in body.splitlines() if line.startswith('gpufleet_gpu_allocation_info{node="node-0009"')
    ]
    assert 0 < len(lines) <= MAX_ALLOCATIONS_PER_NODE
    assert 'pod="<script>"' in body  # a label value, escaped as text: nothing more
    assert sum(line.startswith("gpufleet_node_info{") for line in body.splitlines()) == honest + 1


class JobFiles:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def read(self) -> dict[str, bytes]:
        return self.files


class SlurmEnvirons(Environs):
    def __init__(self, jobs: dict[int, str]) -> None:
        super().__init__({pid: "ana" for pid in jobs})
        self.jobs = jobs

    def environ(self, pid: int) -> dict[str, str]:
        return {"SLURM_JOB_ID": self.jobs[pid], "SLURM_JOB_USER": "ana", "SLURM_JOB_NAME": "train"}


async def test_with_job_files_the_environments_only_add_the_details_of_the_jobs_they_name() -> None:
    # GPU 1's process list is older than the job files: its job 8 has ended since.
    attribution = Attribution(job_mapping=JobFiles({"0": b"7\n"}), environs=SlurmEnvirons({10: "7", 11: "8"}))
    allocations = await attribution.refresh(node(), with_processes([10], [11]))
    assert [(a.gpu_index, a.job, a.user, a.job_name) for a in allocations.allocations] == [
        (0, "7", "ana", "train")
    ]


async def test_gpus_handed_out_under_an_unwatched_resource_name_are_pointed_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_kubelet(tmp_path / "kubelet.sock") as kubelet:
        kubelet.allocatable = [
            api_pb2.ContainerDevices(resource_name="nvidia.com/gpu.shared", device_ids=["GPU-1::0"])
        ]
        kubelet.add(pod("ml", "train", {"main": [("nvidia.com/gpu.shared", ["GPU-1::0"])]}))
        attribution = Attribution(pods=KubeletPodLister(str(kubelet.socket_path)))
        with caplog.at_level(logging.WARNING):
            assert not (await attribution.refresh(node(), [])).allocations
            await attribution.refresh(node(), [])
    warnings = [r.message for r in caplog.records if "nvidia.com/gpu.shared" in r.message]
    assert len(warnings) == 1 and "--kubelet-resources" in warnings[0]


async def test_with_auto_a_node_without_a_kubelet_is_no_kubernetes_node(tmp_path: Path) -> None:
    socket = tmp_path / "kubelet.sock"
    attribution = Attribution(pods=KubeletPodLister(str(socket)), pods_if_present=True)
    quiet = await attribution.refresh(node(), [])
    assert not quiet.sources and attribution.errors_total == 0
    async with running_kubelet(socket) as kubelet:
        kubelet.add(pod("ml", "train", {"main": [("nvidia.com/gpu", ["GPU-0"])]}))
        found = await attribution.refresh(node(), [])
    assert [(s.name, s.available) for s in found.sources] == [("kubernetes", True)]
    assert [a.pod for a in found.allocations] == ["train"]
