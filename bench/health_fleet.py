"""The scored fleet: simulated nodes that fail as a FleetScenario says, through the agent's own uplink.

Time is simulated and runs as fast as the collector takes reports in: every node reports
once per round, each report stamped with the round's simulated time, and the next round
starts while no node has more than IN_FLIGHT_ROUNDS reports unacknowledged. Reboots, GPU
swaps and agent restarts happen as the scenario asks (a new boot id; the agent's stream
opened again), once the node's reports are all acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpufleet.agent.node import NodeIdentity, node_inventory
from gpufleet.agent.sources.scenario import REBOOT_SILENT_REPORTS, Action, FleetScenario
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.uplink import Uplink

log = logging.getLogger(__name__)

GPUS_PER_NODE = 8
MODEL = "H100"
CLUSTERS = 4
NS = 1_000_000_000
# A round the collector has not acknowledged within this long is a failure of the run.
ROUND_TIMEOUT_S = 120.0
# Rounds each node may have sent and not had acknowledged: enough to hide the collector's
# group commit, few enough that simulated time never runs far ahead of the verdicts.
IN_FLIGHT_ROUNDS = 4


class FleetStalled(Exception):
    """The collector stopped acknowledging the simulated fleet's reports."""


@dataclass
class SimNode:
    index: int
    source: SimulatedSource
    node_id: str
    hostname: str
    boots: int = 0
    silent_reports: int = 0
    uplink: Uplink | None = None
    stop: asyncio.Event | None = None
    task: asyncio.Task[None] | None = None

    def identity(self) -> NodeIdentity:
        boot = hashlib.sha256(f"boot:{self.node_id}:{self.boots}".encode()).hexdigest()[:32]
        return NodeIdentity(
            node_id=self.node_id,
            hostname=self.hostname,
            boot_id=boot,
            datacenter="scored-dc",
            cluster=f"cluster-{self.index % CLUSTERS}",
            rack=f"rack-{self.index // 4:04d}",
        )


class ScoredFleet:
    """``nodes`` simulated 8-GPU nodes reporting to ``target`` for ``rounds`` simulated intervals."""

    def __init__(
        self,
        target: str,
        nodes: int,
        *,
        seed: int,
        multiplier: float,
        noise_multiplier: float = 1.0,
        interval_s: float,
        rounds: int,
        start_ns: int,
    ) -> None:
        self.target = target
        self.interval_s = interval_s
        self.rounds = rounds
        self.start_ns = start_ns
        self.now_ns = start_ns
        self.end_ns = start_ns + int(rounds * interval_s * NS)
        self.scenario = FleetScenario(
            nodes,
            GPUS_PER_NODE,
            seed=seed,
            multiplier=multiplier,
            noise_multiplier=noise_multiplier,
            interval_s=interval_s,
            start_ns=start_ns,
        )
        self.scenario.draw_until(self.end_ns)
        self.nodes = [self._node(seed, index) for index in range(nodes)]
        self.reports = 0

    def _node(self, seed: int, index: int) -> SimNode:
        source = SimulatedSource(
            MODEL,
            GPUS_PER_NODE,
            seed=seed,
            node_index=index,
            interval_s=self.interval_s,
            workload="training",
            clock=lambda: self.now_ns,
        )
        node_id = hashlib.sha256(f"gpufleet-scored:{seed}:{index}".encode()).hexdigest()[:32]
        node = SimNode(index, source, node_id, f"gpu-{index:05d}")
        source.identity = (node_id, node.hostname)
        return node

    # -- streams ------------------------------------------------------------------------------

    def _connect(self, node: SimNode) -> None:
        inventory = node_inventory(node.source, node.identity())
        node.uplink = Uplink([self.target], inventory, report_interval_s=self.interval_s)
        node.stop = asyncio.Event()
        node.task = asyncio.create_task(node.uplink.run(node.stop), name=f"uplink-{node.hostname}")

    async def _disconnect(self, node: SimNode) -> None:
        if node.stop is not None and node.task is not None:
            node.stop.set()
            await node.task
        node.uplink = node.task = node.stop = None

    async def _carry_out(self, actions: list[Action]) -> None:
        """GPU replacements and swaps first (the inventory a reboot reads must have them), then reboots."""
        reboot: set[int] = set()
        restart: set[int] = set()
        for action in actions:
            node = self.nodes[action.node]
            if action.what == "replace" and action.gpu is not None:
                node.source.replace_gpu(action.gpu)
                reboot.add(action.node)
            elif action.what == "swap" and action.gpu is not None and action.other_node is not None:
                assert action.other_gpu is not None
                node.source.swap_gpu(action.gpu, self.nodes[action.other_node].source, action.other_gpu)
            elif action.what == "reboot":
                reboot.add(action.node)
            elif action.what == "restart":
                restart.add(action.node)
        if reboot or restart:
            await self._acknowledged([self.nodes[i] for i in reboot | restart], 0)
        for index in reboot:
            node = self.nodes[index]
            await self._disconnect(node)
            node.source.rebooted()
            node.boots += 1
            node.silent_reports = REBOOT_SILENT_REPORTS
        for index in restart - reboot:
            await self._disconnect(self.nodes[index])

    async def _acknowledged(self, nodes: list[SimNode], in_flight: int) -> None:
        """Until no node of ``nodes`` has more than ``in_flight`` reports unacknowledged."""
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        waiting = [n for n in nodes if n.uplink is not None]
        while waiting:
            waiting = [n for n in waiting if n.uplink is not None and n.uplink.buffered > in_flight]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise FleetStalled(
                    f"{len(waiting)} nodes' reports were not acknowledged within {ROUND_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(0.002)

    # -- the run ------------------------------------------------------------------------------

    async def run(self, progress: Callable[[int], None] = lambda _: None) -> None:
        try:
            for round_index in range(self.rounds):
                self.now_ns = self.start_ns + int(round_index * self.interval_s * NS)
                actions: list[Action] = []
                for node in self.nodes:
                    if not node.silent_reports:  # a rebooting node's episodes wait until it is back
                        actions.extend(self.scenario.advance(node.index, self.now_ns, node.source))
                await self._carry_out(actions)
                for node in self.nodes:
                    if node.silent_reports:
                        node.silent_reports -= 1
                        continue
                    if node.uplink is None:
                        self._connect(node)
                    assert node.uplink is not None
                    samples = node.source.sample(with_processes=False)
                    node.uplink.submit(samples, time_unix_nano=self.now_ns)
                    self.reports += 1
                await self._acknowledged(self.nodes, IN_FLIGHT_ROUNDS - 1)
                progress(round_index + 1)
            await self._acknowledged(self.nodes, 0)
        finally:
            for node in self.nodes:
                await self._disconnect(node)
