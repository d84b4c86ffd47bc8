"""The Prometheus exposition: values equal the samples, labels escaped, promtool clean."""

from __future__ import annotations

import gzip
import zlib

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.exposition import Body, Exposition, escape_label_value, shard_of
from gpufleet.collector.state import FleetState
from gpufleet.v1 import ingest_pb2, telemetry_pb2
from tests.fleet import add_node, exposition_of, simulated_fleet
from tests.promtool import check_metrics


def samples(body: bytes | Body) -> list[Sample]:
    return [s for family in text_string_to_metric_families(bytes(body).decode()) for s in family.samples]


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
    exposition = exposition_of(state)
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
    assert not check_metrics(bytes(exposition.everything()))


def test_absent_values_are_absent_not_zero() -> None:
    state, _ = simulated_fleet(1)
    parsed = samples(exposition_of(state).everything())
    assert not [s for s in parsed if s.name == "gpufleet_gpu_fan_speed_ratio"]  # SXM: no fan


def test_hostile_label_values_are_escaped_and_parse_back() -> None:
    state = FleetState()
    evil = 'rack "7"\\new\nline ünïcödé'
    add_node(state, SimulatedSource("H100", 2, seed=1), 0, hostname=evil, cluster='c"1\\')
    body = bytes(exposition_of(state).everything())
    parsed = samples(body)
    assert value(parsed, "gpufleet_gpu_up", node=evil, gpu="0") == 1
    assert value(parsed, "gpufleet_node_info", node=evil, cluster='c"1\\') == 1
    assert not check_metrics(body)
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_a_silent_node_keeps_its_gpus_listed_as_unreachable() -> None:
    now = [0.0]
    state = FleetState(clock=lambda: now[0])
    add_node(state, SimulatedSource("H100", 8, seed=0), 0)
    exposition = exposition_of(state)
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
    exposition = exposition_of(state)
    assert exposition.refresh() == 10
    assert exposition.refresh() == 0
    add_node(state, sources[3], 3)
    assert exposition.refresh() == 1


def lines(body: bytes | Body) -> list[bytes]:
    return sorted(bytes(body).splitlines())


def sample_lines(body: bytes | Body) -> list[bytes]:
    return [line for line in lines(body) if not line.startswith(b"#")]


def test_shards_together_equal_the_whole_exposition() -> None:
    state, sources = simulated_fleet(30)
    exposition = exposition_of(state)
    for round_ in range(2):
        whole = sample_lines(exposition.nodes())
        assert sample_lines(exposition.everything())[: len(whole)] != []
        for shards in (2, 3, 7):
            parts: list[bytes] = []
            for shard in range(shards):
                body = exposition.nodes(shard, shards)
                parts += sample_lines(body)
                assert not check_metrics(bytes(body)), (shard, shards)
            assert sorted(parts) == whole
        assert {shard_of(n.node_id, 4) for n in state.nodes()} == {0, 1, 2, 3}
        # Change some nodes, add one, and check the cached shards again.
        for index in range(0, 30, 4 + round_):
            add_node(state, sources[index], index)
        add_node(state, SimulatedSource("H100", 4, seed=9), 100 + round_)


def test_cached_shards_follow_every_change() -> None:
    """Views kept between scrapes equal a fresh rendering after each kind of change."""
    now = [0.0]
    state = FleetState(clock=lambda: now[0])
    sources = [SimulatedSource("H100", 8, seed=3, node_index=i) for i in range(12)]
    for index, source in enumerate(sources):
        add_node(state, source, index)
    kept = exposition_of(state)
    views = [(0, 1), (0, 3), (1, 3), (2, 3), (1, 5)]
    for shard, shards in views:
        kept.nodes(shard, shards)
    kept.everything()

    def check() -> None:
        fresh = exposition_of(state)
        for shard, shards in views:
            assert lines(kept.nodes(shard, shards)) == lines(fresh.nodes(shard, shards)), (shard, shards)
        assert lines(kept.fleet()) == lines(fresh.fleet())
        assert lines(kept.everything()) == lines(fresh.everything())

    add_node(state, sources[2], 2)  # new values
    check()
    sources[5].inject_xid(1, 79)  # an XID: health and the XID counter change
    add_node(state, sources[5], 5)
    check()
    add_node(state, SimulatedSource("A100", 4, seed=4), 40)  # a new node joins existing views
    check()
    now[0] = 35.0  # every node misses three intervals: stale
    state.sweep()
    check()
    add_node(state, sources[7], 7)  # one comes back
    check()


def test_many_views_are_evicted_and_rebuilt() -> None:
    state, _ = simulated_fleet(5)
    exposition = exposition_of(state)
    whole = sample_lines(exposition.nodes())
    for _ in range(2):
        parts: list[bytes] = []
        for shards in range(1, 15):
            for shard in range(shards):
                body = exposition.nodes(shard, shards)
                if shards == 13:
                    parts += sample_lines(body)
        assert sorted(parts) == whole
    assert len(exposition._views) <= Exposition.MAX_VIEWS


def gzip_members(data: bytes) -> int:
    """How many gzip members follow each other in ``data``."""
    members = 0
    while data:
        decompressor = zlib.decompressobj(31)
        decompressor.decompress(data)
        assert decompressor.eof
        data = decompressor.unused_data
        members += 1
    return members


def test_gzip_form_decodes_to_the_same_text() -> None:
    state, sources = simulated_fleet(20)
    exposition = exposition_of(state)
    for _ in range(3):
        for body in (exposition.everything(), exposition.nodes(), exposition.nodes(1, 3)):
            compressed = body.gzip()
            assert gzip.decompress(compressed) == bytes(body)
            assert gzip_members(compressed) > 1
            assert b"".join(body.chunks()) == bytes(body)
            assert len(body) == len(bytes(body))
        for index in range(0, 20, 3):
            add_node(state, sources[index], index)
    empty = exposition_of(FleetState()).nodes()
    assert bytes(empty) == b""
    assert gzip.decompress(empty.gzip()) == b""


def test_values_are_exact_in_base_units() -> None:
    """Scaled integers are written with a decimal exponent and parse to the exact quotient."""
    state = FleetState()
    source = SimulatedSource("H100", 1, seed=2)
    node = add_node(state, source, 0)
    sample = node.gpus[0].sample
    assert sample is not None
    sample.power_draw_milliwatts = 612_345
    sample.gpu_utilization_percent = 7
    sample.throttle_power_cap_nanoseconds = 1_234_567_891
    sample.sm_clock_mhz = 1980
    parsed = samples(exposition_of(state).everything())
    labels = {"node": "node-0000", "gpu": "0"}
    assert value(parsed, "gpufleet_gpu_power_watts", **labels) == 612.345
    assert value(parsed, "gpufleet_gpu_utilization_ratio", **labels) == 0.07
    assert value(parsed, "gpufleet_gpu_throttle_seconds_total", **labels, reason="power_cap") == 1.234567891
    assert value(parsed, "gpufleet_gpu_sm_clock_hertz", **labels) == 1_980_000_000


def test_odd_label_values_and_shapes_render_like_a_plain_renderer() -> None:
    """Per cent signs, NUL bytes, fields absent on some GPUs, a lost GPU: every value where it belongs."""
    state = FleetState()
    add_node(state, SimulatedSource("H100", 3, seed=5), 0, hostname="50% \x00 node")
    source = SimulatedSource("H100", 4, seed=6)
    node = add_node(state, source, 1, hostname="plain")
    exposition = exposition_of(state)
    samples(exposition.everything())
    gpus = source.sample(with_processes=False)
    gpus[1].ClearField("power_draw_milliwatts")
    gpus[2].ClearField("gpu_utilization_percent")
    gpus[3].Clear()
    gpus[3].index = 3
    gpus[3].read_status = telemetry_pb2.GPU_READ_STATUS_LOST
    state.apply_report(node, ingest_pb2.Report(sequence=node.last_sequence + 1, gpus=gpus))
    parsed = samples(exposition.everything())
    odd = "50% \x00 node"
    assert value(parsed, "gpufleet_gpu_up", node=odd, gpu="2") == 1
    assert value(parsed, "gpufleet_node_gpus", node=odd) == 3
    assert (
        value(parsed, "gpufleet_gpu_power_watts", node="plain", gpu="0")
        == gpus[0].power_draw_milliwatts / 1000
    )
    assert not [
        s
        for s in parsed
        if s.name == "gpufleet_gpu_power_watts" and s.labels == {"node": "plain", "gpu": "1"}
    ]
    assert value(parsed, "gpufleet_gpu_utilization_ratio", node="plain", gpu="1") == (
        gpus[1].gpu_utilization_percent / 100
    )
    assert not [
        s
        for s in parsed
        if s.name == "gpufleet_gpu_utilization_ratio" and s.labels == {"node": "plain", "gpu": "2"}
    ]
    assert value(parsed, "gpufleet_gpu_up", node="plain", gpu="3") == 0
    assert value(parsed, "gpufleet_gpu_health", node="plain", gpu="3", state="lost") == 1
    assert not [
        s for s in parsed if s.labels == {"node": "plain", "gpu": "3"} and s.name.endswith("_celsius")
    ]
    reporting = [
        gpu.sample
        for node in state.nodes()
        for gpu in node.gpus.values()
        if gpu.sample is not None and gpu.sample.read_status == telemetry_pb2.GPU_READ_STATUS_OK
    ]
    assert value(parsed, "gpufleet_fleet_power_watts", cluster="c1") == pytest.approx(
        sum(s.power_draw_milliwatts for s in reporting) / 1000
    )
    assert not check_metrics(bytes(exposition.everything()).replace(b"\x00", b"NUL"))


def test_a_gpu_gone_from_the_inventory_stops_exporting_gauges() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, seed=0)
    node = add_node(state, source, 0)
    exposition = exposition_of(state)
    exposition.everything()
    inventory = node.inventory.__deepcopy__()
    del inventory.gpus[7]
    report = ingest_pb2.Report(sequence=node.last_sequence + 1, inventory=inventory)
    report.gpus.extend(source.sample(with_processes=False)[:7])
    state.apply_report(node, report)
    parsed = samples(exposition.everything())
    assert value(parsed, "gpufleet_gpu_up", node="node-0000", gpu="7") == 0
    assert value(parsed, "gpufleet_gpu_health", node="node-0000", gpu="7", state="lost") == 1
    assert not [s for s in parsed if s.name == "gpufleet_gpu_power_watts" and s.labels["gpu"] == "7"]
    assert value(parsed, "gpufleet_gpu_up", node="node-0000", gpu="6") == 1


def test_xids_are_counted_per_code() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, seed=0)
    source.inject_xid(2, 79)
    source.inject_xid(2, 13)
    add_node(state, source, 0)
    source.inject_xid(2, 79)
    add_node(state, source, 0)
    parsed = samples(exposition_of(state).everything())
    assert value(parsed, "gpufleet_gpu_xid_errors_total", node="node-0000", gpu="2", xid="79") == 2
    assert value(parsed, "gpufleet_gpu_xid_errors_total", node="node-0000", gpu="2", xid="13") == 1
    assert value(parsed, "gpufleet_gpu_health", node="node-0000", gpu="2", state="unhealthy") == 1
    assert value(parsed, "gpufleet_gpu_health", node="node-0000", gpu="1", state="healthy") == 1


def test_every_metric_is_documented() -> None:
    from gpufleet.collector.exposition import FAMILIES
    from tests.conftest import ROOT

    documented = (ROOT / "docs" / "metrics.md").read_text()
    from gpufleet.collector.workload import WorkloadLedger

    state = simulated_fleet(1)[0]
    fleet_view = exposition_of(state).fleet() + WorkloadLedger(state).render()
    names = [f.name for f in FAMILIES] + [s.name for s in samples(fleet_view)]
    missing = sorted({name for name in names if f"`{name}`" not in documented})
    assert not missing, f"add to docs/metrics.md: {missing}"


def test_a_family_name_is_defined_once() -> None:
    from gpufleet.collector.exposition import catalog

    with pytest.raises(ValueError, match="defined twice"):
        catalog._family("gpufleet_gpu_info", "gauge", "again")
    names = [family.name for family in catalog.FAMILIES]
    assert len(names) == len(set(names))
