"""The agent under faults: a source that raises, NVML going away, node agents that fail, exit codes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from gpufleet.agent import main as agent_main
from gpufleet.agent import node
from gpufleet.agent.node import NodeAgent, NodeIdentity, Schedule
from gpufleet.agent.sources.nvml import NvmlSource
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.uplink import Uplink
from gpufleet.v1 import inventory_pb2, telemetry_pb2
from tests.conftest import ROOT
from tests.fake_nvml import a100_table, fake_node, h100_table

OK = telemetry_pb2.GPU_READ_STATUS_OK
ERROR = telemetry_pb2.GPU_READ_STATUS_ERROR


class RecordingUplink(Uplink):
    """An uplink that keeps what it is handed instead of sending it."""

    def __init__(self, inventory: inventory_pb2.NodeInventory) -> None:
        super().__init__(["127.0.0.1:1"], inventory)
        self.reports: list[tuple[list[telemetry_pb2.GpuSample], telemetry_pb2.AgentStats]] = []
        self.inventories: list[inventory_pb2.NodeInventory] = []

    def submit(
        self,
        gpus: Sequence[telemetry_pb2.GpuSample],
        *,
        carries_events: bool = False,
        time_unix_nano: int | None = None,
    ) -> None:
        stats = telemetry_pb2.AgentStats()
        stats.CopyFrom(self.stats)
        self.reports.append((list(gpus), stats))

    def update_inventory(self, inventory: inventory_pb2.NodeInventory) -> None:
        self.inventories.append(inventory)

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


class RecordingAgent(NodeAgent):
    def _uplink(self, inventory: inventory_pb2.NodeInventory) -> Uplink:
        return RecordingUplink(inventory)

    @property
    def recorded(self) -> RecordingUplink:
        assert isinstance(self.uplink, RecordingUplink)
        return self.uplink


class FlakySource(SimulatedSource):
    """A simulated node whose sampling raises on the calls numbered in ``failing``."""

    def __init__(self, node_index: int, failing: set[int]) -> None:
        super().__init__("H100", 2, seed=3, node_index=node_index, interval_s=0.02)
        self.failing = failing
        self.samples = 0

    def sample(self, *, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        self.samples += 1
        if self.samples in self.failing:
            raise KeyError("gpu-7")  # a bug in the source, say
        return super().sample(with_processes=with_processes)


class BrokenSource(SimulatedSource):
    """A source that never gives an inventory."""

    def __init__(self) -> None:
        super().__init__("H100", 1)

    def inventory(self) -> inventory_pb2.NodeInventory:
        raise RuntimeError("inventory is broken")


def agent_for(
    source: object, index: int, *, interval_s: float = 0.02, blocking: bool = False
) -> RecordingAgent:
    return RecordingAgent(
        source,  # type: ignore[arg-type]
        NodeIdentity(f"node-{index}", f"host-{index}", "boot"),
        ["127.0.0.1:1"],
        Schedule(interval_s=interval_s, inventory_interval_s=3600),
        blocking_source=blocking,
    )


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def fresh_log_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "_logged_failures", set())


async def test_a_failing_sample_is_counted_and_that_node_and_the_others_carry_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sources = [FlakySource(0, set()), FlakySource(1, {2, 3}), FlakySource(2, set())]
    agents = [agent_for(source, i) for i, source in enumerate(sources)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
    try:
        await until(
            lambda: all(a.uplink is not None and len(a.recorded.reports) >= 6 for a in agents), "reports"
        )
        assert not stop.is_set()
        assert not any(task.done() for task in tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    flaky = agents[1].recorded.reports
    assert [gpu.read_status for gpu in flaky[0][0]] == [OK, OK]
    for failed, _ in flaky[1:3]:
        assert [gpu.read_status for gpu in failed] == [ERROR, ERROR]
        assert "KeyError" in failed[0].read_error and "retrying" in failed[0].read_error
    assert [gpu.read_status for gpu in flaky[3][0]] == [OK, OK]  # the next interval reads again
    assert flaky[-1][1].nvml_errors_total == 2
    for healthy in (agents[0], agents[2]):
        assert all(gpu.read_status == OK for gpus, _ in healthy.recorded.reports for gpu in gpus)
        assert healthy.recorded.reports[-1][1].nvml_errors_total == 0
    logged = [r for r in caplog.records if "sampling failed" in r.getMessage()]
    assert len(logged) == 1 and "KeyError" in logged[0].getMessage()


async def test_a_source_raising_on_inventory_reread_keeps_the_last_inventory() -> None:
    source = FlakySource(0, set())
    agent = RecordingAgent(
        source,
        NodeIdentity("node-0", "host-0", "boot"),
        ["127.0.0.1:1"],
        Schedule(interval_s=0.02, inventory_interval_s=0.05),
        blocking_source=False,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: agent.uplink is not None and len(agent.recorded.reports) >= 2, "reports")
        source.inventory = BrokenSource().inventory  # type: ignore[method-assign]
        count = len(agent.recorded.reports)
        await until(lambda: len(agent.recorded.reports) >= count + 6, "more reports")
    finally:
        stop.set()
        await task
    assert agent.recorded.reports[-1][1].nvml_errors_total >= 1
    assert agent.recorded.inventories == []
    assert all(gpu.read_status == OK for gpus, _ in agent.recorded.reports for gpu in gpus)


async def test_nvml_unloaded_and_reloaded_under_a_running_node_agent() -> None:
    nvml = fake_node(h100_table(), a100_table())
    init_threads: list[str] = []
    nvml_init = nvml.nvmlInit

    def recording_init() -> None:
        init_threads.append(threading.current_thread().name)
        nvml_init()

    nvml.nvmlInit = recording_init  # type: ignore[method-assign]
    source = NvmlSource(nvml, retry_initial_s=0.01, retry_max_s=0.05)
    agent = agent_for(source, 0, blocking=True)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))

    def last_statuses() -> list[int]:
        reports = agent.recorded.reports if agent.uplink is not None else []
        return [gpu.read_status for gpu in reports[-1][0]] if reports else []

    try:
        await until(lambda: last_statuses() == [OK, OK], "normal reports")
        nvml.unload_driver()
        await until(lambda: last_statuses() == [ERROR, ERROR], "ERROR reports")
        gpus, stats = agent.recorded.reports[-1]
        assert gpus[0].read_error == "NVML unavailable: driver not loaded; retrying"
        assert stats.nvml_errors_total >= 1
        await until(lambda: len(init_threads) >= 3, "nvmlInit retried")
        nvml.load_driver("570.86.10")
        await until(lambda: last_statuses() == [OK, OK], "normal reports again")
        await until(lambda: bool(agent.recorded.inventories), "the inventory read again")
    finally:
        stop.set()
        await task
        source.close()
    assert agent.recorded.inventories[-1].driver_version == "570.86.10"
    assert [gpu.name for gpu in agent.recorded.inventories[-1].gpus] == [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100-SXM4-80GB",
    ]
    assert init_threads[0] == "MainThread"  # the source started here
    assert "MainThread" not in init_threads[1:]  # and was retried off the event loop


async def test_a_node_agent_without_an_inventory_gives_up_alone() -> None:
    broken, healthy = agent_for(BrokenSource(), 0, interval_s=0.01), agent_for(FlakySource(1, set()), 1)
    stop = asyncio.Event()
    healthy_task = asyncio.create_task(healthy.run(stop))
    try:
        assert await agent_main.run_node(broken, stop) is False
        assert not stop.is_set() and not healthy_task.done()
        count = len(healthy.recorded.reports)
        await until(lambda: len(healthy.recorded.reports) > count, "the healthy node reporting on")
    finally:
        stop.set()
        await healthy_task


def run_main(
    args: list[str], monkeypatch: pytest.MonkeyPatch, sources: list[object] | Callable[..., object]
) -> int:
    """The agent's main(args) with these sources for its nodes (or this open_source); its exit status."""
    opener = sources if callable(sources) else lambda _args, index: sources[index]
    monkeypatch.setattr(agent_main, "open_source", opener)
    for name in [name for name in os.environ if name.startswith("GPUFLEET_")]:
        monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        agent_main.main(["--collector", "127.0.0.1:1", "--interval", "0.01", *args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        root.handlers[:], root.level = handlers, level  # main() sets up logging for a process
    return 0


def test_the_agent_exits_non_zero_when_every_node_agent_failed_for_good(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_main(["--source", "sim", "--nodes", "2"], monkeypatch, [BrokenSource(), BrokenSource()])
    assert status == 1
    assert "every node agent failed for good" in capsys.readouterr().err


class SigtermAfter(SimulatedSource):
    """A healthy node that sends the agent SIGTERM once it has sampled ``samples`` times."""

    def __init__(self, samples: int) -> None:
        super().__init__("H100", 1)
        self.left = samples

    def sample(self, *, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        self.left -= 1
        if self.left == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().sample(with_processes=with_processes)


def test_one_node_agent_failing_leaves_the_agent_serving_until_sigterm_and_exit_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    healthy = SigtermAfter(samples=20)  # the broken node gives up after 5 tries, 0.01 s apart
    status = run_main(["--source", "sim", "--nodes", "2"], monkeypatch, [BrokenSource(), healthy])
    assert healthy.left <= 0
    assert status == 0


def test_a_source_that_cannot_start_exits_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_node(h100_table())
    nvml.unload_driver()

    def no_nvml(_args: object, _index: int) -> NvmlSource:
        return NvmlSource(nvml)

    assert run_main(["--source", "nvml", "--node-id", "n1"], monkeypatch, no_nvml) == 2


def test_sigterm_stops_a_running_agent_with_exit_0(tmp_path: Path) -> None:
    log = (tmp_path / "agent.log").open("w+")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.agent.main",
            "--source",
            "sim",
            "--collector",
            "127.0.0.1:1",
            "--interval",
            "0.1",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")},
    )
    try:
        deadline = time.monotonic() + 60
        while "reporting 1 node(s)" not in (tmp_path / "agent.log").read_text():
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.1)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
