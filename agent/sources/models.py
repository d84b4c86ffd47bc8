"""GPU models the simulator knows, with figures from gpu-fleet-facts.md section 1.

Figures marked "approx." there are approximations here too; each is named below.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuModel:
    key: str
    nvml_name: str
    architecture: str
    compute_capability: str
    memory_total_mib: int
    memory_reserved_mib: int
    power_limit_default_w: int
    power_limit_min_w: int
    power_limit_max_w: int
    idle_power_w: tuple[float, float]
    sm_clock_max_mhz: int
    sm_clock_idle_mhz: int
    memory_clock_mhz: int
    idle_temperature_c: tuple[float, float]
    idle_memory_temperature_c: float
    slowdown_temperature_c: int
    nvlink_links: int
    pcie_replays_baseline: int
    vbios_version: str


MODELS: dict[str, GpuModel] = {
    model.key: model
    for model in (
        GpuModel(
            key="H100",
            nvml_name="NVIDIA H100 80GB HBM3",
            architecture="Hopper",
            compute_capability="9.0",
            memory_total_mib=81_559,
            memory_reserved_mib=454,
            power_limit_default_w=700,
            power_limit_min_w=200,
            power_limit_max_w=700,
            idle_power_w=(75, 101),
            sm_clock_max_mhz=1980,
            sm_clock_idle_mhz=345,
            memory_clock_mhz=2619,
            idle_temperature_c=(28, 31),
            idle_memory_temperature_c=36,
            # Hopper reports margins to T.Limit; 87 C is an approximation of the slowdown point.
            slowdown_temperature_c=87,
            nvlink_links=18,
            pcie_replays_baseline=7,
            vbios_version="96.00.89.00.01",
        ),
        GpuModel(
            key="A100",
            nvml_name="NVIDIA A100-SXM4-80GB",
            architecture="Ampere",
            compute_capability="8.0",
            memory_total_mib=81_920,
            memory_reserved_mib=763,
            power_limit_default_w=400,
            power_limit_min_w=100,
            power_limit_max_w=400,
            idle_power_w=(58, 60),
            sm_clock_max_mhz=1410,
            sm_clock_idle_mhz=210,
            memory_clock_mhz=1593,
            idle_temperature_c=(22, 25),
            idle_memory_temperature_c=43,
            slowdown_temperature_c=89,
            nvlink_links=12,
            pcie_replays_baseline=0,
            vbios_version="92.00.36.00.02",
        ),
        GpuModel(
            # Idle figures "approx. as H100"; memory clock unverified (approx. 3200 MHz).
            key="H200",
            nvml_name="NVIDIA H200",
            architecture="Hopper",
            compute_capability="9.0",
            memory_total_mib=143_771,
            memory_reserved_mib=512,
            power_limit_default_w=700,
            power_limit_min_w=200,
            power_limit_max_w=700,
            idle_power_w=(75, 101),
            sm_clock_max_mhz=1980,
            sm_clock_idle_mhz=345,
            memory_clock_mhz=3201,
            idle_temperature_c=(28, 31),
            idle_memory_temperature_c=36,
            slowdown_temperature_c=87,
            nvlink_links=18,
            pcie_replays_baseline=0,
            vbios_version="96.00.A5.00.01",
        ),
        GpuModel(
            # Idle power, clocks and temperatures unverified: approximations.
            key="B200",
            nvml_name="NVIDIA B200",
            architecture="Blackwell",
            compute_capability="10.0",
            memory_total_mib=183_359,
            memory_reserved_mib=640,
            power_limit_default_w=1000,
            power_limit_min_w=200,
            power_limit_max_w=1000,
            idle_power_w=(120, 150),
            sm_clock_max_mhz=1965,
            sm_clock_idle_mhz=345,
            memory_clock_mhz=3996,
            idle_temperature_c=(28, 33),
            idle_memory_temperature_c=38,
            slowdown_temperature_c=87,
            nvlink_links=18,
            pcie_replays_baseline=0,
            vbios_version="97.00.4B.00.01",
        ),
    )
}
