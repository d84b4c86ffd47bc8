"""Every reader of the fleet is a sink registered in one place; a failing one stops nothing."""

from __future__ import annotations

import logging

import pytest

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.service import Collector, CollectorConfig
from gpufleet.collector.sinks import Sink
from gpufleet.collector.state import NodeRecord
from tests.conftest import metric
from tests.fleet import add_node


class Broken(Sink):
    name = "broken"

    def node_changed(self, node: NodeRecord) -> None:
        raise RuntimeError("this sink is broken")


def test_the_collector_registers_every_sink_in_one_place() -> None:
    collector = Collector(CollectorConfig(db_path=None))
    assert [sink.name for sink in collector.state.sinks] == [
        "store",
        "exposition",
        "workloads",
        "dcgm-view",
        "fleet-map",
        "event-followers",
    ]


def test_a_failing_sink_is_logged_once_counted_and_stops_no_other(caplog: pytest.LogCaptureFixture) -> None:
    collector = Collector(CollectorConfig(db_path=None))
    sinks = collector.state.sinks
    sinks.add(Broken())
    seen: list[str] = []

    class Watcher(Sink):
        name = "watcher"

        def node_changed(self, node: NodeRecord) -> None:
            seen.append(node.name)

    sinks.add(Watcher())
    with caplog.at_level(logging.ERROR):
        for index in range(3):
            add_node(collector.state, SimulatedSource("H100", 8, node_index=index), index)
    assert seen == [f"node-{i:04d}" for i in range(3) for _ in range(2)]  # hello, then the report
    assert caplog.text.count("sink broken failed in node_changed") == 1
    assert metric(collector, "gpufleet_collector_sink_errors_total", sink="broken") == 6
    assert b"node-0002" in bytes(collector.exposition.everything())
