"""The collector's own metrics, in a registry of their own (a handful of series)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
    generate_latest,
)

import gpufleet

# The _created series would double this registry's size for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info("gpufleet_collector_build", "Collector version.", registry=r).info(
            {"version": gpufleet.__version__}
        )
        self.reports = Counter("gpufleet_collector_reports", "Reports taken in.", registry=r)
        self.duplicate_reports = Counter(
            "gpufleet_collector_duplicate_reports",
            "Reports already taken in (resent after a reconnect), dropped.",
            registry=r,
        )
        self.rejected = Counter(
            "gpufleet_collector_rejected_messages",
            "Agent messages refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.streams = Gauge("gpufleet_collector_agent_streams", "Agent streams open now.", registry=r)
        self.scrape_render_seconds = Gauge(
            "gpufleet_collector_last_render_seconds",
            "Time the latest /metrics answer took to build.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
