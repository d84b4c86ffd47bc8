"""The NVML source against a fake pynvml: values, absent fields, lost GPUs, XID events, NVML outages."""

from __future__ import annotations

import logging
import time

import pytest

from gpufleet.agent.sources import nvml as nvml_source
from gpufleet.agent.sources.base import SourceUnavailable
from gpufleet.agent.sources.nvml import NvmlNames, NvmlSource
from gpufleet.v1 import telemetry_pb2
from tests.conftest import wait_until
from tests.fake_nvml import (
    NOT_SUPPORTED,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVMLError,
    a100_table,
    fake_node,
    h100_table,
    pynvml,
)


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


# -- NVML's names, and the fake speaking the real binding's types ---------------------------


def test_the_fake_answers_with_the_real_bindings_errors_and_structures() -> None:
    nvml = fake_node(h100_table(), h100_table())
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(handle, pynvml.c_nvmlDevice_t)
    assert type(nvml.nvmlDeviceGetMemoryInfo(handle)) is pynvml.c_nvmlMemory_t
    memory = nvml.nvmlDeviceGetMemoryInfo(handle, pynvml.nvmlMemory_v2)
    assert type(memory) is pynvml.c_nvmlMemory_v2_t and memory.reserved == 454 * 2**20
    assert type(nvml.nvmlDeviceGetUtilizationRates(handle)) is pynvml.c_nvmlUtilization_t
    assert type(nvml.nvmlDeviceGetPciInfo(handle)) is pynvml.nvmlPciInfo_t
    values = nvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_MEMORY_TEMP])
    assert isinstance(values[0], pynvml.c_nvmlFieldValue_t) and values[0].value.ullVal == 71
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetFanSpeed(handle)
    nvml.gpus[1].lost = True
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetHandleByIndex(1)
    nvml.emit_xid(0, 79)
    nvml.nvmlDeviceRegisterEvents(
        handle, pynvml.nvmlEventTypeXidCriticalError, event_set := nvml.nvmlEventSetCreate()
    )
    data = nvml.nvmlEventSetWait_v2(event_set, 1000)
    assert type(data) is pynvml.c_nvmlEventData_t and data.eventData == 79
    assert nvml.nvmlDeviceGetIndex(data.device) == 0


def test_the_sources_names_are_the_bindings_with_nvmls_numbers_for_older_bindings() -> None:
    assert NvmlNames.of(object()) == NvmlNames.of(pynvml)  # a binding without any of the names
    for table in (
        nvml_source.FIELDS,
        nvml_source.VALUE_MEMBERS,
        nvml_source.ARCHITECTURES,
        nvml_source.NVML_GONE,
    ):
        for name, number in table:
            assert getattr(pynvml, name) == number, name


def test_error_codes_and_constants_are_compared_by_the_bindings_names() -> None:
    nvml = fake_node(h100_table(), h100_table())
    # A binding whose numbers differ from NVML's: only code that uses the names still reads it right.
    nvml.renumbered = {
        "NVML_ERROR_NOT_SUPPORTED": 1003,
        "NVML_ERROR_GPU_IS_LOST": 1015,
        "NVML_CLOCK_SM": 11,
        "NVML_CLOCK_MEM": 12,
        "NVML_TEMPERATURE_GPU": 7,
        "NVML_PCIE_UTIL_TX_BYTES": 20,
        "NVML_PCIE_UTIL_RX_BYTES": 21,
    }
    source = NvmlSource(nvml, watch_xids=False)
    nvml.gpus[1].lost = True
    ok, lost = source.sample(with_processes=False)
    assert not ok.HasField("fan_speed_percent") and source.errors_total == 0  # NOT_SUPPORTED, by name
    assert (ok.sm_clock_mhz, ok.memory_clock_mhz, ok.gpu_temperature_celsius) == (1980, 2619, 64)
    assert ok.pcie_rx_bytes_per_second == 3400 * 1024
    assert lost.read_status == telemetry_pb2.GPU_READ_STATUS_LOST


def test_fields_are_read_in_one_batch_per_gpu_and_a_missing_function_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = fake_node(h100_table(), a100_table())
    nvml.raises["nvmlDeviceGetPerformanceState"] = NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    source = NvmlSource(nvml, watch_xids=False)
    source.sample(with_processes=False)
    assert nvml.calls["nvmlDeviceGetFieldValues"] == 2
    h100, _ = source.sample(with_processes=False)
    assert not h100.HasField("performance_state") and h100.read_status == telemetry_pb2.GPU_READ_STATUS_OK
    assert source.errors_total == 0
    assert len([r for r in caplog.records if "nvmlDeviceGetPerformanceState" in r.getMessage()]) == 1


# -- errors of every kind stay with one call, one GPU -------------------------------------


def test_a_gpu_lost_at_start_is_reported_lost_while_the_others_report_normally() -> None:
    nvml = fake_node(h100_table(), h100_table(), a100_table())
    nvml.gpus[1].lost = True  # GPU_IS_LOST already from nvmlDeviceGetHandleByIndex
    source = NvmlSource(nvml, watch_xids=False)
    inventory = source.inventory()
    assert [gpu.index for gpu in inventory.gpus] == [0, 1, 2]
    assert inventory.gpus[1].uuid == "" and inventory.gpus[2].architecture == "Ampere"
    samples = source.sample(with_processes=False)
    assert [s.read_status for s in samples] == [
        telemetry_pb2.GPU_READ_STATUS_OK,
        telemetry_pb2.GPU_READ_STATUS_LOST,
        telemetry_pb2.GPU_READ_STATUS_OK,
    ]
    assert "lost" in samples[1].read_error and samples[2].gpu_temperature_celsius == 24


def test_unexpected_exceptions_from_the_binding_are_contained_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = fake_node(h100_table(), a100_table())
    nvml.raises["nvmlDeviceGetPowerUsage"] = OSError("libnvidia-ml.so.1: bad call")
    nvml.raises["nvmlDeviceGetUtilizationRates"] = AttributeError("'NoneType' object has no attribute 'gpu'")
    source = NvmlSource(nvml, watch_xids=False)
    for _ in range(3):
        samples = source.sample(with_processes=False)
    assert [s.read_status for s in samples] == [telemetry_pb2.GPU_READ_STATUS_OK] * 2
    assert not samples[0].HasField("power_draw_milliwatts")
    assert samples[0].gpu_temperature_celsius == 64 and samples[1].energy_millijoules == 123_456_789
    assert source.errors_total == 3 * 2 * 2  # three samples, two GPUs, two failing functions
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in messages if "nvmlDeviceGetPowerUsage" in m and "OSError" in m]) == 1
    assert len([m for m in messages if "nvmlDeviceGetUtilizationRates" in m]) == 1


def test_handles_are_enumerated_through_the_choke_point() -> None:
    nvml = fake_node(h100_table(), h100_table())
    nvml.gpus[0].error = pynvml.NVML_ERROR_UNKNOWN  # this GPU answers nothing, its handle included
    source = NvmlSource(nvml, watch_xids=False)
    broken, fine = source.sample(with_processes=False)
    assert broken.read_status == telemetry_pb2.GPU_READ_STATUS_ERROR
    assert "nvmlDeviceGetHandleByIndex" in broken.read_error and "Unknown Error" in broken.read_error
    assert fine.read_status == telemetry_pb2.GPU_READ_STATUS_OK and source.errors_total == 1
    assert nvml.calls["nvmlInit"] == 1  # one failing GPU is not NVML failing


def test_an_odd_value_on_one_gpu_makes_only_that_gpu_an_error() -> None:
    odd = h100_table()
    odd["encoder"] = []  # no (value, period) pair
    odd["cc"] = (9,)
    source = NvmlSource(fake_node(odd, a100_table()), watch_xids=False)
    inventory = source.inventory()
    assert inventory.gpus[0].index == 0 and inventory.gpus[1].name == "NVIDIA A100-SXM4-80GB"
    first, second = source.sample(with_processes=False)
    assert first.read_status == telemetry_pb2.GPU_READ_STATUS_ERROR and "IndexError" in first.read_error
    assert second.read_status == telemetry_pb2.GPU_READ_STATUS_OK and second.power_draw_milliwatts == 59_000
    assert source.errors_total == 2


def test_an_unexpected_exception_starting_nvml_means_the_source_cannot_start() -> None:
    nvml = fake_node(h100_table())
    nvml.raises["nvmlInit"] = OSError("libnvidia-ml.so.1: cannot open shared object file")
    with pytest.raises(SourceUnavailable, match="OSError"):
        NvmlSource(nvml)


# -- GPUs added and removed while the agent runs ------------------------------------------


def test_an_added_and_a_removed_gpu_appear_in_the_next_inventory_read_and_samples() -> None:
    nvml = fake_node(h100_table(), a100_table())
    source = NvmlSource(nvml)
    try:
        assert len(source.inventory().gpus) == 2
        added = nvml.add_gpu(h100_table())
        inventory = source.inventory()
        assert [gpu.uuid for gpu in inventory.gpus][2] == added.uuid
        assert len(source.sample(with_processes=False)) == 3
        wait_until(lambda: nvml.watched(2), timeout=5, what="the added GPU watched for XIDs")
        nvml.emit_xid(2, 48)
        assert wait_for_xids(source, 2) == [48]
        nvml.remove_gpu(0)
        inventory = source.inventory()
        assert [gpu.name for gpu in inventory.gpus] == ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
        samples = source.sample(with_processes=False)
        assert [(s.index, s.read_status) for s in samples] == [
            (0, telemetry_pb2.GPU_READ_STATUS_OK),
            (1, telemetry_pb2.GPU_READ_STATUS_OK),
        ]
        assert samples[0].power_draw_milliwatts == 59_000
    finally:
        source.close()
    assert nvml.event_sets_in_use() == []


# -- NVML itself going away and coming back -----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def statuses(samples: list[telemetry_pb2.GpuSample]) -> list[tuple[int, str]]:
    return [(s.read_status, s.read_error) for s in samples]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver not loaded"),
        (
            pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
            "driver and NVML library versions differ (driver upgraded?)",
        ),
    ],
)
def test_nvml_unavailable_mid_run_is_reported_retried_with_backoff_and_resumed(
    code: int, reason: str
) -> None:
    nvml = fake_node(h100_table(), a100_table())
    clock = Clock()
    source = NvmlSource(nvml, retry_initial_s=1.0, retry_max_s=4.0, clock=clock)
    try:
        assert source.inventory().driver_version == "565.57.01"
        assert {s.read_status for s in source.sample(with_processes=False)} == {
            telemetry_pb2.GPU_READ_STATUS_OK
        }
        nvml.unload_driver(code)
        error = (telemetry_pb2.GPU_READ_STATUS_ERROR, f"NVML unavailable: {reason}; retrying")
        assert statuses(source.sample(with_processes=False)) == [error, error]
        assert source.errors_total == 1
        assert source.inventory().driver_version == "565.57.01"  # the last one, while NVML is gone
        # nvmlInit is tried again 1 s later, then 2, 4 and 4 s apart (capped), and only then.
        lost_at, attempts = clock.now, []
        for _ in range(28):
            clock.now += 0.5
            before = nvml.calls["nvmlInit"]
            assert statuses(source.sample(with_processes=False)) == [error, error]
            if nvml.calls["nvmlInit"] > before:
                attempts.append(clock.now - lost_at)
        assert attempts == [1.0, 3.0, 7.0, 11.0]
        assert source.errors_total == 1 + len(attempts)
        nvml.load_driver("570.86.10")
        clock.now += 4.0
        samples = source.sample(with_processes=False)
        assert [s.read_status for s in samples] == [telemetry_pb2.GPU_READ_STATUS_OK] * 2
        assert samples[1].power_draw_milliwatts == 59_000
        assert source.inventory_stale
        assert source.inventory().driver_version == "570.86.10"
        assert not source.inventory_stale
        wait_until(lambda: nvml.watched(1), timeout=5, what="XIDs watched in the new NVML session")
        nvml.emit_xid(1, 79)
        assert wait_for_xids(source, 1) == [79]
    finally:
        source.close()
    assert nvml.event_sets_in_use() == []


def test_every_gpu_failing_is_nvml_failing_and_it_is_started_again() -> None:
    nvml = fake_node(h100_table(), h100_table())
    clock = Clock()
    source = NvmlSource(nvml, watch_xids=False, clock=clock)
    for gpu in nvml.gpus:
        gpu.error = pynvml.NVML_ERROR_UNKNOWN
    first, second = source.sample(with_processes=False)
    assert first.read_status == second.read_status == telemetry_pb2.GPU_READ_STATUS_ERROR
    assert first.read_error.startswith("NVML unavailable: every GPU failed (")
    assert "Unknown Error" in first.read_error and first.read_error.endswith("; retrying")
    for gpu in nvml.gpus:
        gpu.error = None
    clock.now += 1.0
    assert [s.read_status for s in source.sample(with_processes=False)] == [
        telemetry_pb2.GPU_READ_STATUS_OK
    ] * 2
    assert nvml.calls["nvmlInit"] == 2 and nvml.calls["nvmlShutdown"] == 1


def wait_for_xids(source: NvmlSource, index: int) -> list[int]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for sample in source.sample(with_processes=False):
            if sample.index == index and sample.xid_events:
                return [e.code for e in sample.xid_events]
        time.sleep(0.05)
    return []
