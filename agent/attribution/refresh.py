"""One node's attribution, refreshed each report interval: who holds each GPU and MIG instance.

The sources are read through small seams (a pod lister, a job-mapping reader, the GPU processes'
environments), so that a simulator or a test can stand in for the kubelet, Slurm or /proc while
the mapping stays the same code. A source that fails is reported unavailable (with why) and
counted; its last good answer is kept for KEEP_LAST_S, so a kubelet restart does not make every
GPU look free for one interval. Process environments are read only when the report carries
the process lists (they are polled less often); in between, the last ones are kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from gpufleet.agent.attribution import kubelet, slurm
from gpufleet.agent.attribution.base import AttributionFailed, Target, Targets
from gpufleet.allocations import MAX_ALLOCATIONS_PER_NODE, MAX_VALUE_CHARS, bound
from gpufleet.kubelet.podresources.v1 import api_pb2
from gpufleet.v1 import allocation_pb2, inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)

# How long a source's last good answer stands in for it while it fails.
KEEP_LAST_S = 300.0


class PodLister(Protocol):
    async def list(self) -> api_pb2.ListPodResourcesResponse: ...


class _Source:
    """One source's last good answer, and whether it answered this time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.allocations: list[allocation_pb2.Allocation] = []
        self.good_at = 0.0
        self.error = ""

    def answered(self, allocations: list[allocation_pb2.Allocation], now: float) -> None:
        if self.error:
            log.info("%s attribution is back", self.name)
        self.allocations, self.good_at, self.error = allocations, now, ""

    def failed(self, error: str, now: float) -> None:
        if not self.error:  # one line when it goes away, not one per interval
            log.warning("%s attribution unavailable: %s; telemetry carries on", self.name, error)
        self.error = error
        if now - self.good_at > KEEP_LAST_S:
            self.allocations = []

    def status(self) -> allocation_pb2.AttributionSource:
        return allocation_pb2.AttributionSource(name=self.name, available=not self.error, error=self.error)


def _processes(samples: Sequence[telemetry_pb2.GpuSample]) -> dict[Target, list[int]] | None:
    """The pids on each GPU and MIG instance; None if this sample did not poll processes."""
    found: dict[Target, list[int]] = {}
    polled = False
    for sample in samples:
        if sample.HasField("processes"):
            polled = True
            found[Target(sample.index)] = [p.pid for p in sample.processes.processes]
        for mig in sample.mig_instances:
            if mig.HasField("processes"):
                polled = True
                found[Target(sample.index, mig.gpu_instance_id)] = [p.pid for p in mig.processes.processes]
    return found if polled else None


def _target(allocation: allocation_pb2.Allocation) -> tuple[int, int | None]:
    gi = allocation.gpu_instance_id if allocation.HasField("gpu_instance_id") else None
    return allocation.gpu_index, gi


class Attribution:
    """Reads a node's attribution sources and says who holds its GPUs, as one Allocations message."""

    def __init__(
        self,
        *,
        pods: PodLister | None = None,
        resources: Sequence[str] = kubelet.DEFAULT_RESOURCES,
        job_mapping: slurm.JobMapping | None = None,
        environs: slurm.Environs | None = None,
        pods_if_present: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``pods_if_present``: the kubelet's socket is looked for, not required (`--kubelet-socket
        auto`): while there is none, the node is not a Kubernetes node and nothing is reported."""
        self._pods = pods
        self._pods_if_present = pods_if_present
        self._resources = tuple(resources)
        self._job_mapping = job_mapping
        self._environs = environs
        self._clock = clock
        self._kubernetes = _Source(kubelet.SOURCE)
        self._slurm = _Source(slurm.SOURCE_SLURM)
        self._from_processes: list[allocation_pb2.Allocation] = []
        self._resources_checked = False
        self.errors_total = 0
        self.truncated_total = 0

    @property
    def enabled(self) -> bool:
        return any(source is not None for source in (self._pods, self._job_mapping, self._environs))

    async def refresh(
        self, inventory: inventory_pb2.NodeInventory, samples: Sequence[telemetry_pb2.GpuSample]
    ) -> allocation_pb2.Allocations:
        """Who holds the node's GPUs now."""
        now = self._clock()
        targets = Targets(inventory)
        sources = []
        if self._pods is not None and self._kubelet_here():
            await self._read_pods(targets, now)
            sources.append(self._kubernetes)
        if self._job_mapping is not None:
            self._read_job_files(targets, now)
            sources.append(self._slurm)
        processes = _processes(samples)
        if self._environs is not None and processes is not None:
            found, failures = slurm.allocations_from_processes(processes, self._environs)
            self.errors_total += failures
            self._from_processes = found
        from_processes = self._from_processes
        if self._job_mapping is not None and not self._slurm.error:
            # The job files say which jobs hold the GPUs; environments only add their details
            # (a process list is up to --process-interval old: its job may have ended since).
            named = {a.job for a in self._slurm.allocations}
            from_processes = [a for a in from_processes if a.source != slurm.SOURCE_SLURM or a.job in named]
        slurm_held = slurm.merge_slurm(self._slurm.allocations, from_processes)
        # A GPU a pod or a job holds is theirs; its processes' owners alone say no more.
        held = {
            _target(a)
            for a in (*self._kubernetes.allocations, *slurm_held)
            if a.source != slurm.SOURCE_PROCESS
        }
        combined = [*self._kubernetes.allocations]
        combined += [a for a in slurm_held if a.source != slurm.SOURCE_PROCESS or _target(a) not in held]
        combined.sort(key=lambda a: (*_sort_target(a), a.source, a.namespace, a.pod, a.job, a.user))
        allocations = allocation_pb2.Allocations(
            allocations=combined, sources=[source.status() for source in sources]
        )
        cut = bound(allocations)
        if cut and not self.truncated_total:
            log.warning(
                "attribution values over the limits (%d characters, %d allocations) were cut; "
                "counted in gpufleet_node_agent_attribution_values_truncated_total (logged once)",
                MAX_VALUE_CHARS,
                MAX_ALLOCATIONS_PER_NODE,
            )
        self.truncated_total += cut
        return allocations

    def _kubelet_here(self) -> bool:
        if not self._pods_if_present or not isinstance(self._pods, kubelet.KubeletPodLister):
            return True
        return Path(self._pods.socket_path).exists()

    async def _read_pods(self, targets: Targets, now: float) -> None:
        assert self._pods is not None
        try:
            response = await self._pods.list()
        except AttributionFailed as exc:
            self.errors_total += 1
            self._kubernetes.failed(str(exc), now)
            return
        allocations, _unknown = kubelet.allocations_from_pods(response, targets, self._resources)
        self._kubernetes.answered(allocations, now)
        if not self._resources_checked:
            self._resources_checked = True
            await self._check_resource_names(targets)

    async def _check_resource_names(self, targets: Targets) -> None:
        """Once: say so if the kubelet hands out this node's GPUs under names not watched."""
        if not isinstance(self._pods, kubelet.KubeletPodLister):
            return
        try:
            allocatable = await self._pods.allocatable()
        except AttributionFailed as exc:  # older kubelets: nothing to check against
            log.info("cannot check the kubelet's resource names: %s", exc)
            return
        unwatched = kubelet.unwatched_gpu_resources(allocatable, targets, self._resources)
        if unwatched:
            log.warning(
                "the kubelet hands out this node's GPUs as %s, which --kubelet-resources (%s) leaves "
                "out: pods holding them are not attributed; add them to --kubelet-resources",
                ", ".join(unwatched),
                ",".join(self._resources),
            )

    def _read_job_files(self, targets: Targets, now: float) -> None:
        assert self._job_mapping is not None
        errors_before = getattr(self._job_mapping, "errors", 0)
        try:
            files = self._job_mapping.read()
        except AttributionFailed as exc:
            self.errors_total += 1
            self._slurm.failed(str(exc), now)
            return
        finally:
            self.errors_total += getattr(self._job_mapping, "errors", 0) - errors_before
        allocations, rejected = slurm.allocations_from_job_files(files, targets)
        self.errors_total += rejected
        self._slurm.answered(allocations, now)


def _sort_target(allocation: allocation_pb2.Allocation) -> tuple[int, int]:
    index, gi = _target(allocation)
    return index, -1 if gi is None else gi
