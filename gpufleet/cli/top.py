"""`gpufleet top`: a live view of the fleet in a terminal, one page of GPUs at a time.

Built on Textual rather than Rich alone: the view takes keys, moves focus between the GPU
table, a filter input box and a node's detail, and Textual's pilot drives it in tests
without a terminal. Each refresh asks the collector three things: the fleet summary, one
page of GPUs (sorted and filtered by the collector, as many as the table shows) and the
workloads grouped by cluster (for the allocated GPUs that sit idle); never every GPU. The
calls run in a worker thread, so keys are answered while the collector is slow or gone.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import grpc
from rich.text import Text
from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Input, Static
from textual.worker import get_current_worker

from gpufleet.cli import output
from gpufleet.cli.client import CollectorUnavailable, FleetClient, gpu_row, node_row
from gpufleet.cli.commands import HEALTH_CHOICES, NODE_STATE_CHOICES, _age, _with_table_columns
from gpufleet.event_kinds import event_row
from gpufleet.settings import fail, parse_bool
from gpufleet.v1 import events_pb2, query_pb2

# The keys that sort the table, and the collector's sort key each stands for.
SORT_KEYS = {"n": "node", "u": "utilization", "t": "temperature", "p": "power", "m": "memory", "h": "health"}
# Ascending on the first press; the others start with the largest (the busiest, hottest, worst).
ASCENDING_FIRST = frozenset({"node"})
DEFAULT_SORT = "node"
# Keys of commands._with_table_columns' rows, with headings short enough for 80 columns.
COLUMNS = [
    ("node", "NODE"),
    ("gpu", "GPU"),
    ("model", "MODEL"),
    ("health", "HEALTH"),
    ("util_pct", "UTIL%"),
    ("sm_pct", "SM%"),
    ("temperature_celsius", "TEMP"),
    ("power_watts", "WATTS"),
    ("mem_gib", "MEM GiB"),
]
NUMERIC = frozenset({"gpu", "util_pct", "sm_pct", "temperature_celsius", "power_watts", "mem_gib"})
# The column each sort key orders by.
SORTED_COLUMN = {
    "node": "node",
    "utilization": "util_pct",
    "temperature": "temperature_celsius",
    "power": "power_watts",
    "memory": "mem_gib",
    "health": "health",
}
FILTER_KEYS = ("cluster", "model", "node", "health", "idle")
FILTER_HINT = "cluster=C model=H100 health=unhealthy node=NAME idle=yes (Enter applies, Esc clears)"
KEYS_HELP = "q quit  / filter  Enter node  PgUp/PgDn page  sort: n u t p m h (again: reverse)"
NODE_KEYS_HELP = "Esc back  q quit  Tab next table"
RECENT_EVENTS = 10
# GetNode's answer and the node's latest events.
NodeAnswer = tuple[query_pb2.GetNodeResponse, list[events_pb2.Event]]


@dataclass(frozen=True)
class GpuFilter:
    """Which GPUs the table shows, in ListGpus' terms."""

    cluster: str = ""
    model: str = ""
    node: str = ""
    health: str = ""
    idle_only: bool = False

    def __str__(self) -> str:
        pairs = {"cluster": self.cluster, "node": self.node, "model": self.model, "health": self.health}
        words = [f"{key}={value}" for key, value in pairs.items() if value]
        return " ".join(words + ["idle=yes"] * self.idle_only)


def parse_filter(text: str) -> GpuFilter:
    """``cluster=c1 model=H100 health=unhealthy node=NAME idle=yes``; bare words are part of a model name."""
    values: dict[str, str] = {}
    words: list[str] = []
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep:
            words.append(token)
            continue
        if key.lower() not in FILTER_KEYS:
            known = ", ".join(f"{k}=" for k in FILTER_KEYS)
            raise ValueError(f"unknown filter {key}=; use {known} or part of a model name")
        values[key.lower()] = value
    health = values.get("health", "").lower()
    if health and health not in HEALTH_CHOICES:
        raise ValueError(f"health= is one of {', '.join(HEALTH_CHOICES)}, not {health!r}")
    try:
        idle_only = parse_bool(values.get("idle", ""))
    except ValueError as exc:
        raise ValueError(f"idle=: {exc}") from None
    return GpuFilter(
        cluster=values.get("cluster", ""),
        model=" ".join([values["model"], *words] if "model" in values else words),
        node=values.get("node", ""),
        health=health,
        idle_only=idle_only,
    )


def next_sort(current: str, key: str) -> str:
    """The sort after pressing ``key``'s letter: the same key again flips the direction."""
    if current.lstrip("-") == key:
        return key if current.startswith("-") else f"-{key}"
    return key if key in ASCENDING_FIRST else f"-{key}"


@dataclass(frozen=True)
class PageQuery:
    """One page of the GPU table: which GPUs, in which order, how many, from where."""

    gpu_filter: GpuFilter = field(default_factory=GpuFilter)
    sort_by: str = DEFAULT_SORT
    page_size: int = 20
    page_token: str = ""

    def request(self) -> query_pb2.ListGpusRequest:
        wanted = self.gpu_filter
        request = query_pb2.ListGpusRequest(
            model=wanted.model,
            node=wanted.node,
            cluster=wanted.cluster,
            idle_only=wanted.idle_only,
            sort_by=self.sort_by,
            page_size=self.page_size,
            page_token=self.page_token,
        )
        if wanted.health:
            request.health = query_pb2.GpuHealth.Value(f"GPU_HEALTH_{wanted.health.upper()}")  # type: ignore[assignment]
        return request


@dataclass(frozen=True)
class Frame:
    """What one refresh brought: the fleet at a glance and one page of GPUs."""

    summary: query_pb2.GetFleetSummaryResponse
    page: query_pb2.ListGpusResponse
    allocated_idle_gpus: float


def fetch_frame(client: FleetClient, query: PageQuery) -> Frame:
    """One refresh: three calls (the summary, one page of GPUs, the workloads by cluster)."""
    summary = client.summary()
    page = client.gpus_page(query.request())
    workloads = client.workloads(query_pb2.ListWorkloadsRequest(group_by="cluster"))
    return Frame(summary, page, sum(view.idle_gpus for view in workloads.workloads))


def header_lines(frame: Frame) -> list[str]:
    """The fleet at a glance: GPUs by health, nodes by state, utilization, power, idle GPUs."""
    summary = frame.summary
    by_state = {count.key: count.count for count in summary.nodes_by_state}
    states = [f"{by_state.pop(state, 0)} {state}" for state in NODE_STATE_CHOICES]
    states += [f"{count} {state}" for state, count in sorted(by_state.items())]
    health = ", ".join(f"{count.count} {count.key}" for count in summary.gpus_by_health) or "none"
    utilization = (
        f"{summary.mean_gpu_utilization_ratio * 100:.1f} %"
        if summary.HasField("mean_gpu_utilization_ratio")
        else "-"
    )
    lines = [
        f"GPUs  {summary.gpus:>6}  {health}",
        f"Nodes {summary.nodes:>6}  {', '.join(states)}",
        f"Util {utilization}   Power {summary.power_draw_watts / 1000:.1f} kW   "
        f"Idle {summary.idle_gpus}   Allocated but idle {frame.allocated_idle_gpus:g}",
    ]
    coverage = summary.coverage
    if coverage.collectors > 1:
        missing = f" (missing: {', '.join(coverage.missing)})" if coverage.missing else ""
        lines.append(f"Tier {coverage.answered} of {coverage.collectors} collectors answered{missing}")
    return lines


def status_line(query: PageQuery, page: query_pb2.ListGpusResponse, page_number: int) -> str:
    """The order, the page and the filter of the table."""
    pages = max(1, math.ceil(page.total_size / max(query.page_size, 1)))
    line = f"Sort {query.sort_by}   Page {page_number} of {pages} ({page.total_size} GPUs)"
    wanted = str(query.gpu_filter)
    return line + (f"   Filter {wanted}" if wanted else "")


def unreachable(target: str, exc: CollectorUnavailable) -> str:
    """The banner shown while the collector does not answer: its last error, in one line."""
    cause = exc.__cause__
    if isinstance(cause, grpc.Call) and cause.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        # "failed to connect to all addresses; last error: ...: Connection refused": the last part.
        reason = (cause.details() or str(cause.code())).rsplit(": ", 1)[-1]
        return f"collector {target} unreachable: {reason}; retrying"
    return f"{exc}; retrying"


def table_rows(views: Sequence[query_pb2.GpuView]) -> list[dict[str, Any]]:
    """The GPUs as the CLI's table rows, the model without its vendor prefix (for width)."""
    rows = [_with_table_columns(gpu_row(view)) for view in views]
    for row in rows:
        row["model"] = row["model"].removeprefix("NVIDIA ")
    return rows


def shown_columns(views: Sequence[query_pb2.GpuView]) -> list[tuple[str, str]]:
    """The table's columns: SM activity only when a GPU of the page reports it."""
    sm = any(view.HasField("sample") and view.sample.HasField("sm_active_ppm") for view in views)
    return [column for column in COLUMNS if column[0] != "sm_pct" or sm]


def model_width(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], room: int, gap: int
) -> int:
    """The widest the model column may be for the columns, ``gap`` apart, to fit in ``room``."""
    widths = {key: max([len(name)] + [len(output.cell(row[key])) for row in rows]) for key, name in columns}
    others = sum(width for key, width in widths.items() if key != "model") + gap * (len(columns) - 1)
    return max(len("MODEL"), min(widths["model"], room - others))


def plain_frame(frame: Frame, query: PageQuery, width: int) -> str:
    """One frame as plain text in ``width`` columns: the header, then the page of GPUs."""
    views = list(frame.page.gpus)
    rows, columns = table_rows(views), shown_columns(views)
    limit = model_width(rows, columns, width, gap=2)
    for row in rows:
        row["model"] = row["model"][:limit]
    table = output.table(rows, columns) if rows else "no GPUs match"
    lines = [*header_lines(frame), status_line(query, frame.page, 1), "", *table.splitlines()]
    return "\n".join(line[:width].rstrip() for line in lines)


def cell(key: str, row: dict[str, Any]) -> Text:
    return Text(output.cell(row.get(key)), justify="right" if key in NUMERIC else "left")


class GpuTable(DataTable[Text]):
    """The page of GPUs; PageUp and PageDown turn the collector's pages, not the scroll."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("pageup", "app.turn_page(-1)", "Previous page", show=False),
        Binding("pagedown", "app.turn_page(1)", "Next page", show=False),
    ]

    def on_resize(self, event: events.Resize) -> None:
        app = self.app
        if isinstance(app, TopApp):
            app.table_resized()


class NodeScreen(Screen[None]):
    """One node in detail: its GPUs and its latest events, refreshed like the fleet view."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "back", "Back")]
    DEFAULT_CSS = """
    NodeScreen #node-status { display: none; }
    NodeScreen #node-gpus { height: auto; max-height: 60%; }
    NodeScreen #node-events { height: 1fr; }
    NodeScreen #events-title { margin-top: 1; }
    """

    def __init__(self, client: FleetClient, node_id: str, name: str, refresh_s: float) -> None:
        super().__init__()
        self.client = client
        self.node_id = node_id
        self.node_name = name
        self.refresh_s = refresh_s
        self.loaded = False
        self._loading = False

    def compose(self) -> ComposeResult:
        yield Static(f"Node {self.node_name}", id="node-header", markup=False)
        yield Static("", id="node-status", markup=False)
        yield DataTable[Text](id="node-gpus", cursor_type="row")
        yield Static(f"Latest events, newest first (at most {RECENT_EVENTS})", id="events-title")
        yield DataTable[Text](id="node-events", cursor_type="row")
        yield Static(NODE_KEYS_HELP, id="keys", markup=False)

    def on_mount(self) -> None:
        self.set_interval(self.refresh_s, self.load)
        self.load()

    def load(self) -> None:
        if not self._loading:
            self._loading = True
            self._fetch()

    def action_back(self) -> None:
        """Back to the fleet, refreshed now rather than at its next turn."""
        self.app.pop_screen()
        if isinstance(self.app, TopApp):
            self.app.load()

    @work(thread=True, group="node")
    def _fetch(self) -> None:
        result: NodeAnswer | CollectorUnavailable
        try:
            answer = self.client.node(self.node_id)
            result = answer, self.client.events(query_pb2.EventFilter(node=self.node_id), RECENT_EVENTS)
        except CollectorUnavailable as exc:
            result = exc
        app = self.app
        if isinstance(app, TopApp) and not get_current_worker().is_cancelled:
            app.deliver(self._show, result)

    def _show(self, result: NodeAnswer | CollectorUnavailable) -> None:
        self._loading = False
        app = self.app
        if (isinstance(app, TopApp) and app.quitting) or app.screen is not self:
            return  # closed while the answer was on its way
        status = self.query_one("#node-status", Static)
        down = isinstance(result, CollectorUnavailable)
        status.set_class(down, "down")
        status.display = down
        if isinstance(result, CollectorUnavailable):
            status.update(unreachable(self.client.target, result))
            return
        answer, recent = result
        node = node_row(answer.node)
        self.query_one("#node-header", Static).update(
            f"Node {node['node']}  {node['state']}, last seen {_age(node['last_seen_unix'])}\n"
            f"Cluster {node['cluster'] or '-'}  rack {node['rack'] or '-'}  "
            f"driver {node['driver_version'] or '-'}  {node['gpus']} GPUs"
        )
        rows = table_rows(answer.gpus)
        columns = [c for c in shown_columns(answer.gpus) if c[0] != "node"] + [("held_by", "HELD BY")]
        gpus = self.query_one("#node-gpus", DataTable)
        cursor = gpus.cursor_row
        gpus.clear(columns=True)
        for key, heading in columns:
            gpus.add_column(Text(heading, justify="right" if key in NUMERIC else "left"), key=key)
        for row in rows:
            gpus.add_row(*(cell(key, row) for key, _ in columns))
        gpus.move_cursor(row=cursor, animate=False)
        table = self.query_one("#node-events", DataTable)
        table.clear(columns=True)
        table.add_columns("TIME (UTC)", "SEVERITY", "GPU", "KIND", "REASON")
        for event in reversed(recent):
            row = event_row(event)
            when = f"{row['time'][5:10]} {row['time'][11:19]}"
            table.add_row(when, row["severity"], output.cell(row["gpu"]), row["kind"], row["reason"])
        self.loaded = True


class TopApp(App[None]):
    """The fleet at a glance above one page of its GPUs, sorted and filtered by the collector.

    It closes the client when it exits, so that a call in flight ends at once.
    """

    TITLE = "gpufleet top"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #status { height: 1; }
    #status.down, #node-status.down { height: auto; background: $error; color: $text; text-style: bold; }
    #gpus { height: 1fr; }
    #keys { height: 1; color: $text-muted; }
    #filter { height: 1; border: none; padding: 0 1; display: none; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("slash", "open_filter", "Filter"),
        Binding("escape", "clear_filter", "Clear the filter", show=False),
        *(Binding(key, f"sort('{name}')", f"Sort by {name}", show=False) for key, name in SORT_KEYS.items()),
    ]

    def __init__(self, client: FleetClient, refresh_s: float = 2.0) -> None:
        super().__init__()
        self.client = client
        self.refresh_s = refresh_s
        # What the table is to show (page_size 0: not laid out yet), and the pages before it.
        self.page_query = PageQuery(page_size=0)
        self.earlier_pages: list[str] = []
        # The latest frame, the query it answered, and the collector's error since (if any).
        self.frame: Frame | None = None
        self.shown_query: PageQuery | None = None
        self.error = ""
        self.shown: list[query_pb2.GpuView] = []
        self._loading = False
        self._again = False
        self._quitting = False

    def compose(self) -> ComposeResult:
        # As tall as the header will be (without a tier), so that the table keeps its size.
        yield Static(f"connecting to {self.client.target} ...\n\n", id="header", markup=False)
        yield Static("", id="status", markup=False)
        yield GpuTable(id="gpus", cursor_type="row", zebra_stripes=True)
        yield Static(KEYS_HELP, id="keys", markup=False)
        yield Input(placeholder=FILTER_HINT, id="filter")

    def on_mount(self) -> None:
        self.query_one(GpuTable).focus()
        self.set_interval(self.refresh_s, self._tick)

    def on_unmount(self) -> None:
        # A call in flight (to a hung collector, say) ends now rather than at its deadline.
        self._quitting = True
        self.client.close()

    @property
    def quitting(self) -> bool:
        """Whether the app is on its way out (its widgets may be gone already)."""
        return self._quitting or not self.is_running

    def deliver(self, callback: Callable[..., None], *args: Any) -> None:
        """Hand a worker thread's answer to ``callback`` on the event loop, unless the app is quitting."""
        if self.quitting:
            return
        try:
            self.call_from_thread(callback, *args)
        except RuntimeError:
            if self.is_running:
                raise

    # -- asking the collector --------------------------------------------------------------

    def _tick(self) -> None:
        if not isinstance(self.screen, NodeScreen):
            self.load()

    def load(self) -> None:
        """Ask for the page now, or once the answer being waited for comes."""
        if self.page_query.page_size == 0:
            return
        if self._loading:
            self._again = True
            return
        self._loading = True
        self._fetch(self.page_query)

    @work(thread=True, group="refresh")
    def _fetch(self, query: PageQuery) -> None:
        result: Frame | CollectorUnavailable
        try:
            result = fetch_frame(self.client, query)
        except CollectorUnavailable as exc:
            result = exc
        if not get_current_worker().is_cancelled:
            self.deliver(self._fetched, query, result)

    def _fetched(self, query: PageQuery, result: Frame | CollectorUnavailable) -> None:
        self._loading = False
        if self.quitting:
            return
        if isinstance(result, CollectorUnavailable):
            self.error = unreachable(self.client.target, result)
        else:
            self.error = ""
            if query == self.page_query:
                self.frame, self.shown_query = result, query
                self._fill_table(result, query)
        self._show_header()
        if self._again or query != self.page_query:
            self._again = False
            self.load()

    def _ask(self, query: PageQuery, earlier_pages: list[str] | None = None) -> None:
        self.page_query = query
        if earlier_pages is not None:
            self.earlier_pages = earlier_pages
        self.load()

    # -- showing it ------------------------------------------------------------------------

    def _show_header(self) -> None:
        status = self.query_one("#status", Static)
        if self.frame is not None and self.shown_query is not None:
            self.query_one("#header", Static).update("\n".join(header_lines(self.frame)))
            page_number = len(self.earlier_pages) + 1
            status.update(self.error or status_line(self.shown_query, self.frame.page, page_number))
        else:
            status.update(self.error)
        status.set_class(bool(self.error), "down")

    def _fill_table(self, frame: Frame, query: PageQuery) -> None:
        table = self.query_one(GpuTable)
        views = list(frame.page.gpus)
        rows, columns = table_rows(views), shown_columns(views)
        arrow = " ▼" if query.sort_by.startswith("-") else " ▲"
        sorted_column = SORTED_COLUMN[query.sort_by.lstrip("-")]
        labels = [(key, heading + arrow * (key == sorted_column)) for key, heading in columns]
        padding = 2 * table.cell_padding
        limit = model_width(rows, labels, table.size.width - padding, gap=padding)
        table_cursor = table.cursor_row
        previous = self.shown[table_cursor] if 0 <= table_cursor < len(self.shown) else None
        table.clear(columns=True)
        for key, label in labels:
            heading = Text(label, justify="right" if key in NUMERIC else "left")
            table.add_column(heading, key=key, width=limit if key == "model" else None)
        for row in rows:
            row["model"] = row["model"][:limit]
            table.add_row(*(cell(key, row) for key, _ in columns))
        cursor = min(table_cursor, len(views) - 1)
        if previous is not None:
            cursor = next((i for i, view in enumerate(views) if same_gpu(view, previous)), cursor)
        self.shown = views
        if views:
            table.move_cursor(row=cursor, animate=False)

    def table_resized(self) -> None:
        """A page is as many GPUs as the table shows: a new size starts again at the first page."""
        size = max(self.query_one(GpuTable).size.height - 1, 1)
        if size != self.page_query.page_size:
            self._ask(replace(self.page_query, page_size=size, page_token=""), earlier_pages=[])

    # -- keys ------------------------------------------------------------------------------

    def action_sort(self, key: str) -> None:
        query = replace(self.page_query, sort_by=next_sort(self.page_query.sort_by, key), page_token="")
        self._ask(query, earlier_pages=[])

    def action_turn_page(self, step: int) -> None:
        if step > 0:
            if self.frame is None or self.shown_query != self.page_query:
                return
            following = self.frame.page.next_page_token
            if following:
                pages = [*self.earlier_pages, self.page_query.page_token]
                self._ask(replace(self.page_query, page_token=following), earlier_pages=pages)
        elif self.earlier_pages:
            *pages, token = self.earlier_pages
            self._ask(replace(self.page_query, page_token=token), earlier_pages=pages)

    def action_open_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = str(self.page_query.gpu_filter)
        box.display = True
        self.query_one("#keys").display = False
        box.focus()

    def _close_filter(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one("#keys").display = True
        self.query_one(GpuTable).focus()

    def action_clear_filter(self) -> None:
        self._close_filter()
        if self.page_query.gpu_filter != GpuFilter():
            self._ask(replace(self.page_query, gpu_filter=GpuFilter(), page_token=""), earlier_pages=[])

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            wanted = parse_filter(event.value)
        except ValueError as exc:
            self.notify(str(exc), title="filter", severity="error")
            return
        self._close_filter()
        self._ask(replace(self.page_query, gpu_filter=wanted, page_token=""), earlier_pages=[])

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, GpuTable) and 0 <= event.cursor_row < len(self.shown):
            view = self.shown[event.cursor_row]
            self.push_screen(NodeScreen(self.client, view.node_id, view.node_name, self.refresh_s))


def same_gpu(one: query_pb2.GpuView, other: query_pb2.GpuView) -> bool:
    return one.node_id == other.node_id and one.inventory.index == other.inventory.index


def cmd_top(client: FleetClient, args: argparse.Namespace) -> str | list[str]:
    """The live view until q; with --once, one frame as plain text."""
    if args.once:
        query = PageQuery(page_size=args.rows)
        return plain_frame(fetch_frame(client, query), query, shutil.get_terminal_size().columns)
    if not all(stream.isatty() for stream in (sys.stdin, sys.stdout, sys.stderr)):
        # Textual reads keys from stdin and draws on stderr.
        fail("gpufleet top needs a terminal; --once prints one frame as plain text")
    TopApp(client, args.refresh).run()
    return []
