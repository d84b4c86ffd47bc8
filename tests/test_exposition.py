"""The Prometheus exposition: values equal the samples, labels escaped, promtool clean."""

from __future__ import annotations

import gzip

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.sources.sim import SimulatedSource
from collector.exposition import Exposition, escape_label_value, shard_of
from collector.state import FleetState
from tests.fleet import add_node, simulated_fleet
from tests.promtool import check_metrics


def samples(body: bytes) -> list[Sample]:
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(all_samples: list[Sample], name: str, **labels: str) -> float:
    matches = [
        s.value
        for s in all_samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} matches"
    return matches[0]


def test_every_gpu_value_is_exported_in_base_units() -> None:
    state, sources = simulated_fleet(4)
    exposition = Exposition(state)
    parsed = samples(exposition.everything())
    for index, _source in enumerate(sources):
        node = f"node-{index:04d}"
        for gpu in state.find(node).gpus.values():  # type: ignore[union-attr]
            s, labels = gpu.sample, {"node": node, "gpu": str(gpu.inventory.index)}
            assert s is not None
            assert (
                value(parsed, "gpufleet_gpu_utilization_ratio", **labels) == s.gpu_utilization_percent / 100
            )
            assert value(parsed, "gpufleet_gpu_power_watts", **labels) == s.power_draw_milliwatts / 1000
            assert value(parsed, "gpufleet_gpu_memory_used_bytes", **labels) == s.memory_used_bytes
            assert value(parsed, "gpufleet_gpu_temperature_celsius", **labels) == s.gpu_temperature_celsius
            assert value(parsed, "gpufleet_gpu_sm_clock_hertz", **labels) == s.sm_clock_mhz * 1e6
            assert value(parsed, "gpufleet_gpu_energy_joules_total", **labels) == s.energy_millijoules / 1000
            assert (
                value(
                    parsed,
                    "gpufleet_gpu_info",
                    **labels,
                    uuid=gpu.inventory.uuid,
                    serial=gpu.inventory.serial,
                    model="NVIDIA H100 80GB HBM3",
                )
                == 1
            )
            assert value(parsed, "gpufleet_gpu_health", **labels, state="healthy") == 1
            assert value(parsed, "gpufleet_gpu_up", **labels) == 1
    assert sum(s.value for s in parsed if s.name == "gpufleet_fleet_gpus") == 32
    assert not check_metrics(exposition.everything())


def test_absent_values_are_absent_not_zero() -> None:
    state, _ = simulated_fleet(1)
    parsed = samples(Exposition(state).everything())
    assert not [s for s in parsed if s.name == "gpufleet_gpu_fan_speed_ratio"]  # SXM: no fan


def test_hostile_label_values_are_escaped_and_parse_back() -> None:
    state = FleetState()
    evil = 'rack "7"\\new\nline ünïcödé'
    add_node(state, SimulatedSource("H100", 2, seed=1), 0, hostname=evil, cluster='c"1\\')
    body = Exposition(state).everything()
    parsed = samples(body)
    assert value(parsed, "gpufleet_gpu_up", node=evil, gpu="0") == 1
    assert value(parsed, "gpufleet_node_info", node=evil, cluster='c"1\\') == 1
    assert not check_metrics(body)
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_a_silent_node_keeps_its_gpus_listed_as_unreachable() -> None:
    now = [0.0]
    state = FleetState(clock=lambda: now[0])
    add_node(state, SimulatedSource("H100", 8, seed=0), 0)
    exposition = Exposition(state)
    now[0] = 10 * 11  # eleven 10 s intervals later
    state.sweep()
    parsed = samples(exposition.everything())
    assert value(parsed, "gpufleet_node_state", node="node-0000", state="down") == 1
    assert value(parsed, "gpufleet_gpu_health", node="node-0000", gpu="3", state="unreachable") == 1
    assert value(parsed, "gpufleet_gpu_up", node="node-0000", gpu="3") == 0
    assert value(parsed, "gpufleet_gpu_info", node="node-0000", gpu="3") == 1
    assert not [s for s in parsed if s.name == "gpufleet_gpu_utilization_ratio"]  # no stale values


def test_only_changed_nodes_are_rendered_again() -> None:
    state, sources = simulated_fleet(10)
    exposition = Exposition(state)
    assert exposition.refresh() == 10
    assert exposition.refresh() == 0
    add_node(state, sources[3], 3)
    assert exposition.refresh() == 1


def test_shards_partition_the_node_series() -> None:
    state, _ = simulated_fleet(30)
    exposition = Exposition(state)
    whole = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in samples(exposition.nodes())}
    parts: set[tuple[object, ...]] = set()
    for shard in range(4):
        body = exposition.nodes(shard, 4)
        shard_samples = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in samples(body)}
        assert not parts & shard_samples
        parts |= shard_samples
        assert not check_metrics(body)
    assert parts == whole
    assert {shard_of(n.node_id, 4) for n in state.nodes()} == {0, 1, 2, 3}


def test_xids_are_counted_per_code() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, seed=0)
    source.inject_xid(2, 79)
    source.inject_xid(2, 13)
    add_node(state, source, 0)
    source.inject_xid(2, 79)
    add_node(state, source, 0)
    parsed = samples(Exposition(state).everything())
    assert value(parsed, "gpufleet_gpu_xid_errors_total", node="node-0000", gpu="2", xid="79") == 2
    assert value(parsed, "gpufleet_gpu_xid_errors_total", node="node-0000", gpu="2", xid="13") == 1
    assert value(parsed, "gpufleet_gpu_health", node="node-0000", gpu="2", state="unhealthy") == 1
    assert value(parsed, "gpufleet_gpu_health", node="node-0000", gpu="1", state="healthy") == 1


def test_gzip_round_trip() -> None:
    state, _ = simulated_fleet(3)
    body = Exposition(state).everything()
    assert gzip.decompress(gzip.compress(body)) == body


def test_every_metric_is_documented() -> None:
    from collector.exposition import FAMILIES
    from tests.conftest import ROOT

    documented = (ROOT / "docs" / "metrics.md").read_text()
    names = [f.name for f in FAMILIES] + [s.name for s in samples(Exposition(simulated_fleet(1)[0]).fleet())]
    missing = sorted({name for name in names if f"`{name}`" not in documented})
    assert not missing, f"add to docs/metrics.md: {missing}"
