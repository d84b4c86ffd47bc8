"""The NVML source against a fake pynvml: values, absent fields, lost GPUs, XID events."""

from __future__ import annotations

import time

import pytest

from agent.sources.base import SourceUnavailable
from agent.sources.nvml import NvmlSource
from gpufleet.v1 import telemetry_pb2
from tests.fake_nvml import NOT_SUPPORTED, NVML_ERROR_LIBRARY_NOT_FOUND, a100_table, fake_node, h100_table


def test_inventory_of_an_h100_and_an_a100() -> None:
    source = NvmlSource(fake_node(h100_table(), a100_table()), watch_xids=False)
    inventory = source.inventory()
    h100, a100 = inventory.gpus
    assert inventory.driver_version == "565.57.01"
    assert inventory.cuda_version == "12.7"
    assert (h100.name, h100.architecture, h100.compute_capability) == (
        "NVIDIA H100 80GB HBM3",
        "Hopper",
        "9.0",
    )
    assert h100.serial == "1654922001234"  # bytes from older bindings are decoded
    assert h100.pci_bus_id == "00000000:18:00.0"
    assert h100.memory_total_bytes == 81_559 * 2**20
    assert (h100.power_limit_min_milliwatts, h100.power_limit_max_milliwatts) == (200_000, 700_000)
    assert h100.nvlink_link_count == 18
    assert a100.architecture == "Ampere"
    assert a100.nvlink_link_count == 12
    assert a100.ecc_enabled and not a100.mig_enabled


def test_sample_converts_units_and_reads_fields_in_one_batch() -> None:
    source = NvmlSource(fake_node(h100_table()), watch_xids=False)
    (gpu,) = source.sample(with_processes=True)
    assert gpu.read_status == telemetry_pb2.GPU_READ_STATUS_OK
    assert gpu.gpu_utilization_percent == 97
    assert gpu.memory_copy_utilization_percent == 31
    assert gpu.memory_used_bytes == 40_000 * 2**20
    assert gpu.memory_reserved_bytes == 454 * 2**20
    assert gpu.power_draw_milliwatts == 612_345
    assert gpu.pcie_tx_bytes_per_second == 1200 * 1024
    assert gpu.energy_millijoules == 123_456_789
    assert gpu.memory_temperature_celsius == 71
    assert gpu.pcie_replay_count == 7
    assert gpu.ecc_corrected_aggregate == 2
    assert gpu.throttle_power_cap_nanoseconds == 5_000_000
    assert gpu.row_remap_pending is False and gpu.HasField("row_remap_pending")
    assert [p.pid for p in gpu.processes.processes] == [4242]


def test_not_supported_is_absent_never_zero() -> None:
    table = h100_table()
    table["temperature"] = NOT_SUPPORTED
    source = NvmlSource(fake_node(table, a100_table()), watch_xids=False)
    h100, a100 = source.sample(with_processes=False)
    assert not h100.HasField("fan_speed_percent")
    assert not h100.HasField("gpu_temperature_celsius")
    assert not a100.HasField("recovery_action")  # field 230 unsupported on the older driver
    assert a100.HasField("gpu_temperature_celsius")
    assert source.errors_total == 0  # NOT_SUPPORTED is a value, not an error


def test_processes_are_only_read_when_asked() -> None:
    source = NvmlSource(fake_node(a100_table()), watch_xids=False)
    (without,) = source.sample(with_processes=False)
    (with_,) = source.sample(with_processes=True)
    assert not without.HasField("processes")
    assert with_.HasField("processes") and len(with_.processes.processes) == 0


def test_a_lost_gpu_is_reported_lost_while_the_others_keep_reporting() -> None:
    nvml = fake_node(h100_table(), h100_table(), h100_table())
    source = NvmlSource(nvml, watch_xids=False)
    nvml.gpus[1].lost = True
    samples = source.sample(with_processes=True)
    assert [s.read_status for s in samples] == [
        telemetry_pb2.GPU_READ_STATUS_OK,
        telemetry_pb2.GPU_READ_STATUS_LOST,
        telemetry_pb2.GPU_READ_STATUS_OK,
    ]
    assert samples[1].index == 1
    assert "lost" in samples[1].read_error
    assert samples[2].gpu_utilization_percent == 97
    assert len(source.inventory().gpus) == 3


def test_xid_events_arrive_through_the_event_thread() -> None:
    nvml = fake_node(h100_table(), h100_table())
    source = NvmlSource(nvml)
    try:
        nvml.emit_xid(1, 79)
        deadline = time.monotonic() + 5
        xids: list[int] = []
        while time.monotonic() < deadline and not xids:
            samples = source.sample(with_processes=False)
            xids = [e.code for e in samples[1].xid_events]
            assert not samples[0].xid_events
            time.sleep(0.05)
        assert xids == [79]
        assert not source.sample(with_processes=False)[1].xid_events  # delivered once
    finally:
        source.close()


def test_no_nvml_on_the_host_says_what_to_do() -> None:
    nvml = fake_node(h100_table())
    nvml.init_error = NVML_ERROR_LIBRARY_NOT_FOUND
    with pytest.raises(SourceUnavailable, match="--source sim"):
        NvmlSource(nvml)
