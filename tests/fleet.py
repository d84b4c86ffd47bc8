"""Build fleet states from simulated nodes without a network, for unit tests."""

from __future__ import annotations

import hashlib

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.dcgm import DcgmExposition
from gpufleet.collector.exposition import Exposition
from gpufleet.collector.state import FleetState, NodeRecord
from gpufleet.v1 import ingest_pb2, inventory_pb2


def inventory_for(
    source: SimulatedSource, index: int, hostname: str | None = None, cluster: str = "c1"
) -> inventory_pb2.NodeInventory:
    inventory = source.inventory()
    inventory.node_id = hashlib.sha256(f"node-{index}".encode()).hexdigest()[:32]
    inventory.hostname = hostname or f"node-{index:04d}"
    inventory.boot_id = "boot-1"
    inventory.cluster = cluster
    inventory.datacenter = "dc1"
    return inventory


def add_node(
    state: FleetState, source: SimulatedSource, index: int, reports: int = 1, **kwargs: str
) -> NodeRecord:
    inventory = inventory_for(source, index, **kwargs)
    node = state.hello(
        ingest_pb2.Hello(
            protocol_version=wire.PROTOCOL_VERSION, inventory=inventory, report_interval_ms=10_000
        )
    )
    for _ in range(reports):
        report = ingest_pb2.Report(
            sequence=node.last_sequence + 1, time_unix_nano=1, gpus=source.sample(with_processes=True)
        )
        state.apply_report(node, report)
    return node


def simulated_fleet(
    nodes: int, gpus_per_node: int = 8, seed: int = 0
) -> tuple[FleetState, list[SimulatedSource]]:
    state = FleetState()
    sources = []
    for index in range(nodes):
        source = SimulatedSource("H100", gpus_per_node, seed=seed, node_index=index)
        add_node(state, source, index, cluster=f"c{index % 3}")
        sources.append(source)
    return state, sources


def exposition_of(state: FleetState) -> Exposition:
    """An exposition of ``state``, registered as its sink (as the collector does)."""
    exposition = Exposition(state)
    state.sinks.add(exposition)
    return exposition


def dcgm_view(state: FleetState) -> DcgmExposition:
    """The dcgm view registered with ``state`` (registered now if there is none yet)."""
    for sink in state.sinks:
        if isinstance(sink, DcgmExposition):
            return sink
    view = DcgmExposition(state)
    state.sinks.add(view)
    return view
