"""A simulated scheduler: Kubernetes pods and Slurm jobs across the simulated nodes of one agent.

It places jobs of realistic sizes (mostly one GPU or one node, a few of up to 1,024 GPUs over
whole nodes) until each cluster is 80-90 % allocated, ends them after lifetimes drawn around a
mean, starts others, and tells each node's SimulatedSource what each GPU does. It answers the
agent's attribution seams as the real things would: the kubelet's pod-resources List on the nodes
of Kubernetes clusters, dcgm-exporter's job-mapping files on those of Slurm clusters, and every
job process's environment (/proc/<pid>/environ). truth() is what attribution should find.
The same seed and the same clock readings give the same jobs.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.agent.attribution.base import AttributionFailed
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.kubelet.podresources.v1 import api_pb2

KINDS = ("kubernetes", "slurm", "mixed")
# The resource NVIDIA's device plugin advertises whole GPUs as.
GPU_RESOURCE = "nvidia.com/gpu"

# Job sizes in GPUs and their shares of jobs: most jobs take one GPU or one node; a few span many
# whole nodes (and those hold most of the GPUs).
JOB_SIZES: dict[int, float] = {
    1: 0.40,
    2: 0.08,
    4: 0.10,
    8: 0.27,
    16: 0.05,
    32: 0.04,
    64: 0.03,
    128: 0.015,
    256: 0.008,
    512: 0.004,
    1024: 0.003,
}
# What jobs do with their GPUs (sim.BEHAVIOURS), by scheduler: Kubernetes clusters serve more,
# Slurm clusters train more; in both some jobs hold GPUs idle and a few hang. Jobs spanning nodes
# train (or idle, or hang): none serves.
BEHAVIOUR_WEIGHTS: dict[str, dict[str, float]] = {
    "kubernetes": {"training": 0.40, "inference": 0.45, "idle": 0.10, "stuck": 0.05},
    "slurm": {"training": 0.70, "inference": 0.15, "idle": 0.10, "stuck": 0.05},
}
# Jobs of this many GPUs or more are watched closely (an idle or hung one is soon noticed): they
# mostly train, which also keeps a few of them from making a cluster's idle share swing.
BIG_JOB_GPUS = 64
BIG_JOB_BEHAVIOUR_WEIGHTS = {"training": 0.95, "idle": 0.03, "stuck": 0.02}
# Each cluster is kept allocated to a share drawn from this range; no job starts beyond the ceiling.
ALLOCATION_TARGET = (0.80, 0.90)
ALLOCATION_CEILING = 0.95
# Jobs in a row that found no room before a fill gives up (fragmentation) until a job ends.
FILL_ATTEMPTS = 50
# Job lifetimes: log-normal around the mean (many short jobs, a long tail), bounded to these
# multiples of the mean.
LIFETIME_SIGMA = 1.0
LIFETIME_BOUNDS = (0.02, 20.0)
# Fake pids: each node's start somewhere, grow by a few per process (other processes start in
# between), and wrap as Linux's do (pid_max, then 300).
PID_FIRST = (20_000, 400_000)
PID_STEP = (1, 60)
PID_MAX = 4_194_304
PID_WRAP = 300
# Slurm job ids start somewhere per cluster and grow by a few per GPU job (CPU jobs in between).
SLURM_JOB_ID_FIRST = (100_000, 9_000_000)
SLURM_JOB_ID_STEP = (1, 40)
# A container's processes run as a uid the host has no name for.
CONTAINER_UID = "1000"


@dataclass(frozen=True)
class Team:
    """A namespace (Kubernetes) or account (Slurm), its people, and what kind of work it runs."""

    name: str
    users: tuple[str, ...]
    trains: bool
    serves: bool


TEAMS = (
    Team("ml-research", ("achen", "bkowalski", "cokafor", "dlindqvist"), trains=True, serves=False),
    Team("llm-pretrain", ("eyamamoto", "fmartin", "gsilva"), trains=True, serves=False),
    Team("vision", ("hnguyen", "iperez"), trains=True, serves=True),
    Team("speech", ("jmueller", "kjohansson"), trains=True, serves=True),
    Team("recommendations", ("lrossi", "mahmed"), trains=True, serves=True),
    Team("robotics", ("nbrown", "ocarvalho"), trains=True, serves=False),
    Team("inference-prod", ("svc-serving", "pwright"), trains=False, serves=True),
)
TRAINING_NAMES = (
    "llama-finetune",
    "bert-pretrain",
    "resnet50-sweep",
    "vit-l-pretrain",
    "whisper-train",
    "diffusion-train",
    "dlrm-train",
    "moe-pretrain",
    "ppo-rollout",
)
SERVING_NAMES = ("llama-70b-serve", "embedding-serve", "asr-serve", "reranker-serve", "sdxl-serve")
# Kubernetes' alphabet for generated name suffixes (no vowels, no look-alikes).
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
# Pods on every Kubernetes node besides the jobs' (namespace, name prefix, container): no GPUs.
DAEMON_PODS = (
    ("kube-system", "kube-proxy", "kube-proxy"),
    ("gpu-operator", "nvidia-device-plugin-daemonset", "nvidia-device-plugin"),
    ("monitoring", "gpufleet-agent", "agent"),
)
SLURM_PARTITION = "gpu"  # jobs on one node
SLURM_LARGE_PARTITION = "gpu-large"  # jobs over several nodes
PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class SimNode:
    """A simulated node the scheduler places jobs on."""

    hostname: str
    cluster: str
    source: SimulatedSource


@dataclass(eq=False)
class Placement:
    """A job's part on one node: its GPUs there, one process per GPU, its pod (Kubernetes)."""

    job: SimJob = field(repr=False)
    hostname: str
    gpus: tuple[int, ...]
    pids: tuple[int, ...]
    pod: str
    first_rank: int  # the global rank of the process on gpus[0]


@dataclass(eq=False)
class SimJob:
    """One job (Slurm) or one workload of pods (Kubernetes: a PyTorchJob, a Deployment)."""

    kind: str  # "kubernetes" or "slurm"
    cluster: str
    job_id: str  # Slurm's job id; "" for Kubernetes
    name: str  # the Slurm job name, or the Kubernetes workload's
    team: str  # the namespace (Kubernetes) or account (Slurm)
    user: str
    partition: str  # Slurm's; "" for Kubernetes
    container: str  # the GPU container's name (Kubernetes); "" for Slurm
    behaviour: str  # sim.JOB_BEHAVIOURS
    gpu_count: int
    started: float  # the scheduler's clock
    ends: float
    placements: list[Placement] = field(default_factory=list)


@dataclass(eq=False)
class _Node:
    sim: SimNode
    kind: str
    position: int  # in its cluster
    gpu_uuids: dict[int, str]  # at the start: the live ones may change (a GPU swapped)
    free: set[int]
    next_pid: int
    daemon_pods: tuple[tuple[str, str, str], ...]  # (namespace, pod, container)
    held: dict[int, Placement] = field(default_factory=dict)  # GPU index ->
    processes: dict[int, tuple[Placement, int]] = field(default_factory=dict)  # pid -> (placement, GPU)

    @property
    def size(self) -> int:
        return len(self.gpu_uuids)

    def uuid(self, gpu_index: int) -> str:
        live = {gpu.index: gpu.uuid for gpu in self.sim.source.gpus}
        return live.get(gpu_index, self.gpu_uuids[gpu_index])

    def spawn(self, rng: random.Random) -> int:
        """A pid for a new process: the next free one."""
        while True:
            self.next_pid += rng.randint(*PID_STEP)
            if self.next_pid > PID_MAX:
                self.next_pid = PID_WRAP
            if self.next_pid not in self.processes:
                return self.next_pid

    def process(self, pid: int) -> tuple[Placement, int]:
        found = self.processes.get(pid)
        if found is None:
            raise AttributionFailed(f"no process {pid} on {self.sim.hostname} (it has ended, or never ran)")
        return found


@dataclass(eq=False)
class _Cluster:
    name: str
    kind: str
    nodes: list[_Node]
    target: int  # GPUs kept allocated
    next_job_id: int
    allocated: int = 0
    # Node positions by their count of free GPUs (insertion-ordered, so picks are deterministic).
    by_free: list[dict[int, None]] = field(default_factory=list)
    # Positions of nodes with every GPU free, for jobs over whole nodes.
    empty: dict[int, None] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return sum(node.size for node in self.nodes)

    @property
    def node_size(self) -> int:
        return max((node.size for node in self.nodes), default=0)


class SimPodLister:
    """The kubelet's pod-resources API on one simulated node of a Kubernetes cluster."""

    def __init__(self, scheduler: SimScheduler, node: _Node) -> None:
        self._scheduler = scheduler
        self._node = node

    async def list(self) -> api_pb2.ListPodResourcesResponse:
        self._scheduler.tick()
        return self._scheduler.pod_resources(self._node)


class SimJobMapping:
    """dcgm-exporter's job-mapping directory on one simulated node of a Slurm cluster."""

    def __init__(self, scheduler: SimScheduler, node: _Node) -> None:
        self._scheduler = scheduler
        self._node = node

    def read(self) -> dict[str, bytes]:
        """File name (the GPU index) -> content (the job id, one line), as a prolog writes them."""
        self._scheduler.tick()
        return {str(gpu): f"{placement.job.job_id}\n".encode() for gpu, placement in self._node.held.items()}


class SimEnvirons:
    """The environment and owner of each job process on one simulated node (/proc/<pid>)."""

    def __init__(self, scheduler: SimScheduler, node: _Node) -> None:
        self._scheduler = scheduler
        self._node = node

    def environ(self, pid: int) -> dict[str, str]:
        self._scheduler.tick()
        placement, gpu = self._node.process(pid)
        return _process_environ(placement, gpu, self._node)

    def owner(self, pid: int) -> str:
        self._scheduler.tick()
        placement, _ = self._node.process(pid)
        return placement.job.user if placement.job.kind == "slurm" else CONTAINER_UID


class SimScheduler:
    """Places jobs on simulated nodes, ends them, starts others; answers attribution as a cluster would."""

    def __init__(
        self,
        nodes: Sequence[SimNode],
        kind: str,
        *,
        seed: int,
        mean_job_s: float = 7200.0,
        clock: Callable[[], float] = time.monotonic,
        unix_clock: Callable[[], float] = time.time,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown scheduler kind {kind!r}; choose one of {', '.join(KINDS)}")
        if not mean_job_s > 0:
            raise ValueError("the mean job lifetime must be positive")
        hostnames = [node.hostname for node in nodes]
        if len(set(hostnames)) != len(hostnames):
            raise ValueError("simulated nodes need distinct hostnames")
        self._rng = random.Random(f"scheduler:{seed}")
        self._clock = clock
        self.mean_job_s = mean_job_s
        # The log-normal's mu for that mean.
        self._mu = math.log(mean_job_s) - LIFETIME_SIGMA**2 / 2
        now = clock()
        self._unix_offset = unix_clock() - now
        names = sorted({node.cluster for node in nodes})
        # Cluster -> "kubernetes" or "slurm"; mixed: alternate by sorted name, Kubernetes first.
        self.kinds: dict[str, str] = {
            name: (("kubernetes", "slurm")[i % 2] if kind == "mixed" else kind)
            for i, name in enumerate(names)
        }
        self._clusters = {
            name: _Cluster(
                name,
                self.kinds[name],
                [],
                target=0,
                next_job_id=self._rng.randrange(*SLURM_JOB_ID_FIRST),
            )
            for name in names
        }
        self._nodes: dict[str, _Node] = {}
        for sim in nodes:
            cluster = self._clusters[sim.cluster]
            node = _Node(
                sim,
                cluster.kind,
                len(cluster.nodes),
                {gpu.index: gpu.uuid for gpu in sim.source.gpus},
                {gpu.index for gpu in sim.source.gpus},
                self._rng.randrange(*PID_FIRST),
                tuple((ns, f"{prefix}-{self._suffix(5)}", c) for ns, prefix, c in DAEMON_PODS),
            )
            cluster.nodes.append(node)
            self._nodes[sim.hostname] = node
            for gpu in node.free:
                sim.source.clear_workload(gpu)
        self._seams = {
            hostname: (
                SimPodLister(self, node) if node.kind == "kubernetes" else None,
                SimJobMapping(self, node) if node.kind == "slurm" else None,
                SimEnvirons(self, node),
            )
            for hostname, node in self._nodes.items()
        }
        self._jobs: dict[int, SimJob] = {}
        self._ending: list[tuple[float, int, SimJob]] = []
        self._sequence = itertools.count()
        for cluster in self._clusters.values():
            cluster.by_free = [{} for _ in range(cluster.node_size + 1)]
            for node in cluster.nodes:
                self._index(cluster, node)
            cluster.target = round(cluster.capacity * self._rng.uniform(*ALLOCATION_TARGET))
            self._fill(cluster, now, initial=True)
        self._next_due = self._ending[0][0] if self._ending else math.inf
        # Bumped on each change of who holds which GPU.
        self.version = 1

    # The attribution seams, per node.

    def pod_lister(self, hostname: str) -> SimPodLister | None:
        """The kubelet's pod-resources API on a node of a Kubernetes cluster; None on Slurm ones."""
        return self._seam(hostname)[0]

    def job_mapping(self, hostname: str) -> SimJobMapping | None:
        """The job-mapping files on a node of a Slurm cluster; None on Kubernetes ones."""
        return self._seam(hostname)[1]

    def environs(self, hostname: str) -> SimEnvirons:
        """The environment and owner of the job processes on a node."""
        return self._seam(hostname)[2]

    def _seam(self, hostname: str) -> tuple[SimPodLister | None, SimJobMapping | None, SimEnvirons]:
        seams = self._seams.get(hostname)
        if seams is None:
            raise ValueError(f"no simulated node {hostname!r} in this scheduler")
        return seams

    # Time.

    def tick(self) -> bool:
        """Advance to the clock's now: end the jobs due, start others. True if anything changed."""
        now = self._clock()
        if now < self._next_due:
            return False
        touched: set[str] = set()
        while self._ending and self._ending[0][0] <= now:
            _, sequence, job = heapq.heappop(self._ending)
            self._end(sequence, job)
            touched.add(job.cluster)
        for cluster in self._clusters.values():
            if cluster.name in touched:
                self._fill(cluster, now, initial=False)
        self._next_due = self._ending[0][0] if self._ending else math.inf
        self.version += 1
        return True

    # What is where.

    def jobs(self) -> list[SimJob]:
        """The running jobs, oldest placement first."""
        return list(self._jobs.values())

    def truth(self) -> list[dict[str, Any]]:
        """One row per allocated GPU: who holds it, as attribution should find it."""
        rows = []
        for node in self._nodes.values():
            for gpu in sorted(node.held):
                placement = node.held[gpu]
                job = placement.job
                kubernetes = job.kind == "kubernetes"
                readable = node.sim.source.has_processes(gpu)
                if not kubernetes and not readable:
                    continue  # a lost GPU lists no processes: no attribution by process can see it
                rows.append(
                    {
                        "node": node.sim.hostname,
                        "cluster": node.sim.cluster,
                        "gpu_index": gpu,
                        "gpu_uuid": node.uuid(gpu),
                        "scheduler": job.kind,
                        "namespace": job.team if kubernetes else "",
                        "pod": placement.pod,
                        "container": job.container,
                        "job": job.job_id,
                        "user": "" if kubernetes else job.user,
                        "account": "" if kubernetes else job.team,
                        "partition": job.partition,
                        "job_name": "" if kubernetes else job.name,
                        "workload": job.name,
                        "job_gpus": job.gpu_count,
                        "pid": placement.pids[placement.gpus.index(gpu)],
                        # What its samples show now (a fault scenario may hang or stall the job, or
                        # the GPU be lost).
                        "behaviour": node.sim.source.behaviour_of(gpu) if readable else "unreadable",
                        "since": round(job.started + self._unix_offset, 3),
                    }
                )
        return rows

    def write_truth(self, path: str | os.PathLike[str]) -> None:
        """Write {"version", "allocations": truth()} as JSON, atomically (a reader sees old or new)."""
        target = Path(path)
        body = json.dumps({"version": self.version, "allocations": self.truth()}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(body + "\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def pod_resources(self, node: _Node) -> api_pb2.ListPodResourcesResponse:
        """The pods on a node with the GPUs each container holds (by UUID, as the device plugin)."""
        response = api_pb2.ListPodResourcesResponse()
        for namespace, pod, container in node.daemon_pods:
            response.pod_resources.add(name=pod, namespace=namespace).containers.add(name=container)
        placements = {id(p): p for _, p in sorted(node.held.items(), key=lambda item: item[0])}
        for placement in placements.values():
            job = placement.job
            resources = response.pod_resources.add(name=placement.pod, namespace=job.team)
            resources.containers.add(name=job.container).devices.add(
                resource_name=GPU_RESOURCE, device_ids=[node.uuid(gpu) for gpu in placement.gpus]
            )
        return response

    # Placing jobs.

    def _fill(self, cluster: _Cluster, now: float, *, initial: bool) -> None:
        """Start jobs until the cluster is allocated to its target (or nothing more fits)."""
        sizes = [s for s in JOB_SIZES if s <= cluster.node_size or s <= cluster.capacity // 2]
        weights = [JOB_SIZES[s] for s in sizes]
        ceiling = cluster.capacity * ALLOCATION_CEILING
        failures = 0
        while cluster.allocated < cluster.target and failures < FILL_ATTEMPTS:
            size = self._rng.choices(sizes, weights)[0]
            nodes = self._fit(cluster, size) if cluster.allocated + size <= ceiling else None
            if nodes is None:
                failures += 1
                continue
            failures = 0
            self._start(cluster, nodes, size, now, initial=initial)

    def _fit(self, cluster: _Cluster, size: int) -> list[_Node] | None:
        """Nodes for a job: the fullest node it fits on, or enough whole free nodes; None if none."""
        if size <= cluster.node_size:
            for free in range(size, cluster.node_size + 1):
                if cluster.by_free[free]:
                    return [cluster.nodes[next(iter(cluster.by_free[free]))]]
            return None
        nodes: list[_Node] = []
        gpus = 0
        for position in cluster.empty:
            nodes.append(cluster.nodes[position])
            gpus += nodes[-1].size
            if gpus >= size:
                return nodes
        return None

    def _start(self, cluster: _Cluster, nodes: list[_Node], size: int, now: float, *, initial: bool) -> None:
        rng = self._rng
        whole_nodes = size > cluster.node_size
        weights = dict(BEHAVIOUR_WEIGHTS[cluster.kind])
        if size >= BIG_JOB_GPUS:
            weights = dict(BIG_JOB_BEHAVIOUR_WEIGHTS)
        elif whole_nodes:
            del weights["inference"]
        behaviour = rng.choices(list(weights), list(weights.values()))[0]
        serving = behaviour == "inference"
        team = rng.choice([t for t in TEAMS if (t.serves if serving else t.trains)])
        base = rng.choice(SERVING_NAMES if serving else TRAINING_NAMES)
        lifetime = self.mean_job_s * min(
            max(rng.lognormvariate(self._mu, LIFETIME_SIGMA) / self.mean_job_s, LIFETIME_BOUNDS[0]),
            LIFETIME_BOUNDS[1],
        )
        # Jobs there at the start have been running for a while already.
        started = now - rng.uniform(0, lifetime) if initial else now
        kubernetes = cluster.kind == "kubernetes"
        if kubernetes:
            job_id, name, partition = "", f"{base}-{self._suffix(5)}", ""
            container = "server" if serving else "pytorch"
        else:
            job_id, name, container = str(cluster.next_job_id), base, ""
            cluster.next_job_id += rng.randint(*SLURM_JOB_ID_STEP)
            partition = SLURM_LARGE_PARTITION if whole_nodes else SLURM_PARTITION
        gpu_count = sum(node.size for node in nodes) if whole_nodes else size
        job = SimJob(
            kind=cluster.kind,
            cluster=cluster.name,
            job_id=job_id,
            name=name,
            team=team.name,
            user=rng.choice(team.users),
            partition=partition,
            container=container,
            behaviour=behaviour,
            gpu_count=gpu_count,
            started=started,
            ends=started + lifetime,
        )
        # A Deployment's pods share its pod-template hash; a training job's are numbered workers.
        template_hash = self._suffix(10)
        rank = 0
        for worker, node in enumerate(nodes):
            gpus = tuple(sorted(node.free)[: node.size if whole_nodes else size])
            pod = ""
            if kubernetes:
                pod = f"{name}-{template_hash}-{self._suffix(5)}" if serving else f"{name}-worker-{worker}"
            placement = Placement(
                job, node.sim.hostname, gpus, tuple(node.spawn(rng) for _ in gpus), pod, rank
            )
            rank += len(gpus)
            job.placements.append(placement)
            self._unindex(cluster, node)
            for gpu, pid in zip(gpus, placement.pids, strict=True):
                node.free.discard(gpu)
                node.held[gpu] = placement
                node.processes[pid] = (placement, gpu)
                node.sim.source.set_workload(gpu, behaviour, pid=pid)
            self._index(cluster, node)
        cluster.allocated += gpu_count
        sequence = next(self._sequence)
        self._jobs[sequence] = job
        heapq.heappush(self._ending, (job.ends, sequence, job))

    def _end(self, sequence: int, job: SimJob) -> None:
        cluster = self._clusters[job.cluster]
        for placement in job.placements:
            node = self._nodes[placement.hostname]
            self._unindex(cluster, node)
            for gpu, pid in zip(placement.gpus, placement.pids, strict=True):
                node.free.add(gpu)
                del node.held[gpu]
                del node.processes[pid]
                node.sim.source.clear_workload(gpu)
            self._index(cluster, node)
        cluster.allocated -= job.gpu_count
        del self._jobs[sequence]

    def _index(self, cluster: _Cluster, node: _Node) -> None:
        cluster.by_free[len(node.free)][node.position] = None
        if len(node.free) == node.size:
            cluster.empty[node.position] = None

    def _unindex(self, cluster: _Cluster, node: _Node) -> None:
        del cluster.by_free[len(node.free)][node.position]
        cluster.empty.pop(node.position, None)

    def _suffix(self, length: int) -> str:
        return "".join(self._rng.choices(NAME_ALPHABET, k=length))


def _process_environ(placement: Placement, gpu: int, node: _Node) -> dict[str, str]:
    """The environment of a job's process on one GPU, as its scheduler starts it."""
    job = placement.job
    local = placement.gpus.index(gpu)
    rank = placement.first_rank + local
    if job.kind == "kubernetes":
        environ = {
            "HOSTNAME": placement.pod,
            "HOME": "/root",
            "PATH": PATH,
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
            "NVIDIA_VISIBLE_DEVICES": ",".join(node.uuid(i) for i in placement.gpus),
        }
        if job.container == "pytorch":
            environ |= {"WORLD_SIZE": str(job.gpu_count), "RANK": str(rank), "LOCAL_RANK": str(local)}
        return environ
    local_gpus = ",".join(str(i) for i in placement.gpus)
    return {
        "HOME": f"/home/{job.user}",
        "PATH": PATH,
        "USER": job.user,
        "LOGNAME": job.user,
        "SLURM_CLUSTER_NAME": job.cluster,
        "SLURM_JOB_ID": job.job_id,
        "SLURM_JOBID": job.job_id,
        "SLURM_JOB_USER": job.user,
        "SLURM_JOB_ACCOUNT": job.team,
        "SLURM_JOB_PARTITION": job.partition,
        "SLURM_JOB_NAME": job.name,
        "SLURM_JOB_NUM_NODES": str(len(job.placements)),
        "SLURM_NNODES": str(len(job.placements)),
        "SLURM_NODEID": str(job.placements.index(placement)),
        "SLURMD_NODENAME": node.sim.hostname,
        "SLURM_NTASKS": str(job.gpu_count),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(local),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_GPUS": local_gpus,
        "GPU_DEVICE_ORDINAL": local_gpus,
        # Devices constrained to the job's: CUDA numbers them from 0.
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(placement.gpus))),
    }
