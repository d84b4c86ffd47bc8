"""`gpufleet top` against a real collector and simulated nodes: Textual's pilot at 80x24,
`--once` as a subprocess, and once in a real terminal (tmux)."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Input, Static

from gpufleet.cli.client import FleetClient
from gpufleet.cli.top import (
    Frame,
    GpuFilter,
    GpuTable,
    NodeScreen,
    PageQuery,
    TopApp,
    fetch_frame,
    header_lines,
    parse_filter,
)
from gpufleet.ports import free_port
from gpufleet.v1 import query_pb2
from tests.conftest import ROOT, Processes, until, wait_until

NODES = 20
GPUS = NODES * 8
SCREENSHOT = ROOT / "docs" / "images" / "top.svg"


class CountingClient(FleetClient):
    """A FleetClient that notes each call: its method, the page size asked for, the answer's bytes."""

    def __init__(self, target: str) -> None:
        super().__init__(target, timeout_s=5.0)
        self.calls: list[tuple[str, int, int]] = []

    def _call(self, method: str, request: Any) -> Any:
        answer = super()._call(method, request)
        self.calls.append((method, getattr(request, "page_size", 0), answer.ByteSize()))
        return answer


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A collector with 20 simulated 8-GPU nodes in two clusters, all reporting."""
    processes = Processes(tmp_path_factory.mktemp("top"))
    try:
        _, target, _ = processes.collector()
        processes.sim_fleet(
            *("--nodes", str(NODES), "--interval", "1", "--collector", target),
            *("--clusters", "2", "--scheduler", "mixed"),
        )
        with FleetClient(target, 5.0) as client:

            def all_up() -> bool:
                summary = client.summary()
                states = {count.key: count.count for count in summary.nodes_by_state}
                return summary.gpus == GPUS and states.get("up") == NODES

            wait_until(all_up, timeout=30, what=f"{NODES} nodes up")
        yield target
    finally:
        processes.stop_all()


def text(app: TopApp | NodeScreen, selector: str) -> str:
    return str(app.query_one(selector, Static).content)


def column(table: DataTable[Any], key: str) -> list[str]:
    index = table.get_column_index(key)
    return [str(table.get_cell_at(Coordinate(row, index))) for row in range(table.row_count)]


def temperatures(app: TopApp) -> list[int]:
    return [view.sample.gpu_temperature_celsius for view in app.shown]


async def filtered(pilot: Any, app: TopApp, words: str) -> None:
    """Type ``words`` into the filter box and wait for the page they ask for."""
    await pilot.press("slash", "ctrl+u", *words, "enter")
    wanted = parse_filter(words)
    await until(lambda: app.shown_query is not None and app.shown_query.gpu_filter == wanted, what=words)


async def test_the_fleet_at_80x24_sorted_paged_filtered_and_a_node_in_detail(fleet: str) -> None:
    client = CountingClient(fleet)
    app = TopApp(client, refresh_s=0.5)
    with client:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(lambda: app.frame is not None, what="the first frame")
            assert app.shown_query == app.page_query, "the first page was not the size of the table"
            table = app.query_one(GpuTable)
            # The header says what the collector's summary says.
            with FleetClient(fleet, 5.0) as probe:
                summary = probe.summary()
            header = text(app, "#header")
            for count in summary.gpus_by_health:
                assert f"{count.count} {count.key}" in header
            assert f"GPUs  {GPUS:>6}" in header and f"{NODES} up, 0 stale, 0 down" in header
            assert "Allocated but idle" in header and "Tier" not in header
            # One page as tall as the table, every column in 80 columns.
            assert table.row_count == app.page_query.page_size == table.size.height - 1
            assert table.virtual_size.width <= table.size.width
            assert f"Page 1 of {-(-GPUS // table.row_count)} ({GPUS} GPUs)" in text(app, "#status")

            await pilot.press("t")
            await until(lambda: app.shown_query == replace_sort(app, "-temperature"), what="hottest first")
            assert temperatures(app) == sorted(temperatures(app), reverse=True)
            assert column(table, "temperature_celsius") == [str(t) for t in temperatures(app)]
            await pilot.press("t")
            await until(lambda: app.shown_query == replace_sort(app, "temperature"), what="coolest first")
            assert temperatures(app) == sorted(temperatures(app))

            # Pages in node order: PageDown goes on after the last row, PageUp comes back.
            await pilot.press("n")
            await until(lambda: app.shown_query == replace_sort(app, "node"), what="node order")
            first_page = [(v.node_name, v.inventory.index) for v in app.shown]
            await pilot.press("pagedown")
            await until(lambda: app.shown_query is not None and app.shown_query.page_token != "")
            second_page = [(v.node_name, v.inventory.index) for v in app.shown]
            assert second_page[0] > first_page[-1] and "Page 2 of" in text(app, "#status")
            await pilot.press("pageup")
            await until(lambda: app.shown_query is not None and app.shown_query.page_token == "")
            assert [(v.node_name, v.inventory.index) for v in app.shown] == first_page

            # Filters: by cluster and a bare word (part of the model name), then Esc clears.
            per_cluster = {count.key: count.count for count in summary.gpus_by_cluster}
            await filtered(pilot, app, "cluster=sim-1 H100")
            assert app.frame is not None and app.frame.page.total_size == per_cluster["sim-1"]
            assert {view.cluster for view in app.shown} == {"sim-1"}
            assert "Filter cluster=sim-1 model=H100" in text(app, "#status")
            await filtered(pilot, app, "health=healthy")
            assert {view.health for view in app.shown} == {query_pb2.GPU_HEALTH_HEALTHY}
            await filtered(pilot, app, "health=unhealthy")
            assert app.shown == [] and table.row_count == 0
            await pilot.press("escape")
            await until(lambda: app.shown_query is not None and app.shown_query.gpu_filter == GpuFilter())
            assert app.frame.page.total_size == GPUS and app.focused is table
            # A filter that does not parse keeps the box open and the page as it was.
            await pilot.press("slash", *"colour=red", "enter")
            assert isinstance(app.focused, Input)
            assert app.page_query.gpu_filter == GpuFilter()
            await pilot.press("escape")

            # Enter on the third row: that node's GPUs and its latest events.
            await pilot.press("down", "down")
            node = app.shown[table.cursor_row].node_name
            await pilot.press("enter")
            await until(lambda: isinstance(app.screen, NodeScreen) and app.screen.loaded, what="the node")
            detail = app.screen
            assert isinstance(detail, NodeScreen)
            assert text(detail, "#node-header").startswith(f"Node {node}  up")
            assert detail.query_one("#node-gpus", DataTable).row_count == 8
            assert 1 <= detail.query_one("#node-events", DataTable).row_count <= 10
            await pilot.press("escape")
            assert not isinstance(app.screen, NodeScreen)
            # Opening and closing the detail at once is no error.
            for _ in range(3):
                await pilot.press("enter", "escape")
            await asyncio.sleep(0.5)
            assert app.is_running and not isinstance(app.screen, NodeScreen)

            await pilot.press("q")
            await until(lambda: not app.is_running, what="q to quit")

    # Each refresh: the summary, one page (no larger than the table) and the workloads.
    refresh = ["GetFleetSummary", "ListGpus", "ListWorkloads"]
    methods = [method for method, _, _ in client.calls if method in refresh]
    assert len(methods) >= 3 * 5 and methods == (refresh * len(methods))[: len(methods)]
    assert max(size for method, size, _ in client.calls if method == "ListGpus") <= 24


def replace_sort(app: TopApp, sort_by: str) -> PageQuery:
    return PageQuery(app.page_query.gpu_filter, sort_by, app.page_query.page_size, "")


def test_one_refresh_is_three_calls(fleet: str) -> None:
    client = CountingClient(fleet)
    with client:
        frame = fetch_frame(client, PageQuery(page_size=18))
        assert [(method, size) for method, size, _ in client.calls] == [
            ("GetFleetSummary", 0),
            ("ListGpus", 18),
            ("ListWorkloads", 0),
        ]
        assert len(frame.page.gpus) == 18 and frame.page.total_size == GPUS


def test_the_header_of_a_tier_says_how_many_collectors_answered() -> None:
    summary = query_pb2.GetFleetSummaryResponse(
        nodes=2,
        gpus=16,
        nodes_by_state=[query_pb2.Count(key="up", count=1), query_pb2.Count(key="down", count=1)],
        gpus_by_health=[query_pb2.Count(key="healthy", count=8), query_pb2.Count(key="unreachable", count=8)],
        coverage=query_pb2.Coverage(collectors=3, answered=2, missing=["collector-c"]),
    )
    lines = header_lines(Frame(summary, query_pb2.ListGpusResponse(), 2.5))
    assert lines[0] == "GPUs      16  8 healthy, 8 unreachable"
    assert lines[1] == "Nodes      2  1 up, 0 stale, 1 down"
    assert lines[2].startswith("Util -") and lines[2].endswith("Allocated but idle 2.5")
    assert lines[3] == "Tier 2 of 3 collectors answered (missing: collector-c)"


def test_filters_as_typed() -> None:
    assert parse_filter("cluster=c1 model=H100 health=Unhealthy node=sim-node-00017") == GpuFilter(
        cluster="c1", model="H100", node="sim-node-00017", health="unhealthy"
    )
    assert parse_filter("H100 80GB idle=yes") == GpuFilter(model="H100 80GB", idle_only=True)
    assert str(parse_filter("node=n1 h100 cluster=c")) == "cluster=c node=n1 model=h100"
    for bad in ("colour=red", "health=poorly", "idle=maybe"):
        with pytest.raises(ValueError):
            parse_filter(bad)


async def test_a_screenshot_at_100x30_for_the_docs(fleet: str) -> None:
    with FleetClient(fleet, 5.0) as client:
        app = TopApp(client, refresh_s=0.5)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("u")
            await until(lambda: app.shown_query is not None and app.shown_query.sort_by == "-utilization")
            # The rows of that page drawn, not only asked for.
            await until(lambda: "sim-node-" in app.export_screenshot(), what="the rows on screen")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            app.save_screenshot(SCREENSHOT.name, str(SCREENSHOT.parent))
    assert "sim-node-" in SCREENSHOT.read_text()


async def test_a_stopped_or_lost_collector_is_a_banner_and_the_view_keeps_retrying(
    processes: Processes,
) -> None:
    process, target, base = processes.collector()
    with FleetClient(target, 1.0) as client:
        app = TopApp(client, refresh_s=0.3)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(lambda: app.frame is not None, what="the first frame")
            # Stopped (SIGSTOP): each call runs into its deadline; then it answers again.
            process.send_signal(signal.SIGSTOP)
            await until(lambda: "unreachable" in text(app, "#status"), timeout=5, what="the banner")
            assert text(app, "#status") == f"collector {target} unreachable: Deadline Exceeded; retrying"
            process.send_signal(signal.SIGCONT)
            await until(lambda: text(app, "#status").startswith("Sort node"), timeout=5, what="back")
            # Gone: the banner says why, keys are still answered, and it comes back on the same port.
            process.kill()
            process.wait()
            await until(lambda: "unreachable" in text(app, "#status"), timeout=5, what="the banner")
            banner = text(app, "#status")
            assert banner.startswith(f"collector {target} unreachable: ") and banner.endswith("; retrying")
            assert "\n" not in banner and len(banner) <= 80
            await pilot.press("t")
            await until(lambda: app.page_query.sort_by == "-temperature", what="a key while down")
            assert app.is_running
            grpc_port, http_port = target.rsplit(":", 1)[1], base.rsplit(":", 1)[1]
            await asyncio.to_thread(processes.collector, grpc_port=int(grpc_port), http_port=int(http_port))
            await until(lambda: text(app, "#status").startswith("Sort -temperature"), timeout=15, what="back")


def gpufleet(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}
    command = [sys.executable, "-m", "gpufleet.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


def test_once_prints_the_header_and_the_first_page_as_plain_text(fleet: str) -> None:
    done = gpufleet("top", "--once", "--collector", fleet)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert "\x1b" not in done.stdout and max(len(line) for line in lines) <= 80
    assert lines[0].startswith(f"GPUs  {GPUS:>6}  ") and lines[1].startswith(f"Nodes {NODES:>6}  ")
    heading = next(i for i, line in enumerate(lines) if line.startswith("NODE "))
    assert lines[heading].split() == [
        "NODE",
        "GPU",
        "MODEL",
        "HEALTH",
        "UTIL%",
        "SM%",
        "TEMP",
        "WATTS",
        "MEM",
        "GiB",
    ]
    rows = lines[heading + 1 :]
    assert len(rows) == 20 and all(row.startswith("sim-node-000") for row in rows)

    done = gpufleet("top", "--once", "--rows", "3", "--collector", fleet)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == heading + 1 + 3


def test_once_against_a_dead_address_is_one_error_line() -> None:
    target = f"127.0.0.1:{free_port()}"
    done = gpufleet("top", "--once", "--collector", target, "--timeout", "5")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"error: cannot reach the collector at {target}")
    assert len(done.stderr.splitlines()) == 1


class Tmux:
    """A tmux server of this test's own, with one 80x24 window running ``command``."""

    def __init__(self, directory: Path, command: list[str]) -> None:
        self._tmux = ["tmux", "-S", str(directory / "tmux.sock"), "-f", "/dev/null"]
        # The shell notes the exit status (tmux itself may be late to notice the exit), and the
        # pane stays after the program ends, to read what it left on the screen.
        self._status = directory / "status"
        run = f"{shlex.join(command)}; echo $? > {shlex.quote(str(self._status))}"
        self._run("new-session", "-d", "-x", "80", "-y", "24", "-c", str(ROOT), run)
        self._run("set-option", "-g", "remain-on-exit", "on")

    def _run(self, *args: str) -> str:
        return subprocess.run([*self._tmux, *args], capture_output=True, text=True, check=True).stdout

    def screen(self) -> list[str]:
        return self._run("capture-pane", "-p").splitlines()

    def press(self, key: str) -> None:
        self._run("send-keys", key)

    def exit_status(self) -> str:
        """Empty while the program runs, then its exit status."""
        return self._status.read_text().strip() if self._status.exists() else ""

    def close(self) -> None:
        subprocess.run([*self._tmux, "kill-server"], check=False, capture_output=True)


@contextmanager
def top_in_tmux(tmp_path: Path, target: str) -> Iterator[Tmux]:
    """`gpufleet top` in a real 80x24 terminal, its calls given 30 s each."""
    command = [sys.executable, "-m", "gpufleet.cli", "top", "--collector", target, "--refresh", "0.5"]
    terminal = Tmux(tmp_path, [*command, "--timeout", "30"])
    try:
        yield terminal
    finally:
        terminal.close()


def test_in_a_real_terminal_q_quits_and_restores_it(fleet: str, tmp_path: Path) -> None:
    with top_in_tmux(tmp_path, fleet) as terminal:
        wait_until(lambda: sum(" sim-node-" in line for line in terminal.screen()) >= 18, what="a page")
        lines = terminal.screen()
        assert lines[0].startswith(f"GPUs  {GPUS:>6}") and lines[-1].startswith("q quit")
        terminal.press("t")
        wait_until(lambda: any("TEMP ▼" in line for line in terminal.screen()), what="hottest first")
        terminal.press("q")
        wait_until(lambda: terminal.exit_status() != "", timeout=10, what="top to exit")
        assert terminal.exit_status() == "0"
        # The terminal is back as it was: the view's screen is gone, and no traceback.
        after = "\n".join(terminal.screen())
        assert "sim-node-" not in after and "Traceback" not in after


def test_q_quits_at_once_while_a_call_hangs(processes: Processes, tmp_path: Path) -> None:
    process, target, _ = processes.collector()
    with top_in_tmux(tmp_path, target) as terminal:
        wait_until(lambda: terminal.screen()[0].startswith("GPUs"), what="the header")
        process.send_signal(signal.SIGSTOP)
        time.sleep(1)  # a refresh now waits for its answer
        terminal.press("q")
        wait_until(lambda: terminal.exit_status() == "0", timeout=3, what="top to exit before the deadline")
