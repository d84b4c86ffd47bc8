"""Failover and failback across real collectors: a node leaves its first-ranked collector when it
stops, and comes back to it after the hold-down, spread over the jitter window, through admission
control, without losing or skipping a report."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpufleet.agent.main import build_parser
from gpufleet.agent.node import Delivery, NodeAgent, NodeIdentity, Schedule
from gpufleet.agent.placement import rank
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.uplink import Uplink
from gpufleet.collector.ingest import IngestPolicy
from gpufleet.collector.service import Collector
from gpufleet.collector.sinks import Sink
from gpufleet.collector.state import NodeRecord
from gpufleet.ports import free_port
from tests.conftest import local_config, metric, until
from tests.fleet import inventory_for

INTERVAL_S = 0.2
HOLD_DOWN_S = 1.0


class Intake(Sink):
    """Every report sequence one collector took in, per node, and when it first heard of each node."""

    name = "test-intake"

    def __init__(self) -> None:
        self.sequences: dict[str, set[int]] = defaultdict(set)
        self.first_seen: dict[str, float] = {}

    def node_changed(self, node: NodeRecord) -> None:
        # Told after each report applied (a duplicate is not applied, so not told) and each hello.
        self.first_seen.setdefault(node.node_id, time.monotonic())
        if node.last_sequence:
            self.sequences[node.node_id].add(node.last_sequence)


class Tier:
    """Collectors in this process on fixed addresses, stopped and started again on the same one."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.running: dict[str, Collector] = {}
        self.started: list[tuple[str, Collector, Intake]] = []

    async def start(self, address: str, policy: IngestPolicy | None = None) -> Collector:
        host, port = address.rsplit(":", 1)
        config = local_config(grpc_host=host, grpc_port=int(port), ingest=policy or IngestPolicy())
        collector = Collector(config)
        intake = Intake()
        collector.state.sinks.add(intake)
        await collector.start()
        self.running[address] = collector
        self.started.append((address, collector, intake))
        return collector

    async def stop(self, address: str) -> None:
        await self.running.pop(address).stop()

    def intake(self, address: str, generation: int = 0) -> Intake:
        """What the ``generation``-th collector started at ``address`` took in."""
        return [intake for started, _, intake in self.started if started == address][generation]

    async def close(self) -> None:
        for collector in self.running.values():
            await collector.stop()


@contextlib.asynccontextmanager
async def tier(addresses: list[str] | None = None) -> AsyncIterator[Tier]:
    """Three collectors (on loopback and free ports, unless ``addresses`` says where)."""
    collectors = Tier(addresses or [f"127.0.0.1:{free_port()}" for _ in range(3)])
    try:
        for address in collectors.addresses:
            await collectors.start(address)
        yield collectors
    finally:
        await collectors.close()


@contextlib.asynccontextmanager
async def running(uplinks: list[Uplink]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(uplink.run(stop)) for uplink in uplinks]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


def on(uplink: Uplink, address: str) -> bool:
    return uplink.connected.is_set() and uplink.current_target == address


def node_id(index: int) -> str:
    return inventory_for(SimulatedSource("H100", 1, node_index=index), index).node_id


def preferring(address: str, addresses: list[str], count: int) -> list[int]:
    """Indices of ``count`` simulated nodes whose first-ranked collector is ``address``."""
    found = [index for index in range(50 * count) if rank(node_id(index), addresses)[0] == address]
    return found[:count]


def uplink_for(index: int, addresses: list[str], failback_after_s: float) -> tuple[Uplink, SimulatedSource]:
    source = SimulatedSource("H100", 2, seed=0, node_index=index)
    uplink = Uplink(
        addresses,
        inventory_for(source, index),
        report_interval_s=INTERVAL_S,
        failback_after_s=failback_after_s,
        rng=random.Random(index),
    )
    return uplink, source


async def test_a_node_fails_over_to_its_second_collector_and_moves_back_losing_nothing() -> None:
    async with tier() as collectors:
        addresses = collectors.addresses
        source = SimulatedSource("H100", 8, seed=0, node_index=0, interval_s=INTERVAL_S)
        identity = NodeIdentity(node_id=node_id(0), hostname="node-0000", boot_id="boot-1")
        agent = NodeAgent(
            source,
            identity,
            addresses,
            Schedule(INTERVAL_S, 60.0),
            blocking_source=False,
            delivery=Delivery(failback_after_s=HOLD_DOWN_S),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await until(lambda: agent.uplink is not None and agent.uplink.connected.is_set())
            uplink = agent.uplink
            assert uplink is not None
            first, second, third = rank(identity.node_id, addresses)
            assert uplink.preferred_target == first and uplink.ranking == [first, second, third]
            assert on(uplink, first)
            await until(lambda: uplink.last_acked_sequence >= 3)

            stopping = time.monotonic()
            await collectors.stop(first)
            await until(lambda: on(uplink, second), timeout=5, what="failover to the second-ranked")
            failover_s = time.monotonic() - stopping
            on_second = time.monotonic()
            await collectors.start(first)
            await until(lambda: on(uplink, first), timeout=2 * HOLD_DOWN_S + 3, what="the move back")
            back_s = time.monotonic() - on_second
            acked = uplink.last_acked_sequence
            await until(lambda: uplink.last_acked_sequence >= acked + 3)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    # The shutdown grace (0.1 s) plus noticing and reconnecting: within two report intervals.
    assert failover_s < 2 * INTERVAL_S + 0.1, failover_s
    # Not before the hold-down, and within the hold-down plus its jitter (and a probe's round trip).
    assert HOLD_DOWN_S <= back_s < 2 * HOLD_DOWN_S + 0.5, back_s
    assert (uplink.moves_total, uplink.failbacks_total) == (2, 1)
    assert uplink.buffered == 0 and uplink.stats.reports_dropped_total == 0
    submitted = set(range(1, uplink.last_acked_sequence + 1))
    before = collectors.intake(first, 0).sequences[identity.node_id]
    meanwhile = collectors.intake(second, 0).sequences[identity.node_id]
    after = collectors.intake(first, 1).sequences[identity.node_id]
    assert not collectors.intake(third, 0).sequences
    # None missing, none skipped: every sequence submitted was taken in somewhere.
    assert before | meanwhile | after == submitted
    # The move back is clean (the stream ends once what is in flight is acknowledged): nothing twice.
    assert not meanwhile & after
    # The stop cuts the stream: a report taken in but whose acknowledgement was lost is sent again.
    assert len(before & meanwhile) <= 1
    assert len(before) + len(meanwhile) + len(after) == len(submitted) + len(before & meanwhile)


async def test_a_fleet_moves_back_spread_over_the_jitter_window() -> None:
    async with tier() as collectors:
        addresses = collectors.addresses
        first = addresses[0]
        nodes = [uplink_for(index, addresses, HOLD_DOWN_S) for index in preferring(first, addresses, 30)]
        uplinks = [uplink for uplink, _ in nodes]
        async with running(uplinks):
            await until(lambda: all(on(uplink, first) for uplink in uplinks))
            for uplink, source in nodes:
                uplink.submit(source.sample(with_processes=False))
            stopping = time.monotonic()
            await collectors.stop(first)
            await until(lambda: all(on(u, u.ranking[1]) for u in uplinks), timeout=5)
            failed_over_s = time.monotonic() - stopping
            for uplink, source in nodes:
                uplink.submit(source.sample(with_processes=False))
            await collectors.start(first)
            back: dict[int, float] = {}  # seconds from the stop to each node's return
            deadline = stopping + 2 * HOLD_DOWN_S + 3
            while len(back) < len(uplinks) and time.monotonic() < deadline:
                for position, uplink in enumerate(uplinks):
                    if position not in back and on(uplink, first):
                        back[position] = time.monotonic() - stopping
                await asyncio.sleep(0.01)
            for uplink, source in nodes:
                uplink.submit(source.sample(with_processes=False))
            await until(lambda: all(u.last_acked_sequence == 3 for u in uplinks))

    assert len(back) == len(uplinks), f"{len(uplinks) - len(back)} nodes did not move back"
    times = sorted(back.values())
    # Each waited its hold-down plus its own jitter after failing over: spread over about one
    # hold-down, not a storm.
    assert failed_over_s < 2 * INTERVAL_S + 0.1, failed_over_s
    assert times[0] >= HOLD_DOWN_S and times[-1] < failed_over_s + 2 * HOLD_DOWN_S + 0.5, times
    assert times[-1] - times[0] > 0.6 * HOLD_DOWN_S, times
    busiest = Counter(int(t / 0.1) for t in times).most_common(1)[0][1]
    assert busiest <= len(times) / 3, times
    assert all((u.moves_total, u.failbacks_total) == (2, 1) for u in uplinks)
    assert all(u.buffered == 0 and u.stats.reports_dropped_total == 0 for u in uplinks)


async def test_the_move_back_waits_for_admission_control() -> None:
    rate = 5.0
    hold_down_s = 0.3
    async with tier() as collectors:
        addresses = collectors.addresses
        first = addresses[0]
        indices = preferring(first, addresses, 6)
        uplinks = [uplink_for(index, addresses, hold_down_s)[0] for index in indices]
        async with running(uplinks):
            await until(lambda: all(on(uplink, first) for uplink in uplinks))
            await collectors.stop(first)
            await until(lambda: all(on(u, u.ranking[1]) for u in uplinks), timeout=5)
            returned = await collectors.start(
                first, IngestPolicy(admission_rate_per_s=rate, admission_burst=1)
            )
            await until(lambda: all(on(uplink, first) for uplink in uplinks), timeout=5)
            rejected = metric(returned, "gpufleet_collector_admission_rejections_total")
        admitted = sorted(collectors.intake(first, 1).first_seen[node_id(index)] for index in indices)

    # They asked within 0.3-0.6 s of each other; the collector let one in every 1/rate seconds.
    assert rejected >= 3, rejected
    gaps = [later - earlier for earlier, later in itertools.pairwise(admitted)]
    assert sum(gaps) >= (len(admitted) - 1) / rate * 0.8, gaps
    # Told to come back later, each came back to the same collector: no detour to another one.
    assert all((u.moves_total, u.failbacks_total) == (2, 1) for u in uplinks)


async def test_a_name_that_resolves_to_several_collectors_places_nodes_over_all_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]  # Linux answers on all of 127/8
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host == "collectors.gpufleet.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port))) for ip in hosts]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    port = free_port()
    async with tier([f"{host}:{port}" for host in hosts]) as collectors:
        name = f"collectors.gpufleet.test:{port}"
        uplinks = [uplink_for(index, [name], HOLD_DOWN_S)[0] for index in range(9)]
        async with running(uplinks):
            await until(lambda: all(u.connected.is_set() for u in uplinks))
            for index, uplink in enumerate(uplinks):
                assert uplink.ranking == rank(node_id(index), collectors.addresses)
                assert on(uplink, uplink.ranking[0])
            assert len({u.current_target for u in uplinks}) > 1  # spread, not all on one
            gone = uplinks[0].current_target
            assert gone is not None
            await collectors.stop(gone)
            await until(lambda: all(u.connected.is_set() and u.current_target != gone for u in uplinks))
            moved = [u for u in uplinks if u.ranking[0] == gone]
            assert all(on(u, u.ranking[1]) for u in moved)
            assert all(u.moves_total == 0 for u in uplinks if u not in moved)


def test_the_hold_down_is_a_positive_number_of_seconds() -> None:
    assert build_parser().parse_args(["--failback-after", "2.5"]).failback_after == 2.5
    assert build_parser().parse_args([]).failback_after == 60.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--failback-after", "0"])
    source = SimulatedSource("H100", 1)
    with pytest.raises(ValueError, match="failback_after_s must be positive"):
        Uplink(["127.0.0.1:1"], inventory_for(source, 0), failback_after_s=0)
