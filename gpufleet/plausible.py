"""Values no GPU can have: dropped by the agent before they leave the host, and again by the collector.

Drivers sometimes return sentinel garbage (temperatures of 644245923, utilization
of 808334905); such a value is removed from the sample (absent, not zero) and
counted, so it never reaches a dashboard. The collector applies the same ranges to
whatever an agent sends: it does not trust agents to have done so.
"""

from __future__ import annotations

from gpufleet.v1 import telemetry_pb2

# Inclusive physical ranges per field.
PLAUSIBLE: dict[str, tuple[int, int]] = {
    "gpu_utilization_percent": (0, 100),
    "memory_copy_utilization_percent": (0, 100),
    "encoder_utilization_percent": (0, 100),
    "decoder_utilization_percent": (0, 100),
    "fan_speed_percent": (0, 100),
    "gpu_temperature_celsius": (-40, 150),
    "memory_temperature_celsius": (-40, 150),
    "power_draw_milliwatts": (0, 5_000_000),
    "sm_clock_mhz": (0, 10_000),
    "memory_clock_mhz": (0, 20_000),
    "performance_state": (0, 15),
    "memory_used_bytes": (0, 1 << 44),
    "memory_free_bytes": (0, 1 << 44),
    "memory_reserved_bytes": (0, 1 << 44),
    "recovery_action": (0, 4),
}


def drop_implausible(sample: telemetry_pb2.GpuSample) -> int:
    """Clear every field of ``sample`` outside its physical range; return how many."""
    dropped = 0
    for name, (low, high) in PLAUSIBLE.items():
        if sample.HasField(name) and not low <= getattr(sample, name) <= high:
            sample.ClearField(name)
            dropped += 1
    return dropped
