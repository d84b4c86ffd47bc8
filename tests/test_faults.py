"""Every simulated fault kind leads to the right verdict, in /metrics, in the CLI and on MQTT."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.sources.faults import FAULT_KINDS, FaultModel
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.health import PERSISTENT_REPORTS
from gpufleet.collector.mqtt import MqttConfig
from gpufleet.collector.service import Collector
from tests.conftest import ROOT, http_get, local_config, metric, until
from tests.fleet import add_node
from tests.mqtt_broker import Broker, subscribed

# fault kind -> (health, words in the action, words in a reason)
EXPECTED = {
    "fell_off_bus": ("lost", "reboot node", "GPU_IS_LOST"),
    "gsp": ("unhealthy", "power-cycle if it persists", "GSP"),
    "microcontroller": ("unhealthy", "reset GPU", "XID 62"),
    "nvlink": ("unhealthy", "reset GPU or reboot node", "XID 74"),
    "hbm_remapped": ("unhealthy", "results of the running job are suspect", "row remap pending"),
    "hbm_remap_failed": ("unhealthy", "RMA path", "row remap failure"),
    "sram": ("unhealthy", "reset GPU", "XID 95"),
    "application": ("healthy", "", ""),
    "thermal": ("degraded", "check cooling", "straggler"),
}
FAULTY_GPU = 3


def test_every_fault_kind_has_an_expectation() -> None:
    assert set(FAULT_KINDS) - {"hbm"} == set(EXPECTED)


def faults_per_thousand_gpu_days(preset: str) -> float:
    """Draw a day at a time for 100,000 GPU-days, rates compressed 10x."""
    model = FaultModel(preset, multiplier=10, seed=1)
    faults = sum(len(model.draw(86_400)) for _ in range(100_000))
    return faults / 10 / 100


def test_fault_rates_follow_the_facts_file() -> None:
    # Llama 3: 0.474 GPU-visible and other failures per 1,000 GPU-days (facts section 2);
    # the causes a GPU's telemetry shows add up to 0.474 - network, host and the like.
    assert 0.3 < faults_per_thousand_gpu_days("healthy") < 0.45
    assert 0.5 < faults_per_thousand_gpu_days("bad-cluster") < 0.7
    assert not FaultModel("none").enabled
    with pytest.raises(ValueError, match="healthy"):
        FaultModel("apocalypse")


async def test_fault_kinds_to_verdicts_everywhere(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    collector = Collector(
        local_config(
            db_path=tmp_path / "collector.db",
            mqtt=MqttConfig(host="127.0.0.1", port=broker.port),
        )
    )
    await collector.start()
    try:
        async with subscribed(broker, "gpufleet/v1/events/#") as events:
            for index, kind in enumerate(EXPECTED):
                source = SimulatedSource("H100", 8, seed=0, node_index=index, workload="training")
                add_node(collector.state, source, index)
                source.inject(FAULTY_GPU, kind)
                # A slowdown counts once it lasts (PERSISTENT_REPORTS reports in a row).
                add_node(collector.state, source, index, reports=PERSISTENT_REPORTS)
            await until(
                lambda: metric(collector, "gpufleet_collector_mqtt_events_queued") == 0,
                timeout=10,
                what="every event to reach the broker",
            )
        _, body, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{collector.http_port}/metrics")
        health_series = {
            (s.labels["node"], s.labels["gpu"], s.labels["state"]): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name == "gpufleet_gpu_health"
        }
        for index, (kind, (health, action, reason)) in enumerate(EXPECTED.items()):
            node = f"node-{index:04d}"
            assert health_series[(node, str(FAULTY_GPU), health)] == 1, kind
            assert health_series[(node, "0", "healthy")] == 1, kind
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gpufleet.cli",
                "gpus",
                "--node",
                node,
                "-o",
                "json",
                "--collector",
                f"127.0.0.1:{collector.grpc_port}",
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await cli.communicate()
            row = json.loads(out)[FAULTY_GPU]
            assert row["health"] == health, kind
            assert action in row["action"], (kind, row["action"])
            assert any(reason in r for r in row["reasons"]) or not reason, (kind, row["reasons"])
            published = [
                e for _, e, _ in events.messages if e["node"] == node and e["kind"] == "health_changed"
            ]
            if health == "healthy":
                assert not published, kind
                xids = [e for _, e, _ in events.messages if e["node"] == node and e["kind"] == "xid"]
                assert xids and xids[0]["severity"] == "info"
            else:
                assert published and published[-1]["gpu"] == FAULTY_GPU, kind
                assert published[-1]["attributes"]["new"] == health and action in published[-1]["action"], (
                    kind
                )
    finally:
        await collector.stop()
        broker.kill()
