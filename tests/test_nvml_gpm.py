"""GPM activity and MIG instances in the NVML source, against the fake pynvml's real binding structures."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Any

import pytest

from bench import agent_cost
from gpufleet.agent.sources import nvml as nvml_source
from gpufleet.agent.sources.nvml import NvmlSource
from gpufleet.v1 import telemetry_pb2
from tests.fake_nvml import (
    NOT_SUPPORTED,
    FakeMig,
    FakeNvml,
    NVMLError,
    a100_table,
    fake_node,
    h100_table,
    pynvml,
)

ACTIVITY = (
    "graphics_active_ppm",
    "sm_active_ppm",
    "sm_occupancy_ppm",
    "tensor_active_ppm",
    "dram_active_ppm",
    "fp64_active_ppm",
    "fp32_active_ppm",
    "fp16_active_ppm",
)
GPM_ONLY = (*ACTIVITY, "nvlink_tx_bytes_per_second", "nvlink_rx_bytes_per_second")
GPM_FUNCTIONS = (
    "nvmlGpmQueryDeviceSupport",
    "nvmlGpmSampleAlloc",
    "nvmlGpmSampleGet",
    "nvmlGpmMigSampleGet",
    "nvmlGpmMetricsGet",
    "nvmlGpmSampleFree",
)
MIB = 2**20


class Clock:
    """The source's clock: GPM needs 100 ms between samples, so tests move it on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def started(nvml: FakeNvml) -> tuple[NvmlSource, Clock]:
    clock = Clock()
    return NvmlSource(nvml, watch_xids=False, clock=clock), clock


def sample(
    source: NvmlSource, clock: Clock, *, with_processes: bool = False, after_s: float = 1.0
) -> list[telemetry_pb2.GpuSample]:
    clock.now += after_s
    return source.sample(with_processes=with_processes)


def present(message: Any, names: tuple[str, ...] = GPM_ONLY) -> set[str]:
    return {name for name in names if message.HasField(name)}


# -- GPM on whole GPUs -------------------------------------------------------------------


def test_gpm_activity_comes_in_parts_per_million_and_bytes_per_second_from_the_second_sample() -> None:
    table = h100_table()
    table["gpm"]["PCIE_TX_PER_SEC"] = 5.0  # MiB/s, unlike NVML's 20 ms counter (1200 KB/s)
    nvml = fake_node(table)
    source, clock = started(nvml)
    (first,) = sample(source, clock)
    assert present(first) == set()  # no previous GPM sample: absent, never 0
    assert first.pcie_tx_bytes_per_second == 1200 * 1024  # NVML's counter meanwhile
    pcie_calls = nvml.calls["nvmlDeviceGetPcieThroughput"]
    (second,) = sample(source, clock)
    assert (second.graphics_active_ppm, second.sm_active_ppm, second.sm_occupancy_ppm) == (
        970_000,
        625_000,
        312_500,
    )
    assert (second.tensor_active_ppm, second.dram_active_ppm) == (455_000, 380_000)
    assert (second.fp64_active_ppm, second.fp32_active_ppm, second.fp16_active_ppm) == (0, 120_625, 35_000)
    assert second.HasField("fp64_active_ppm")  # 0 % is a value
    assert second.pcie_tx_bytes_per_second == 5 * MIB  # GPM's, over the interval
    assert second.pcie_rx_bytes_per_second == 3400 * 1024
    assert nvml.calls["nvmlDeviceGetPcieThroughput"] == pcie_calls  # not asked while GPM reads
    assert second.nvlink_tx_bytes_per_second == 180_000 * MIB
    assert second.nvlink_rx_bytes_per_second == 175_000 * MIB + MIB // 2
    assert second.gpu_utilization_percent == 97 and second.read_status == telemetry_pb2.GPU_READ_STATUS_OK
    assert source.errors_total == 0


@pytest.mark.parametrize(
    ("percent", "ppm"),
    [(100.0, 1_000_000), (100.7, 1_000_000), (-0.5, 0), (0.00004, 0), (0.00006, 1), (33.33333, 333_333)],
)
def test_percentages_are_rounded_to_parts_per_million_within_range(percent: float, ppm: int) -> None:
    table = h100_table()
    table["gpm"]["SM_UTIL"] = percent
    source, clock = started(fake_node(table))
    sample(source, clock)
    assert sample(source, clock)[0].sm_active_ppm == ppm


@pytest.mark.parametrize("odd", [math.nan, math.inf, -math.inf])
def test_a_value_that_is_no_number_is_absent(odd: float) -> None:
    table = h100_table()
    table["gpm"]["SM_UTIL"] = odd
    table["gpm"]["NVLINK_TOTAL_TX_PER_SEC"] = odd
    source, clock = started(fake_node(table))
    sample(source, clock)
    (gpu,) = sample(source, clock)
    assert not gpu.HasField("sm_active_ppm") and not gpu.HasField("nvlink_tx_bytes_per_second")
    assert gpu.graphics_active_ppm == 970_000


def test_an_a100_has_no_gpm_activity_and_is_not_asked_again_until_enumerated() -> None:
    nvml = fake_node(a100_table(), h100_table())
    source, clock = started(nvml)
    for _ in range(3):
        a100, h100 = sample(source, clock)
    assert present(a100) == set()  # absent, never 0
    assert present(h100) == set(GPM_ONLY)
    assert nvml.calls["nvmlGpmQueryDeviceSupport"] == 2  # once per GPU, at enumeration
    assert nvml.calls["nvmlGpmSampleGet"] == 3  # the H100's only
    source.inventory()
    assert nvml.calls["nvmlGpmQueryDeviceSupport"] == 4
    assert source.errors_total == 0


def test_one_metrics_call_per_gpu_per_sample_and_two_buffers_per_gpu() -> None:
    nvml = fake_node(*[h100_table() for _ in range(4)])
    source, clock = started(nvml)
    for _ in range(5):
        sample(source, clock)
    assert nvml.calls["nvmlGpmSampleGet"] == 4 * 5
    assert nvml.calls["nvmlGpmMetricsGet"] == 4 * 4  # the first sample has no previous one
    assert nvml.calls["nvmlGpmSampleAlloc"] == 4 * 2 and nvml.gpm_samples_in_use() == 8
    source.close()
    assert nvml.gpm_samples_in_use() == 0


def test_samples_closer_than_gpm_refreshes_give_no_activity_and_keep_the_previous_one() -> None:
    nvml = fake_node(h100_table())
    source, clock = started(nvml)
    sample(source, clock)
    (soon,) = sample(source, clock, after_s=0.05)
    assert present(soon) == set() and nvml.calls["nvmlGpmSampleGet"] == 1
    (later,) = sample(source, clock, after_s=0.95)
    assert later.sm_active_ppm == 625_000 and nvml.calls["nvmlGpmMetricsGet"] == 1


def test_a_metric_failing_alone_is_absent_and_no_error() -> None:
    table = h100_table()
    table["gpm"]["SM_OCCUPANCY"] = NOT_SUPPORTED
    table["gpm"]["DRAM_BW_UTIL"] = NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    del table["gpm"]["NVLINK_TOTAL_RX_PER_SEC"]  # a metric this GPU does not know
    source, clock = started(fake_node(table))
    sample(source, clock)
    (gpu,) = sample(source, clock)
    assert present(gpu) == set(GPM_ONLY) - {
        "sm_occupancy_ppm",
        "dram_active_ppm",
        "nvlink_rx_bytes_per_second",
    }
    assert source.errors_total == 0


def test_a_failed_gpm_sample_is_counted_and_the_next_interval_starts_anew(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = fake_node(h100_table(), h100_table())
    source, clock = started(nvml)
    sample(source, clock)
    nvml.raises["nvmlGpmSampleGet"] = NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    failed = sample(source, clock)
    assert [present(gpu) for gpu in failed] == [set(), set()]
    assert [gpu.read_status for gpu in failed] == [telemetry_pb2.GPU_READ_STATUS_OK] * 2
    assert source.errors_total == 2
    del nvml.raises["nvmlGpmSampleGet"]
    assert [present(gpu) for gpu in sample(source, clock)] == [set(), set()]  # one sample, no interval
    assert [present(gpu) for gpu in sample(source, clock)] == [set(GPM_ONLY)] * 2
    assert len([r for r in caplog.records if "nvmlGpmSampleGet" in r.getMessage()]) == 1
    assert nvml.gpm_samples_in_use() == 4  # buffers reused, none leaked


def test_a_metrics_call_that_fails_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    nvml = fake_node(h100_table())
    nvml.raises["nvmlGpmMetricsGet"] = OSError("libnvidia-ml.so.1: bad call")
    source, clock = started(nvml)
    for _ in range(3):
        (gpu,) = sample(source, clock)
    assert present(gpu) == set() and gpu.power_draw_milliwatts == 612_345
    assert source.errors_total == 2
    assert len([r for r in caplog.records if "nvmlGpmMetricsGet" in r.getMessage()]) == 1


def test_gpm_missing_from_an_old_binding_is_absent_logged_once_and_telemetry_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = fake_node(h100_table(), h100_table())
    nvml.remove(*GPM_FUNCTIONS, "c_nvmlGpmMetricsGet_t")
    source, clock = started(nvml)
    source.inventory()
    for _ in range(3):
        samples = sample(source, clock)
    assert [present(gpu) for gpu in samples] == [set(), set()]
    assert [gpu.power_draw_milliwatts for gpu in samples] == [612_345] * 2
    assert source.errors_total == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("nvmlGpmSampleAlloc", "c_nvmlGpmMetricsGet_t"):
        assert len([m for m in messages if f"NVML {name} failed" in m]) == 1, name
    assert not any(nvml.calls[name] for name in GPM_FUNCTIONS)


@pytest.mark.parametrize("name", ["nvmlGpmMetricsGet", "c_nvmlGpmMetricsGet_t", "nvmlGpmQueryDeviceSupport"])
def test_a_binding_with_part_of_gpm_reports_none_of_it(name: str) -> None:
    nvml = fake_node(h100_table())
    nvml.remove(name)
    source, clock = started(nvml)
    sample(source, clock)
    (gpu,) = sample(source, clock)
    assert present(gpu) == set() and source.errors_total == 0
    assert nvml.calls["nvmlGpmSampleGet"] == 0


def test_a_library_without_gpm_functions_is_logged_once_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    nvml = fake_node(h100_table())
    nvml.raises["nvmlGpmQueryDeviceSupport"] = NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    source, clock = started(nvml)
    source.inventory()
    for _ in range(2):
        (gpu,) = sample(source, clock)
    assert present(gpu) == set() and source.errors_total == 0
    assert len([r for r in caplog.records if "nvmlGpmQueryDeviceSupport" in r.getMessage()]) == 1


def test_gpm_metric_ids_are_the_bindings_names() -> None:
    nvml = fake_node(h100_table())
    nvml.renumbered = {"NVML_GPM_METRIC_SM_UTIL": 1402, "NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC": 1403}
    source, clock = started(nvml)
    sample(source, clock)
    (gpu,) = sample(source, clock)
    assert gpu.sm_active_ppm == 625_000 and gpu.nvlink_tx_bytes_per_second == 180_000 * MIB
    for table in (nvml_source.GPM_ACTIVITY, nvml_source.GPM_THROUGHPUT):
        for name, number in table:
            assert getattr(pynvml, name) == number, name
    assert pynvml.NVML_GPM_METRICS_GET_VERSION == 1 and pynvml.NVML_DEVICE_MIG_ENABLE == 1


# -- GPM samples across enumerations and NVML sessions ------------------------------------


def test_gpm_samples_live_while_their_gpus_do_and_are_freed_with_them() -> None:
    nvml = fake_node(h100_table(), h100_table())
    source, clock = started(nvml)
    sample(source, clock)
    sample(source, clock)
    assert nvml.gpm_samples_in_use() == 4
    source.inventory()  # the same GPUs: their samples stay, no gap in the activity
    assert [present(gpu) for gpu in sample(source, clock)] == [set(GPM_ONLY)] * 2
    assert nvml.gpm_samples_in_use() == 4
    nvml.remove_gpu(0)  # the other GPU becomes GPU 0: a GPU new at that index
    source.inventory()
    assert nvml.gpm_samples_in_use() == 0 and nvml.calls["nvmlGpmSampleFree"] == 4
    (gpu,) = sample(source, clock)
    assert present(gpu) == set()  # the first sample after re-enumeration
    (gpu,) = sample(source, clock)
    assert present(gpu) == set(GPM_ONLY) and nvml.gpm_samples_in_use() == 2
    nvml.add_gpu(a100_table())
    nvml.gpus[0].table["gpm_supported"] = False  # e.g. GPM taken away by a driver change
    source.inventory()
    assert nvml.gpm_samples_in_use() == 0
    assert [present(gpu) for gpu in sample(source, clock)] == [set(), set()]
    source.close()
    assert nvml.gpm_samples_in_use() == 0 and source.errors_total == 0


def test_gpm_samples_go_with_the_nvml_session_and_start_again_after_it() -> None:
    nvml = fake_node(h100_table())
    source, clock = started(nvml)
    sample(source, clock)
    sample(source, clock)
    nvml.unload_driver()
    (gone,) = sample(source, clock)
    assert gone.read_status == telemetry_pb2.GPU_READ_STATUS_ERROR and nvml.gpm_samples_in_use() == 0
    nvml.load_driver()
    (back,) = sample(source, clock, after_s=2.0)
    assert back.read_status == telemetry_pb2.GPU_READ_STATUS_OK and present(back) == set()
    (gpu,) = sample(source, clock)
    assert present(gpu) == set(GPM_ONLY) and nvml.gpm_samples_in_use() == 2
    source.close()
    assert nvml.gpm_samples_in_use() == 0


def test_a_gpu_lost_while_sampling_gpm_is_lost_and_the_others_keep_their_activity() -> None:
    nvml = fake_node(h100_table(), h100_table())
    source, clock = started(nvml)
    sample(source, clock)
    nvml.gpus[0].lost = True
    lost, fine = sample(source, clock)
    assert lost.read_status == telemetry_pb2.GPU_READ_STATUS_LOST
    assert fine.sm_active_ppm == 625_000
    source.close()
    assert nvml.gpm_samples_in_use() == 0


# -- MIG ----------------------------------------------------------------------------------


def mig_node() -> tuple[FakeNvml, list[FakeMig], list[FakeMig]]:
    """GPU 0: an H100 as seven 1g.10gb; GPU 1: an H100 as 3g.40gb + 2g.20gb + 1g.10gb."""
    nvml = fake_node(h100_table(), h100_table())
    sevenths = nvml.set_mig(0, ["1g.10gb"] * 7)
    mixed = nvml.set_mig(1, ["3g.40gb", "2g.20gb", "1g.10gb"])
    return nvml, sevenths, mixed


def test_the_inventory_lists_each_gpus_mig_devices() -> None:
    nvml, sevenths, mixed = mig_node()
    source, _ = started(nvml)
    first, second = source.inventory().gpus
    assert first.mig_enabled and second.mig_enabled
    assert [(m.index, m.gpu_instance_id, m.compute_instance_id, m.profile) for m in first.mig_instances] == [
        (i, 7 + i, 0, "1g.10gb") for i in range(7)
    ]
    assert [m.uuid for m in first.mig_instances] == [mig.uuid for mig in sevenths]
    assert first.mig_instances[0].uuid.startswith("MIG-")
    assert first.mig_instances[0].memory_total_bytes == 9_984 * MIB
    assert [(m.profile, m.gpu_instance_id, m.memory_total_bytes) for m in second.mig_instances] == [
        ("3g.40gb", 1, 40_448 * MIB),
        ("2g.20gb", 3, 20_096 * MIB),
        ("1g.10gb", 7, 9_984 * MIB),
    ]
    assert [m.uuid for m in second.mig_instances] == [mig.uuid for mig in mixed]
    assert source.errors_total == 0


def test_a_gpu_not_in_mig_mode_lists_none_and_is_not_asked() -> None:
    nvml = fake_node(h100_table(), a100_table())
    source, _ = started(nvml)
    inventory = source.inventory()
    assert [(gpu.mig_enabled, len(gpu.mig_instances)) for gpu in inventory.gpus] == [(False, 0)] * 2
    assert nvml.calls["nvmlDeviceGetMaxMigDeviceCount"] == 0


def test_empty_mig_slots_are_skipped_without_an_error() -> None:
    nvml = fake_node(h100_table())
    nvml.set_mig(0, ["1g.10gb"] * 4)
    nvml.gpus[0].migs[1] = None  # destroyed: NOT_FOUND from that index
    source, clock = started(nvml)
    (gpu,) = source.inventory().gpus
    assert [m.index for m in gpu.mig_instances] == [0, 2, 3]
    assert nvml.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 2 * 7  # every slot, at each enumeration
    assert len(sample(source, clock)[0].mig_instances) == 3
    assert source.errors_total == 0


@pytest.mark.parametrize(
    ("attributes", "profile"),
    [
        ((1, 1, 9_984), "1g.10gb"),
        ((7, 7, 81_152), "7g.80gb"),  # 79.25 GiB: NVIDIA's names round up
        ((3, 1, 40_448), "1c.3g.40gb"),  # a compute instance of a third of its GPU instance
        ((1, 1, 4_864), "1g.5gb"),  # A100 40GB
    ],
)
def test_a_profile_not_in_the_name_comes_from_the_attributes(
    attributes: tuple[int, int, int], profile: str
) -> None:
    nvml = fake_node(h100_table())
    (mig,) = nvml.set_mig(0, ["1g.10gb"])
    mig.table["name"] = "NVIDIA H100 80GB HBM3"
    mig.table["attributes"] = attributes
    source, _ = started(nvml)
    assert source.inventory().gpus[0].mig_instances[0].profile == profile
    assert nvml.calls["nvmlDeviceGetAttributes"] == 1


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "1g.10gb"),
        ("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb", "1c.3g.20gb"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me", "1g.10gb+me"),
        ("NVIDIA H100 80GB HBM3", None),
        ("MIG device", None),
    ],
)
def test_profiles_in_mig_device_names(name: str, profile: str | None) -> None:
    assert nvml_source._profile_in_name(name) == profile


def test_each_sample_has_every_mig_device_with_memory_processes_and_its_instances_activity() -> None:
    nvml, _, mixed = mig_node()
    busy, _, small = mixed
    busy.table.update(
        memory_used=30_000 * MIB, processes=[SimpleNamespace(pid=4243, usedGpuMemory=29 * 2**30)]
    )
    busy.table["gpm"].update(SM_UTIL=88.0, ANY_TENSOR_UTIL=71.5, DRAM_BW_UTIL=NOT_SUPPORTED)
    small.table["gpm"]["SM_UTIL"] = 12.5
    source, clock = started(nvml)
    source.inventory()
    first = sample(source, clock, with_processes=True)
    assert [len(gpu.mig_instances) for gpu in first] == [7, 3]
    assert all(present(mig, ACTIVITY) == set() for gpu in first for mig in gpu.mig_instances)
    gpu0, gpu1 = sample(source, clock, with_processes=True)
    assert [(m.gpu_instance_id, m.compute_instance_id) for m in gpu1.mig_instances] == [
        (1, 0),
        (3, 0),
        (7, 0),
    ]
    three, two, one = gpu1.mig_instances
    assert (three.memory_used_bytes, three.memory_free_bytes) == (30_000 * MIB, 10_448 * MIB)
    assert [(p.pid, p.used_memory_bytes) for p in three.processes.processes] == [(4243, 29 * 2**30)]
    assert two.HasField("processes") and len(two.processes.processes) == 0
    assert (three.sm_active_ppm, three.tensor_active_ppm) == (880_000, 715_000)
    assert not three.HasField("dram_active_ppm")
    assert two.sm_active_ppm == 0 and two.HasField("graphics_active_ppm")
    assert one.sm_active_ppm == 125_000
    # The GPUs themselves: no utilization and no row remapping in MIG mode; GPM as a whole.
    assert not gpu1.HasField("gpu_utilization_percent") and not gpu1.HasField("row_remap_pending")
    assert gpu1.sm_active_ppm == 625_000 and gpu1.power_draw_milliwatts == 612_345
    assert len(gpu0.mig_instances) == 7 and gpu0.read_status == telemetry_pb2.GPU_READ_STATUS_OK
    assert source.errors_total == 0


def test_one_metrics_call_per_gpu_and_per_gpu_instance_per_sample() -> None:
    nvml, _, _ = mig_node()
    source, clock = started(nvml)
    for _ in range(3):
        sample(source, clock)
    assert nvml.calls["nvmlGpmMigSampleGet"] == (7 + 3) * 3
    assert nvml.calls["nvmlGpmMetricsGet"] == (2 + 7 + 3) * 2
    assert nvml.gpm_samples_in_use() == (2 + 7 + 3) * 2
    source.close()
    assert nvml.gpm_samples_in_use() == 0


def test_compute_instances_of_one_gpu_instance_share_its_activity() -> None:
    nvml = fake_node(h100_table())
    (whole,) = nvml.set_mig(0, ["3g.40gb"])
    whole.table["gpm"]["SM_UTIL"] = 40.0
    gpu = nvml.gpus[0]
    gpu.migs.append(
        FakeMig(
            parent=gpu, table=dict(whole.table), uuid="MIG-second", gpu_instance_id=1, compute_instance_id=1
        )
    )
    source, clock = started(nvml)
    sample(source, clock)
    (sampled,) = sample(source, clock)
    assert [(m.gpu_instance_id, m.compute_instance_id, m.sm_active_ppm) for m in sampled.mig_instances] == [
        (1, 0, 400_000),
        (1, 1, 400_000),
    ]
    assert nvml.calls["nvmlGpmMigSampleGet"] == 2  # once per GPU instance and sample


def test_mig_reconfigured_between_inventory_reads_frees_the_old_instances_samples() -> None:
    nvml, _, _ = mig_node()
    source, clock = started(nvml)
    sample(source, clock)
    assert nvml.gpm_samples_in_use() == 2 + 7 + 3
    nvml.mig_off(0)
    nvml.set_mig(1, ["7g.80gb"])
    inventory = source.inventory()
    assert [len(gpu.mig_instances) for gpu in inventory.gpus] == [0, 1]
    assert inventory.gpus[1].mig_instances[0].gpu_instance_id == 0
    assert nvml.gpm_samples_in_use() == 2  # the whole GPUs' only
    gpu0, gpu1 = sample(source, clock)
    assert not gpu0.mig_instances and present(gpu0) == set(GPM_ONLY)
    assert present(gpu1.mig_instances[0], ACTIVITY) == set()  # a new GPU instance: its first sample
    assert source.errors_total == 0


def test_an_a100_in_mig_mode_reports_its_instances_without_activity() -> None:
    nvml = fake_node(a100_table())
    nvml.set_mig(0, ["3g.40gb", "3g.40gb"])
    source, clock = started(nvml)
    assert [m.gpu_instance_id for m in source.inventory().gpus[0].mig_instances] == [1, 2]
    sample(source, clock)
    (gpu,) = sample(source, clock)
    assert [present(m, ACTIVITY) for m in gpu.mig_instances] == [set(), set()]
    assert all(m.HasField("memory_free_bytes") for m in gpu.mig_instances)
    assert nvml.calls["nvmlGpmMigSampleGet"] == 0 and source.errors_total == 0


def test_a_lost_gpu_in_mig_mode_is_lost() -> None:
    nvml, _, _ = mig_node()
    source, clock = started(nvml)
    sample(source, clock)
    nvml.gpus[1].lost = True
    fine, lost = sample(source, clock)
    assert lost.read_status == telemetry_pb2.GPU_READ_STATUS_LOST and not lost.mig_instances
    assert len(fine.mig_instances) == 7


# -- the fake speaks the real binding's types ---------------------------------------------


def test_the_fakes_gpm_and_mig_answers_are_the_real_bindings_structures() -> None:
    nvml, sevenths, _ = mig_node()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    support = nvml.nvmlGpmQueryDeviceSupport(handle)
    assert type(support) is pynvml.c_nvmlGpmSupport_t and support.isSupportedDevice == 1
    first, second = nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()
    assert isinstance(first, pynvml.c_nvmlGpmSample_t)
    assert nvml.nvmlGpmSampleGet(handle, first) is first
    nvml.nvmlGpmSampleGet(handle, second)
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = 2
    request.sample1, request.sample2 = first, second
    request.metrics[0].metricId = pynvml.NVML_GPM_METRIC_SM_UTIL
    request.metrics[1].metricId = pynvml.NVML_GPM_METRIC_C2C_TOTAL_TX_PER_SEC
    assert nvml.nvmlGpmMetricsGet(request) is request  # filled in place
    assert (request.metrics[0].nvmlReturn, request.metrics[0].value) == (pynvml.NVML_SUCCESS, 62.5)
    assert request.metrics[1].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    request.sample1, request.sample2 = second, first  # the wrong way round
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlGpmMetricsGet(request)
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, 0)
    assert isinstance(mig, pynvml.c_nvmlDevice_t)
    assert nvml.nvmlDeviceGetUUID(mig) == sevenths[0].uuid
    assert nvml.nvmlDeviceGetName(mig) == "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    assert type(nvml.nvmlDeviceGetAttributes(mig)) is pynvml.c_nvmlDeviceAttributes
    assert type(nvml.nvmlDeviceGetMemoryInfo(mig)) is pynvml.c_nvmlMemory_t
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetUtilizationRates(mig)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetUtilizationRates(handle)  # MIG mode
    nvml.nvmlGpmMigSampleGet(handle, 7, first)
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlGpmMigSampleGet(handle, 99, first)
    nvml.nvmlGpmSampleFree(first)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlGpmSampleGet(handle, first)  # freed
    a100 = fake_node(a100_table())
    assert a100.nvmlGpmQueryDeviceSupport(a100.nvmlDeviceGetHandleByIndex(0)).isSupportedDevice == 0
    a100.remove("nvmlGpmSampleAlloc")
    assert getattr(a100, "nvmlGpmSampleAlloc", None) is None
    assert callable(fake_node(h100_table()).nvmlGpmSampleAlloc)  # other fakes keep it


# -- what GPM costs the agent ---------------------------------------------------------------


def test_the_gpm_cost_benchmark_measures_whole_gpus_and_mig_instances() -> None:
    # The benchmark (python -m bench) holds the target; here only that its measurement runs.
    cost = agent_cost.gpm_sample_cost(gpus=2, samples=3)
    for prefix in ("", "mig7_"):
        for key in ("with_gpm_us", "without_gpm_us", "fake_gpm_us"):
            assert cost[prefix + key] > 0, prefix + key
        assert cost[prefix + "gpm_us"] == cost[prefix + "with_gpm_us"] - cost[prefix + "without_gpm_us"]
