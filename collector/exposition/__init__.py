"""Prometheus text exposition of the fleet, built for 100,000 GPUs.

Like kube-state-metrics, each node's lines are rendered once when the node
changes and kept, one chunk per metric family; a scrape writes each family's
HELP/TYPE once, followed by every node's chunk for it. A report's values are
formatted by one %-operation on a template shared by nodes of the same shape.
Each shard view keeps, per family, references to its nodes' chunks and gzip
members of them, made again only for families that changed (docs/benchmarks.md
has the measurements). Fleet aggregates are running totals of per-node shares,
so a fleet-wide dashboard reads a few dozen series instead of 250,000.

The package: `textformat` (the format), `catalog` (every family, once), `nodes` (one
node's lines), `views` (shards, blocks, gzip), `aggregates` (the fleet's totals), and
`Exposition` here, the sink that keeps them current.
"""

from __future__ import annotations

from collections.abc import Callable

from gpufleet.collector.exposition.aggregates import render_aggregates
from gpufleet.collector.exposition.catalog import FAMILIES
from gpufleet.collector.exposition.nodes import _NodeLines
from gpufleet.collector.exposition.textformat import (
    CONTENT_TYPE,
    escape_label_value,
    format_value,
    with_label,
)
from gpufleet.collector.exposition.views import Body, ShardViews, shard_of
from gpufleet.collector.sinks import BatchedSink
from gpufleet.collector.state import FleetState
from gpufleet.collector.totals import FleetTotals

__all__ = [
    "CONTENT_TYPE",
    "FAMILIES",
    "Body",
    "Exposition",
    "escape_label_value",
    "format_value",
    "render_aggregates",
    "shard_of",
]


class Exposition(BatchedSink):
    """Keeps every node's rendered lines current and joins them on scrape.

    Nodes that changed are rendered in small batches, REFRESH_DELAY_S after the
    first change (when an event loop runs), so that a scrape finds little left to
    render; a scrape renders what is left first.
    """

    name = "exposition"
    # Shard views kept (least recently scraped dropped first).
    MAX_VIEWS = 64
    REFRESH_DELAY_S = 0.05
    doing = "rendering the exposition"

    def __init__(
        self, state: FleetState, extra: Callable[[], bytes] = lambda: b"", totals: FleetTotals | None = None
    ) -> None:
        self._state = state
        self._extra = extra
        self._nodes: dict[str, _NodeLines] = {}
        super().__init__()
        self._dirty = {node.node_id for node in state.nodes()}
        self._totals = totals or FleetTotals()
        self._identity = b""
        self._aggregates = render_aggregates(self._totals).encode()
        self._views = ShardViews([family.header().encode() for family in FAMILIES], self.MAX_VIEWS)

    def refresh(self) -> int:
        """Re-render the nodes that changed since the last refresh; return how many."""
        if not self._dirty:
            return 0
        dirty, self._dirty = self._dirty, set()
        totals = self._totals
        shares_changed = False
        for node_id in dirty:
            node = self._state.get(node_id)
            lines = self._nodes.get(node_id)
            if node is None:
                if lines is not None:
                    del self._nodes[node_id]
                    shares_changed |= totals.replace(lines.contribution, {})
                    self._views.removed(node_id)
                continue
            if lines is None:
                lines = self._nodes[node_id] = _NodeLines(node_id)
            share = lines.contribution
            self._views.changed(node_id, lines, lines.render(node))
            shares_changed |= totals.replace(share, lines.contribution)
        if shares_changed:
            self._render_aggregates()
        return len(dirty)

    def set_identity(self, collector_id: str) -> None:
        """Label the fleet aggregates and the collector's own metrics with ``collector`` (in a tier,
        each collector's are its own, summed by recording rules); per-GPU series never carry it."""
        self._identity = f'collector="{escape_label_value(collector_id)}"'.encode() if collector_id else b""
        self._render_aggregates()

    def _render_aggregates(self) -> None:
        self._aggregates = with_label(render_aggregates(self._totals).encode(), self._identity)

    def totals(self) -> FleetTotals:
        """The fleet's running totals, current (what the aggregates are rendered from)."""
        self.refresh()
        return self._totals

    def fleet(self) -> bytes:
        """The small view: fleet aggregates and the collector's own metrics."""
        self.refresh()
        return self._aggregates + with_label(self._extra(), self._identity)

    def nodes(self, shard: int = 0, shards: int = 1) -> Body:
        """Every per-node and per-GPU series, or one shard of them."""
        self.refresh()
        return self._views.body(shard, shards)

    def everything(self) -> Body:
        """Every node's and GPU's series, then the fleet aggregates and the collector's own metrics."""
        self.refresh()
        return Body(self._views.segments(), self.fleet())
