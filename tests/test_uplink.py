"""The agent's uplink against real collectors: delivery, resume, bounded buffer, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from gpufleet.agent.placement import rank
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.spool import Spool
from gpufleet.agent.uplink import Uplink
from gpufleet.collector.service import Collector, CollectorConfig
from gpufleet.ports import free_port
from tests.conftest import metric
from tests.fleet import inventory_for


def make_uplink(target: str, max_buffered_reports: int = 360) -> tuple[Uplink, SimulatedSource]:
    source = SimulatedSource("H100", 8, seed=0, node_index=0)
    uplink = Uplink(
        [target],
        inventory_for(source, 0),
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        rng=random.Random(0),
        max_buffered_reports=max_buffered_reports,
    )
    return uplink, source


@contextlib.asynccontextmanager
async def running(uplink: Uplink) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def start_collector(port: int) -> Collector:
    collector = Collector(
        CollectorConfig(
            grpc_host="127.0.0.1", grpc_port=port, http_host="127.0.0.1", http_port=0, shutdown_grace_s=0.1
        )
    )
    await collector.start()
    return collector


async def test_reports_are_delivered_and_acknowledged(collector: Collector) -> None:
    uplink, source = make_uplink(f"127.0.0.1:{collector.grpc_port}")
    async with running(uplink):
        for _ in range(5):
            uplink.submit(source.sample(with_processes=False))
        await until(lambda: uplink.last_acked_sequence == 5)
        assert uplink.buffered == 0
    node = collector.state.find("node-0000")
    assert node is not None and node.last_sequence == 5


async def test_reports_made_while_the_collector_is_away_arrive_after_it_returns() -> None:
    port = free_port()
    uplink, source = make_uplink(f"127.0.0.1:{port}", max_buffered_reports=5)
    async with running(uplink):
        for _ in range(8):  # nobody listens yet: 3 oldest are dropped, 5 kept
            uplink.submit(source.sample(with_processes=False))
        assert uplink.buffered == 5 and uplink.stats.reports_dropped_total == 3
        collector = await start_collector(port)
        try:
            await until(lambda: uplink.last_acked_sequence == 8)
            node = collector.state.find("node-0000")
            assert node is not None and node.last_sequence == 8
            assert metric(collector, "gpufleet_collector_reports_total") == 5
        finally:
            await collector.stop()


async def test_collector_restart_resends_what_was_not_acknowledged() -> None:
    port = free_port()
    first = await start_collector(port)
    uplink, source = make_uplink(f"127.0.0.1:{port}")
    async with running(uplink):
        uplink.submit(source.sample(with_processes=False))
        await until(lambda: uplink.last_acked_sequence == 1)
        await first.stop()
        await until(lambda: not uplink.connected.is_set())
        uplink.submit(source.sample(with_processes=False))
        uplink.submit(source.sample(with_processes=False))
        second = await start_collector(port)
        try:
            await until(lambda: uplink.last_acked_sequence == 3)
            assert (
                metric(second, "gpufleet_collector_reports_total") == 2
            )  # 2 and 3; 1 was acknowledged before
            assert uplink.stats.reconnects_total >= 1
        finally:
            await second.stop()


async def test_a_restarted_agent_continues_the_sequence_the_collector_knows(collector: Collector) -> None:
    target = f"127.0.0.1:{collector.grpc_port}"
    before, source = make_uplink(target)
    async with running(before):
        for _ in range(3):
            before.submit(source.sample(with_processes=False))
        await until(lambda: before.last_acked_sequence == 3)
    after, _ = make_uplink(target)  # same node and boot, fresh process: numbering starts at 1 again
    after.submit(source.sample(with_processes=False))
    async with running(after):
        await until(lambda: after.last_acked_sequence == 4)
    assert metric(collector, "gpufleet_collector_reports_total") == 4
    assert metric(collector, "gpufleet_collector_duplicate_reports_total") == 0


async def test_spooled_reports_survive_an_agent_restart(tmp_path: Path) -> None:
    port = free_port()
    source = SimulatedSource("H100", 8, seed=0)
    inventory = inventory_for(source, 0)
    spool = Spool(tmp_path, inventory.node_id, inventory.boot_id)
    crashed = Uplink([f"127.0.0.1:{port}"], inventory, spool=spool)
    source.inject(2, "fell_off_bus")
    for _ in range(3):  # nobody listens: the reports stay in the spool
        crashed.submit(source.sample(with_processes=False))
    del crashed  # the agent dies without a word
    restarted = Uplink(
        [f"127.0.0.1:{port}"],
        inventory,
        spool=Spool(tmp_path, inventory.node_id, inventory.boot_id),
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
    )
    assert restarted.buffered == 3
    restarted.submit(source.sample(with_processes=False))
    collector = await start_collector(port)
    try:
        async with running(restarted):
            await until(lambda: restarted.last_acked_sequence == 4)
        node = collector.state.find("node-0000")
        assert node is not None and node.gpus[2].xid_totals == {79: 1}
        assert not list((tmp_path / inventory.node_id / inventory.boot_id).glob("*.report"))
    finally:
        await collector.stop()


async def test_spooled_reports_of_an_earlier_boot_are_discarded_and_counted(tmp_path: Path) -> None:
    source = SimulatedSource("H100", 8, seed=0)
    inventory = inventory_for(source, 0)
    before = Uplink(["127.0.0.1:1"], inventory, spool=Spool(tmp_path, inventory.node_id, "boot-old"))
    before.submit(source.sample(with_processes=False))
    after = Uplink(["127.0.0.1:1"], inventory, spool=Spool(tmp_path, inventory.node_id, "boot-new"))
    assert after.buffered == 0 and after.stats.reports_dropped_total == 1


async def test_failover_to_the_next_collector_address(collector: Collector) -> None:
    source = SimulatedSource("H100", 8, seed=0)
    inventory = inventory_for(source, 0)
    live = f"127.0.0.1:{collector.grpc_port}"
    # A dead address this node ranks first: it is tried first, and the node moves on to the live one.
    # Ports held bound but not listening (connections to them are refused), distinct from each other.
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(32):
            bound = held.enter_context(socket.socket())
            bound.bind(("127.0.0.1", 0))
            ports.append(bound.getsockname()[1])
        dead = next(
            address
            for address in (f"127.0.0.1:{port}" for port in ports)
            if rank(inventory.node_id, [address, live])[0] == address
        )
        uplink = Uplink([live, dead], inventory, backoff_base_s=0.05, backoff_cap_s=0.2, rng=random.Random(0))
        async with running(uplink):
            uplink.submit(source.sample(with_processes=False))
            await until(lambda: uplink.last_acked_sequence == 1)
    assert uplink.stats.reconnects_total >= 1
    assert uplink.current_target == live and uplink.preferred_target == dead
