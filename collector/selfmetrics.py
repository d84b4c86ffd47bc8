"""The collector's own metrics, in a registry of their own (a handful of series)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
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
        self.implausible_values = Counter(
            "gpufleet_collector_implausible_values",
            "Values from agents outside physical ranges (dropped) or timestamps from the future (clamped).",
            registry=r,
        )
        self.attribution_truncated = Counter(
            "gpufleet_collector_attribution_values_truncated",
            "Attribution values from agents cut to the length limit, and allocations dropped over the limit.",
            registry=r,
        )
        self.denied = Counter(
            "gpufleet_collector_denied_calls",
            "gRPC calls refused for a missing, unknown or too weak token, by the scope they needed.",
            ["scope"],
            registry=r,
        )
        self.events_suppressed = Counter(
            "gpufleet_collector_events_suppressed",
            "XID and health events not logged because their node was over its event budget "
            "(summarised in an events_suppressed event; counters and verdicts still count them).",
            registry=r,
        )
        self.http_refused = Counter(
            "gpufleet_collector_http_refused_connections",
            "HTTP connections refused or ended early, by reason (connections, connections_per_peer, "
            "header_timeout, body).",
            ["reason"],
            registry=r,
        )
        self.sink_errors = Counter(
            "gpufleet_collector_sink_errors",
            "Errors of a sink told of a change (store, exposition, dcgm-view, event-followers, mqtt).",
            ["sink"],
            registry=r,
        )
        self.streams = Gauge("gpufleet_collector_agent_streams", "Agent streams open now.", registry=r)
        self.store_up = Gauge(
            "gpufleet_collector_store_up",
            "1 if the database is in use, 0 if running from memory.",
            registry=r,
        )
        self.store_errors = Counter(
            "gpufleet_collector_store_errors",
            "Times the database could not be opened or written.",
            registry=r,
        )
        self.store_uncommitted_seconds = Gauge(
            "gpufleet_collector_store_uncommitted_seconds",
            "How long the oldest change not yet committed to the database has waited (0: none).",
            registry=r,
        )
        self.store_commit_seconds = Histogram(
            "gpufleet_collector_store_commit_seconds",
            "Time one group commit to the database took.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "gpufleet_collector_gc_pause_seconds",
            "Pauses of Python's garbage collector in the collector, by generation collected.",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.admission_rejections = Counter(
            "gpufleet_collector_admission_rejections",
            "Agent streams asked to come back later because too many connected at once.",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "gpufleet_collector_mqtt_connected", "1 while connected to the MQTT broker.", registry=r
        )
        self.mqtt_published = Counter(
            "gpufleet_collector_mqtt_events_published",
            "Events the MQTT broker acknowledged (QoS 1).",
            registry=r,
        )
        self.mqtt_queued = Gauge(
            "gpufleet_collector_mqtt_events_queued", "Events waiting for the MQTT broker.", registry=r
        )
        self.mqtt_dropped = Counter(
            "gpufleet_collector_mqtt_events_dropped",
            "Events dropped because the MQTT queue was full.",
            registry=r,
        )
        self.mqtt_errors = Counter(
            "gpufleet_collector_mqtt_errors",
            "Failed connections to (or lost connections with) the MQTT broker.",
            registry=r,
        )
        self.tier_nodes = Gauge(
            "gpufleet_collector_tier_nodes",
            "Nodes this collector serves in its tier (holds the lease of).",
            registry=r,
        )
        self.tier_members = Gauge(
            "gpufleet_collector_tier_members", "Live collectors of the tier, this one included.", registry=r
        )
        self.tier_fenced = Gauge(
            "gpufleet_collector_tier_fenced",
            "1 while this collector cannot renew its membership of the tier (it serves no node).",
            registry=r,
        )
        self.scrape_render_seconds = Gauge(
            "gpufleet_collector_last_render_seconds",
            "Time the latest /metrics answer took to build.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
