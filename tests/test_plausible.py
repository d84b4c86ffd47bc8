"""Sentinel garbage from drivers is dropped at the agent and counted."""

from __future__ import annotations

from gpufleet.plausible import drop_implausible
from gpufleet.v1 import telemetry_pb2


def test_sentinels_are_dropped_and_counted_plausible_values_kept() -> None:
    sample = telemetry_pb2.GpuSample(
        gpu_temperature_celsius=644245923 % 2**31,
        gpu_utilization_percent=808334905,
        memory_temperature_celsius=45,
        power_draw_milliwatts=650_000,
        performance_state=32,
    )
    assert drop_implausible(sample) == 3
    assert not sample.HasField("gpu_temperature_celsius")
    assert not sample.HasField("gpu_utilization_percent")
    assert not sample.HasField("performance_state")
    assert sample.memory_temperature_celsius == 45
    assert sample.power_draw_milliwatts == 650_000


def test_zero_is_a_plausible_value() -> None:
    sample = telemetry_pb2.GpuSample(gpu_utilization_percent=0, fan_speed_percent=0)
    assert drop_implausible(sample) == 0
    assert sample.HasField("gpu_utilization_percent")
