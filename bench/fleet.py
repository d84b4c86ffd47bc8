"""The benchmark's fleet: the same nodes, GPUs and values for the collector and the baselines.

Every node is a simulated 8-GPU H100 server (`gpufleet.agent.sources.sim`). Its identity
and first reports follow from the seed and its index, so the load generator,
the prometheus_client baseline and the Pushgateway baseline all describe one
fleet. Reports are serialized once, ahead of time: a node's next report is a
pre-built body followed by a few bytes that set its sequence number and time
(protobuf merges a message that follows another into it).
"""

from __future__ import annotations

import hashlib
import time

import gpufleet
from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.v1 import allocation_pb2, ingest_pb2, inventory_pb2, telemetry_pb2

GPUS_PER_NODE = 8
MODEL = "H100"
CLUSTERS = 4
# Report bodies are built from this many simulated nodes and shared: a node
# cycles through REPORTS_PER_NODE of them, so its values change every report.
BODY_POOL_NODES = 64
REPORTS_PER_NODE = 4
NODES_PER_RACK = 4
# Namespaces (teams) of the fleet's Kubernetes half.
TEAMS = 16


def node_id(seed: int, index: int) -> str:
    return hashlib.sha256(f"gpufleet-bench:{seed}:{index}".encode()).hexdigest()[:32]


def hostname(index: int) -> str:
    return f"bench-node-{index:05d}"


def source(seed: int, index: int, interval_s: float = 10.0) -> SimulatedSource:
    return SimulatedSource(MODEL, GPUS_PER_NODE, seed=seed, node_index=index, interval_s=interval_s)


def inventory(sim: SimulatedSource, seed: int, index: int) -> inventory_pb2.NodeInventory:
    inv = sim.inventory()
    inv.node_id = node_id(seed, index)
    inv.hostname = hostname(index)
    inv.boot_id = hashlib.sha256(f"boot:{inv.node_id}".encode()).hexdigest()[:32]
    inv.datacenter = "bench-dc"
    inv.cluster = f"bench-{index % CLUSTERS}"
    inv.rack = f"rack-{index // NODES_PER_RACK:05d}"
    inv.agent_version = gpufleet.__version__
    return inv


def allocations(index: int) -> allocation_pb2.Allocations:
    """Every GPU held: even nodes run a Kubernetes pod per node, odd ones a Slurm job per 4 GPUs."""
    held = allocation_pb2.Allocations()
    for gpu in range(GPUS_PER_NODE):
        if index % 2 == 0:
            held.allocations.add(
                gpu_index=gpu,
                source="kubernetes",
                namespace=f"team-{index % TEAMS:02d}",
                pod=f"train-{index // 16:05d}-worker-{index % 16}",
                container="pytorch",
            )
        else:
            held.allocations.add(
                gpu_index=gpu,
                source="slurm",
                job=str(100_000 + index * 2 + gpu // 4),
                user=f"user-{index % 50}",
            )
    held.sources.add(name="kubernetes" if index % 2 == 0 else "slurm", available=True)
    return held


def hello(inv: inventory_pb2.NodeInventory, interval_s: float, index: int) -> ingest_pb2.Hello:
    return ingest_pb2.Hello(
        protocol_version=wire.PROTOCOL_VERSION,
        inventory=inv,
        report_interval_ms=int(interval_s * 1000),
        allocations=allocations(index),
    )


def report(gpus: list[telemetry_pb2.GpuSample]) -> ingest_pb2.Report:
    """A report without sequence and time (``stamp`` adds them)."""
    return ingest_pb2.Report(gpus=gpus, agent_stats=telemetry_pb2.AgentStats())


def body_pool(seed: int, interval_s: float) -> list[bytes]:
    """Serialized report bodies (AgentMessage with a Report, no sequence) shared by all nodes."""
    bodies = []
    for index in range(BODY_POOL_NODES):
        sim = source(seed, index, interval_s)
        for n in range(REPORTS_PER_NODE):
            gpus = sim.sample(with_processes=n == 0)
            bodies.append(ingest_pb2.AgentMessage(report=report(gpus)).SerializeToString())
    return bodies


class NodeMessages:
    """One node's Hello and its report bodies (taken from a shared pool)."""

    __slots__ = ("bodies", "hello", "index", "node_id")

    def __init__(self, seed: int, index: int, interval_s: float, pool: list[bytes]) -> None:
        inv = inventory(source(seed, index, interval_s), seed, index)
        self.index = index
        self.node_id = inv.node_id
        self.hello = ingest_pb2.AgentMessage(hello=hello(inv, interval_s, index)).SerializeToString()
        first = (index % BODY_POOL_NODES) * REPORTS_PER_NODE
        self.bodies = pool[first : first + REPORTS_PER_NODE]

    def report(self, sequence: int, time_unix_nano: int | None = None) -> bytes:
        """The node's report number ``sequence``, ready to send."""
        return self.bodies[sequence % len(self.bodies)] + stamp(sequence, time_unix_nano)


def stamp(sequence: int, time_unix_nano: int | None = None) -> bytes:
    """An AgentMessage that sets only the report's sequence and time, to follow a body."""
    return ingest_pb2.AgentMessage(
        report=ingest_pb2.Report(sequence=sequence, time_unix_nano=time_unix_nano or time.time_ns())
    ).SerializeToString()
