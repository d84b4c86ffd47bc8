"""The dcgm-exporter compatible view: DCGM names, units and labels; dashboard 12239 on real Prometheus."""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpufleet.agent.sources.models import MIB
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector import dcgm
from gpufleet.collector.exposition import shard_of
from gpufleet.collector.state import FleetState, NodeRecord
from gpufleet.v1 import ingest_pb2, telemetry_pb2
from tests.conftest import ROOT, Processes, wait_until
from tests.fleet import add_node, dcgm_view, simulated_fleet
from tests.prometheus_server import prometheus
from tests.promtool import check_metrics

LABEL_ORDER = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"]


def samples(body: bytes) -> list[Sample]:
    """The samples under the names served (prometheus_client's parser adds _total to counters)."""
    return [
        s._replace(name=s.name.removesuffix("_total")) if family.type == "counter" else s
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    ]


def by_gpu(parsed: list[Sample]) -> dict[tuple[str, str, str], Sample]:
    """(name, Hostname, gpu) -> sample; fails on duplicates."""
    table: dict[tuple[str, str, str], Sample] = {}
    for s in parsed:
        key = (s.name, s.labels["Hostname"], s.labels["gpu"])
        assert key not in table, f"duplicate series {key}"
        table[key] = s
    return table


def expected_values(sample: telemetry_pb2.GpuSample) -> dict[str, float]:
    """What dcgm-exporter would report for this NVML sample, in its units."""
    return {
        "DCGM_FI_DEV_SM_CLOCK": sample.sm_clock_mhz,
        "DCGM_FI_DEV_MEM_CLOCK": sample.memory_clock_mhz,
        "DCGM_FI_DEV_GPU_TEMP": sample.gpu_temperature_celsius,
        "DCGM_FI_DEV_MEMORY_TEMP": sample.memory_temperature_celsius,
        "DCGM_FI_DEV_POWER_USAGE": sample.power_draw_milliwatts / 1000,
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": sample.energy_millijoules,
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": sample.pcie_replay_count,
        "DCGM_FI_DEV_GPU_UTIL": sample.gpu_utilization_percent,
        "DCGM_FI_DEV_MEM_COPY_UTIL": sample.memory_copy_utilization_percent,
        "DCGM_FI_DEV_ENC_UTIL": sample.encoder_utilization_percent,
        "DCGM_FI_DEV_DEC_UTIL": sample.decoder_utilization_percent,
        "DCGM_FI_DEV_FB_USED": sample.memory_used_bytes // MIB,
        "DCGM_FI_DEV_FB_FREE": sample.memory_free_bytes // MIB,
        "DCGM_FI_DEV_FB_RESERVED": sample.memory_reserved_bytes // MIB,
        "DCGM_FI_DEV_POWER_VIOLATION": sample.throttle_power_cap_nanoseconds,
        "DCGM_FI_DEV_THERMAL_VIOLATION": sample.throttle_sw_thermal_nanoseconds
        + sample.throttle_hw_thermal_nanoseconds,
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": sample.ecc_uncorrected_volatile,
        "DCGM_FI_DEV_ROW_REMAP_FAILURE": int(sample.row_remap_failure),
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": sample.remapped_rows_uncorrectable,
        "DCGM_FI_DEV_XID_ERRORS": 0,
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": sample.graphics_active_ppm / 1e6,
        "DCGM_FI_PROF_SM_ACTIVE": sample.sm_active_ppm / 1e6,
        "DCGM_FI_PROF_SM_OCCUPANCY": sample.sm_occupancy_ppm / 1e6,
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": sample.tensor_active_ppm / 1e6,
        "DCGM_FI_PROF_DRAM_ACTIVE": sample.dram_active_ppm / 1e6,
        "DCGM_FI_PROF_PIPE_FP16_ACTIVE": sample.fp16_active_ppm / 1e6,
        "DCGM_FI_PROF_PCIE_TX_BYTES": sample.pcie_tx_bytes_per_second,
        "DCGM_FI_PROF_NVLINK_RX_BYTES": sample.nvlink_rx_bytes_per_second,
    }


def test_every_gpu_value_in_dcgm_exporter_names_and_units() -> None:
    state, _ = simulated_fleet(3)
    table = by_gpu(samples(dcgm_view(state).render()))
    for node in state.nodes():
        for index, gpu in node.gpus.items():
            assert gpu.sample is not None
            for name, value in expected_values(gpu.sample).items():
                assert table[(name, node.name, str(index))].value == value, name
            labels = table[("DCGM_FI_DEV_GPU_UTIL", node.name, str(index))].labels
            assert labels == {
                "gpu": str(index),
                "UUID": gpu.inventory.uuid,
                "pci_bus_id": gpu.inventory.pci_bus_id,
                "device": f"nvidia{index}",
                "modelName": "NVIDIA H100 80GB HBM3",
                "Hostname": node.name,
                "DCGM_FI_DRIVER_VERSION": node.inventory.driver_version,
            }
    # Every family the view knows is served (SXM boards report every field used here).
    assert {s.name for s in table.values()} == set(dcgm.NAMES)


def test_labels_come_in_dcgm_exporters_order_and_types_match() -> None:
    state, _ = simulated_fleet(1)
    body = dcgm_view(state).render().decode()
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        names = re.findall(r'([A-Za-z_]+)="', line)
        assert names[: len(LABEL_ORDER)] == LABEL_ORDER, line
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.MULTILINE))
    assert types["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == "counter"
    assert types["DCGM_FI_DEV_GPU_UTIL"] == "gauge"
    assert types["DCGM_FI_DEV_XID_ERRORS"] == "gauge"


def test_the_last_xid_with_its_code_and_meaning() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, seed=0)
    source.inject_xid(2, 79)
    add_node(state, source, 0)
    table = by_gpu(samples(dcgm_view(state).render()))
    assert table[("DCGM_FI_DEV_XID_ERRORS", "node-0000", "2")].value == 79
    assert table[("DCGM_FI_DEV_XID_ERRORS", "node-0000", "2")].labels["err_msg"] == "GPU fell off the bus"
    source.inject_xid(2, 13)
    add_node(state, source, 0)
    add_node(state, source, 0)  # a later report without XIDs keeps the last one, as DCGM does
    table = by_gpu(samples(dcgm_view(state).render()))
    xid = table[("DCGM_FI_DEV_XID_ERRORS", "node-0000", "2")]
    assert xid.value == 13
    assert xid.labels["err_code"] == "13"
    assert xid.labels["err_msg"] == "graphics engine exception"
    untouched = table[("DCGM_FI_DEV_XID_ERRORS", "node-0000", "1")]
    assert untouched.value == 0 and untouched.labels["err_code"] == "0" and "err_msg" not in untouched.labels


def test_xids_from_before_the_first_scrape_are_kept() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, seed=0)
    source.inject_xid(5, 48)
    add_node(state, source, 0)
    add_node(state, source, 0)
    table = by_gpu(samples(dcgm_view(state).render()))
    assert table[("DCGM_FI_DEV_XID_ERRORS", "node-0000", "5")].value == 48


def lose_gpu(node: NodeRecord, index: int) -> ingest_pb2.Report:
    gpus = [gpu.sample for gpu in node.gpus.values() if gpu.sample is not None]
    gpus[index] = telemetry_pb2.GpuSample(index=index, read_status=telemetry_pb2.GPU_READ_STATUS_LOST)
    return ingest_pb2.Report(sequence=node.last_sequence + 1, time_unix_nano=1, gpus=gpus)


def test_nothing_stale_a_lost_gpu_keeps_only_its_xid_a_silent_node_nothing() -> None:
    now = [0.0]
    state = FleetState(clock=lambda: now[0])
    source = SimulatedSource("H100", 8, seed=0)
    source.inject_xid(3, 79)
    node = add_node(state, source, 0)
    state.apply_report(node, lose_gpu(node, 3))
    parsed = samples(dcgm_view(state).render())
    lost = [s for s in parsed if s.labels["gpu"] == "3"]
    assert [(s.name, s.value) for s in lost] == [("DCGM_FI_DEV_XID_ERRORS", 79)]
    assert len([s for s in parsed if s.name == "DCGM_FI_DEV_GPU_UTIL"]) == 7
    now[0] = 10 * 11  # eleven 10 s intervals later: down
    state.sweep()
    assert dcgm_view(state).render() == b""


def test_hostile_label_values_are_escaped_and_promtool_parses_the_view() -> None:
    state = FleetState()
    evil = 'rack "7"\\new\nline'
    add_node(state, SimulatedSource("H100", 2, seed=1), 0, hostname=evil)
    body = dcgm_view(state).render()
    assert {s.labels["Hostname"] for s in samples(body)} == {evil}
    # promtool parses the text; its only findings are about DCGM's own naming, kept on purpose.
    dcgm_naming = re.compile(
        r"^DCGM_FI_\w+ (counter metrics should have \"_total\" suffix"
        r"|label names should be written in 'snake_case' not 'camelCase'"
        r"|metric name should not include type 'counter')$"
    )
    findings = check_metrics(body).splitlines()
    assert findings and all(dcgm_naming.match(line) for line in findings), findings


def test_10000_gpus_render_fast_and_only_changed_nodes_again() -> None:
    state, sources = simulated_fleet(1250)
    started = time.perf_counter()
    body = dcgm_view(state).render()
    full_s = time.perf_counter() - started
    assert body.count(b"\nDCGM_FI_DEV_GPU_UTIL{") == 10_000
    assert dcgm_view(state).render() is body  # nothing changed: the same bytes
    sources[7].inject_xid(4, 74)
    add_node(state, sources[7], 7, cluster="c1")
    started = time.perf_counter()
    again = dcgm_view(state).render()
    one_node_s = time.perf_counter() - started
    assert b'Hostname="node-0007",DCGM_FI_DRIVER_VERSION="565.57.01",err_code="74"' in again
    # About 0.5 s and 0.05 s on a 2-core machine (GPM fields included); generous bounds for slow CI.
    assert full_s < 3.0 and one_node_s < full_s, (full_s, one_node_s)


def test_every_dcgm_name_is_documented() -> None:
    documented = (ROOT / "docs" / "deploy.md").read_text()
    missing = [name for name in dcgm.NAMES if f"`{name}`" not in documented]
    assert not missing, f"add to docs/deploy.md: {missing}"


# -- Grafana dashboard 12239 against a real Prometheus scraping /metrics/dcgm -------------------

NODES = 6
SEED = 5
# Dashboard 12239's panel queries, as it ships them.
DASHBOARD_12239 = [
    'DCGM_FI_DEV_GPU_TEMP{instance=~"$instance", gpu=~"$gpu"}',
    'avg(DCGM_FI_DEV_GPU_TEMP{instance=~"$instance", gpu=~"$gpu"})',
    'DCGM_FI_DEV_POWER_USAGE{instance=~"$instance", gpu=~"$gpu"}',
    'sum(DCGM_FI_DEV_POWER_USAGE{instance=~"$instance", gpu=~"$gpu"})',
    'DCGM_FI_DEV_SM_CLOCK{instance=~"$instance", gpu=~"$gpu"} * 1000000',
    'DCGM_FI_DEV_GPU_UTIL{instance=~"$instance", gpu=~"$gpu"}',
    'DCGM_FI_DEV_FB_USED{instance=~"$instance", gpu=~"$gpu"}',
    # Tensor core utilization: NVML's GPM on Hopper and later (dcgm-exporter needs DCGM's profiling).
    'DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{instance=~"$instance", gpu=~"$gpu"}',
]


def test_dashboard_12239_queries_return_the_simulated_values(processes: Processes, tmp_path: Path) -> None:
    _, target, base = processes.collector()
    processes.start(
        "gpufleet.agent.main",
        *("--source", "sim", "--nodes", str(NODES), "--seed", str(SEED), "--interval", "3600"),
        *("--collector", target),
    )
    instance = base.removeprefix("http://")
    scrape = (
        "  - job_name: gpufleet-dcgm\n    metrics_path: /metrics/dcgm\n"
        f"    static_configs:\n      - targets: ['{instance}']\n"
    )
    expected = {}
    for index in range(NODES):
        source = SimulatedSource("H100", 8, seed=SEED, node_index=index, interval_s=3600)
        for sample in source.sample(with_processes=True):
            expected[(f"sim-node-{index:05d}", str(sample.index))] = expected_values(sample)
    with prometheus(tmp_path, scrape) as server:
        wait_until(
            lambda: server.scalar("count(DCGM_FI_DEV_GPU_TEMP)") == NODES * 8,
            timeout=60,
            what="Prometheus to see every GPU in the dcgm view",
        )
        # The dashboard's variables: label_values(DCGM_FI_DEV_GPU_TEMP, instance) and (..., gpu).
        instances = {r["metric"]["instance"] for r in server.query("DCGM_FI_DEV_GPU_TEMP")}
        gpus = sorted({r["metric"]["gpu"] for r in server.query("DCGM_FI_DEV_GPU_TEMP")}, key=int)
        assert instances == {instance} and gpus == [str(i) for i in range(8)]
        variables = {"$instance": f"({instance})", "$gpu": "(" + "|".join(gpus) + ")"}

        def expand(query: str) -> str:
            for name, value in variables.items():
                query = query.replace(name, value)
            return query

        results = {query: server.query(expand(query)) for query in DASHBOARD_12239}
        assert all(results.values()), [q for q, r in results.items() if not r]

        def per_gpu(query: str) -> dict[tuple[str, str], float]:
            return {
                (r["metric"]["Hostname"], r["metric"]["gpu"]): float(r["value"][1]) for r in results[query]
            }

        temperature = per_gpu(DASHBOARD_12239[0])
        power = per_gpu(DASHBOARD_12239[2])
        sm_clock_hz = per_gpu(DASHBOARD_12239[4])
        utilization = per_gpu(DASHBOARD_12239[5])
        fb_used = per_gpu(DASHBOARD_12239[6])
        tensor = per_gpu(DASHBOARD_12239[7])
        assert set(temperature) == set(expected)
        for key, values in expected.items():
            assert temperature[key] == values["DCGM_FI_DEV_GPU_TEMP"]
            assert power[key] == values["DCGM_FI_DEV_POWER_USAGE"]
            assert sm_clock_hz[key] == values["DCGM_FI_DEV_SM_CLOCK"] * 1_000_000
            assert utilization[key] == values["DCGM_FI_DEV_GPU_UTIL"]
            assert fb_used[key] == values["DCGM_FI_DEV_FB_USED"]
            assert tensor[key] == values["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"]
        total_power = float(results[DASHBOARD_12239[3]][0]["value"][1])
        assert abs(total_power - sum(v["DCGM_FI_DEV_POWER_USAGE"] for v in expected.values())) < 1e-6
        # A common dcgm-exporter alert works too: no GPU has had an XID.
        assert server.scalar("count(DCGM_FI_DEV_XID_ERRORS == 0)") == NODES * 8


def test_dcgm_shards_add_up_to_the_whole_and_gzip_decodes_to_the_same() -> None:
    """The dcgm view is served through the same shard views as /metrics/nodes."""
    state, sources = simulated_fleet(12)
    view = dcgm_view(state)
    whole = sorted(line for line in view.render().decode().splitlines() if not line.startswith("#"))
    shards = [view.body(shard, 4) for shard in range(4)]
    parts = sorted(
        line for body in shards for line in bytes(body).decode().splitlines() if not line.startswith("#")
    )
    assert parts == whole and whole
    assert gzip.decompress(b"".join(shards[0].gzip_chunks())) == bytes(shards[0])
    assert view.body(0, 4) is shards[0]  # nothing changed: the same body, its gzip members kept
    changed = state.find("node-0000")
    assert changed is not None
    state.apply_report(
        changed,
        ingest_pb2.Report(sequence=changed.last_sequence + 1, gpus=sources[0].sample(with_processes=False)),
    )
    fresh = [view.body(shard, 4) for shard in range(4)]
    changed_shards = [shard for shard in range(4) if fresh[shard] is not shards[shard]]
    assert changed_shards == [shard_of(changed.node_id, 4)]  # only the shard of the node that changed


def test_holders_get_dcgm_exporters_pod_and_hpc_job_labels() -> None:
    state = FleetState()
    node = add_node(state, SimulatedSource("H100", 2, seed=0), 0)
    allocations = ingest_pb2.Report(sequence=node.last_sequence + 1, time_unix_nano=1).allocations
    allocations.allocations.add(
        gpu_index=0, source="kubernetes", namespace="ml", pod="train-0", container="main"
    )
    allocations.allocations.add(gpu_index=1, source="slurm", job="4242", user="ana")
    allocations.allocations.add(gpu_index=1, source="slurm", job="4243", user="bo")
    node.set_allocations(allocations)
    state.sinks.node_changed(node)
    parsed = [s for s in samples(dcgm_view(state).render()) if s.name == "DCGM_FI_DEV_GPU_TEMP"]
    held = {
        (s.labels["gpu"], s.labels.get("pod"), s.labels.get("namespace"), s.labels.get("hpc_job"))
        for s in parsed
    }
    # A GPU two jobs share has one copy of each series per job, as dcgm-exporter serves it.
    assert held == {("0", "train-0", "ml", None), ("1", None, None, "4242"), ("1", None, None, "4243")}
    container = next(s for s in parsed if s.labels["gpu"] == "0").labels["container"]
    assert container == "main"


def test_mig_instances_have_their_own_profiling_and_framebuffer_series() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 1, seed=0)
    node = add_node(state, source, 0)
    gpu = node.gpus[0]
    gpu.inventory.mig_instances.add(
        index=0, uuid="MIG-a", gpu_instance_id=1, compute_instance_id=0, profile="3g.40gb"
    )
    gpu.inventory.mig_instances.add(
        index=1, uuid="MIG-b", gpu_instance_id=2, compute_instance_id=0, profile="1g.10gb"
    )
    assert gpu.sample is not None
    gpu.sample.mig_instances.add(gpu_instance_id=1, memory_used_bytes=3 * MIB, sm_active_ppm=500_000)
    gpu.sample.mig_instances.add(gpu_instance_id=2, memory_used_bytes=MIB, tensor_active_ppm=250_000)
    allocations = ingest_pb2.Report().allocations
    allocations.allocations.add(gpu_index=0, gpu_instance_id=2, namespace="inf", pod="serve-1", container="c")
    node.set_allocations(allocations)
    state.sinks.node_changed(node)
    parsed = samples(dcgm_view(state).render())
    mig = {(s.name, s.labels["GPU_I_ID"]): s for s in parsed if "GPU_I_ID" in s.labels}
    assert mig[("DCGM_FI_PROF_SM_ACTIVE", "1")].value == 0.5
    assert mig[("DCGM_FI_PROF_SM_ACTIVE", "1")].labels["GPU_I_PROFILE"] == "3g.40gb"
    assert mig[("DCGM_FI_DEV_FB_USED", "1")].value == 3
    assert mig[("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "2")].value == 0.25
    assert mig[("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "2")].labels["pod"] == "serve-1"
    assert "pod" not in mig[("DCGM_FI_DEV_FB_USED", "1")].labels
    # Device-wide fields stay on the GPU itself, once.
    assert not any(s.name == "DCGM_FI_DEV_GPU_TEMP" and "GPU_I_ID" in s.labels for s in parsed)
