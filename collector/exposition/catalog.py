"""The catalog of metric families: each name defined once, in one place.

Defining a name twice fails at import. Node families are numbered in the order they are
defined (the index of a node's chunk for that family); the fleet families are rendered from
the fleet's running totals.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.collector.exposition.textformat import Family
from gpufleet.definitions import IDLE_UTILIZATION_PERCENT

FAMILIES: list[Family] = []
_NAMES: set[str] = set()


def _named(family: Family) -> Family:
    if family.name in _NAMES:
        raise ValueError(f"metric family {family.name} is defined twice")
    _NAMES.add(family.name)
    return family


def _family(name: str, type_: str, help_: str) -> int:
    FAMILIES.append(_named(Family(name, type_, help_)))
    return len(FAMILIES) - 1


# -- per-node families -----------------------------------------------------------------

NODE_INFO = _family(
    "gpufleet_node_info", "gauge", "Node metadata (value 1): identity, topology and driver versions."
)
NODE_STATE = _family(
    "gpufleet_node_state", "gauge", "1 for the node's current liveness state (up, stale, down)."
)
NODE_LAST_SEEN = _family(
    "gpufleet_node_last_seen_timestamp_seconds", "gauge", "When the node's latest report arrived (Unix time)."
)
NODE_GPUS = _family("gpufleet_node_gpus", "gauge", "GPUs in the node's inventory.")
NODE_AGENT_INVALID = _family(
    "gpufleet_node_agent_invalid_values_dropped_total",
    "counter",
    "Values outside physical ranges that the node's agent dropped.",
)
NODE_AGENT_REPORTS_DROPPED = _family(
    "gpufleet_node_agent_reports_dropped_total",
    "counter",
    "Reports the node's agent dropped because its buffer was full.",
)
NODE_AGENT_RECONNECTS = _family(
    "gpufleet_node_agent_reconnects_total", "counter", "Times the node's agent reconnected to a collector."
)

GPU_INFO = _family(
    "gpufleet_gpu_info", "gauge", "GPU metadata (value 1): uuid, model, serial, PCI bus id, driver."
)
GPU_UP = _family(
    "gpufleet_gpu_up",
    "gauge",
    "1 if the GPU reported in its node's latest report, 0 if lost or its node stopped reporting.",
)
GPU_HEALTH = _family("gpufleet_gpu_health", "gauge", "1 for the GPU's current health state.")
GPU_RMA_DUE = _family(
    "gpufleet_gpu_rma_due",
    "gauge",
    "1 for a GPU whose reliability record says it is due for RMA (absent for the others).",
)
GPU_XIDS = _family("gpufleet_gpu_xid_errors_total", "counter", "XID errors seen on the GPU, per XID code.")
GPU_MEMORY_TOTAL = _family("gpufleet_gpu_memory_total_bytes", "gauge", "Framebuffer size.")
GPU_POWER_LIMIT = _family("gpufleet_gpu_power_limit_watts", "gauge", "Enforced power limit.")
# How a sample field's integer becomes the exported value in base units: the
# integer with a decimal exponent, exact and without float formatting
# (95 percent is written 95e-2, 700000 mW 700000e-3 W).
AS_IS = "%d"
PERCENT = "%de-2"
MILLI = "%de-3"
PPM = "%de-6"
NANO = "%de-9"
MEGA = "%de6"


@dataclass(frozen=True)
class SampleGauge:
    family: int
    field: str
    value_format: str  # the integer in base units: AS_IS, PERCENT, MILLI, PPM, NANO or MEGA


def _gauge(name: str, type_: str, help_: str, field_name: str, value_format: str = AS_IS) -> SampleGauge:
    return SampleGauge(_family(name, type_, help_), field_name, value_format)


# NVML GPM's activity ratios: (sample field, the metric's stem, what it measures). The same
# fields are on a GPU's sample and on each of its MIG instances' samples.
ACTIVITY_FIELDS: list[tuple[str, str, str]] = [
    ("graphics_active_ppm", "graphics_active", "Fraction of time the graphics or compute engine was busy"),
    ("sm_active_ppm", "sm_active", "Fraction of time at least one warp was resident on an SM, over all SMs"),
    ("sm_occupancy_ppm", "sm_occupancy", "Resident warps as a fraction of the SMs' maximum"),
    ("tensor_active_ppm", "tensor_active", "Fraction of time any tensor core pipe was active"),
    ("dram_active_ppm", "dram_active", "Device memory bandwidth used, as a fraction of the peak"),
    ("fp64_active_ppm", "fp64_active", "Fraction of time the FP64 pipe was active"),
    ("fp32_active_ppm", "fp32_active", "Fraction of time the FP32 pipe was active"),
    ("fp16_active_ppm", "fp16_active", "Fraction of time the FP16 pipe was active"),
]
GPM_NOTE = "(0-1, NVML GPM over the report interval; absent where unsupported)"

# Telemetry fields exported one series per GPU, converted to base units.
SAMPLE_GAUGES: list[SampleGauge] = [
    _gauge(
        "gpufleet_gpu_utilization_ratio",
        "gauge",
        "Fraction of time a kernel ran (0-1).",
        "gpu_utilization_percent",
        PERCENT,
    ),
    _gauge(
        "gpufleet_gpu_memory_copy_utilization_ratio",
        "gauge",
        "Fraction of time device memory was read or written (0-1).",
        "memory_copy_utilization_percent",
        PERCENT,
    ),
    _gauge(
        "gpufleet_gpu_encoder_utilization_ratio",
        "gauge",
        "Video encoder utilization (0-1).",
        "encoder_utilization_percent",
        PERCENT,
    ),
    _gauge(
        "gpufleet_gpu_decoder_utilization_ratio",
        "gauge",
        "Video decoder utilization (0-1).",
        "decoder_utilization_percent",
        PERCENT,
    ),
    _gauge("gpufleet_gpu_memory_used_bytes", "gauge", "Framebuffer memory in use.", "memory_used_bytes"),
    _gauge("gpufleet_gpu_memory_free_bytes", "gauge", "Framebuffer memory free.", "memory_free_bytes"),
    _gauge(
        "gpufleet_gpu_memory_reserved_bytes",
        "gauge",
        "Framebuffer memory reserved by the driver.",
        "memory_reserved_bytes",
    ),
    _gauge("gpufleet_gpu_temperature_celsius", "gauge", "GPU die temperature.", "gpu_temperature_celsius"),
    _gauge(
        "gpufleet_gpu_memory_temperature_celsius", "gauge", "HBM temperature.", "memory_temperature_celsius"
    ),
    _gauge("gpufleet_gpu_power_watts", "gauge", "Power draw.", "power_draw_milliwatts", MILLI),
    _gauge(
        "gpufleet_gpu_energy_joules_total",
        "counter",
        "Energy used since the driver loaded.",
        "energy_millijoules",
        MILLI,
    ),
    _gauge("gpufleet_gpu_sm_clock_hertz", "gauge", "SM clock.", "sm_clock_mhz", MEGA),
    _gauge("gpufleet_gpu_memory_clock_hertz", "gauge", "Memory clock.", "memory_clock_mhz", MEGA),
    _gauge(
        "gpufleet_gpu_fan_speed_ratio",
        "gauge",
        "Fan speed (0-1); absent on fanless boards.",
        "fan_speed_percent",
        PERCENT,
    ),
    _gauge(
        "gpufleet_gpu_performance_state",
        "gauge",
        "Performance state: 0 (P0, fastest) to 15.",
        "performance_state",
    ),
    _gauge(
        "gpufleet_gpu_clock_event_reasons",
        "gauge",
        "Bitmask of why clocks are held down (NVML clock event reasons).",
        "clock_event_reasons",
    ),
    _gauge(
        "gpufleet_gpu_pcie_transmit_bytes_per_second",
        "gauge",
        "PCIe transmit throughput.",
        "pcie_tx_bytes_per_second",
    ),
    _gauge(
        "gpufleet_gpu_pcie_receive_bytes_per_second",
        "gauge",
        "PCIe receive throughput.",
        "pcie_rx_bytes_per_second",
    ),
    _gauge("gpufleet_gpu_pcie_replays_total", "counter", "PCIe replays (link retries).", "pcie_replay_count"),
    _gauge(
        "gpufleet_gpu_row_remap_pending",
        "gauge",
        "1 if a row remap waits for a GPU reset.",
        "row_remap_pending",
    ),
    _gauge(
        "gpufleet_gpu_row_remap_failure",
        "gauge",
        "1 if a row remap failed (an RMA criterion).",
        "row_remap_failure",
    ),
    _gauge(
        "gpufleet_gpu_recovery_action",
        "gauge",
        "NVML recovery action: 0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, 4 drain and reset.",
        "recovery_action",
    ),
    *(
        _gauge(f"gpufleet_gpu_{stem}_ratio", "gauge", f"{what} {GPM_NOTE}.", field_name, PPM)
        for field_name, stem, what in ACTIVITY_FIELDS
    ),
    _gauge(
        "gpufleet_gpu_nvlink_transmit_bytes_per_second",
        "gauge",
        "NVLink transmit throughput over all links (NVML GPM).",
        "nvlink_tx_bytes_per_second",
    ),
    _gauge(
        "gpufleet_gpu_nvlink_receive_bytes_per_second",
        "gauge",
        "NVLink receive throughput over all links (NVML GPM).",
        "nvlink_rx_bytes_per_second",
    ),
]

# Telemetry fields exported as one family, told apart by labels.
LABELLED_GAUGES: list[tuple[int, list[tuple[str, str, str]]]] = [
    (
        _family("gpufleet_gpu_throttle_seconds_total", "counter", "Time clocks were held down, per reason."),
        [
            ('reason="power_cap"', "throttle_power_cap_nanoseconds", NANO),
            ('reason="sw_thermal"', "throttle_sw_thermal_nanoseconds", NANO),
            ('reason="hw_thermal"', "throttle_hw_thermal_nanoseconds", NANO),
            ('reason="hw_power_brake"', "throttle_hw_power_brake_nanoseconds", NANO),
        ],
    ),
    (
        _family(
            "gpufleet_gpu_ecc_errors_total",
            "counter",
            "ECC errors, corrected (single-bit) and uncorrected (double-bit); volatile: since driver load.",
        ),
        [
            ('type="corrected",scope="volatile"', "ecc_corrected_volatile", AS_IS),
            ('type="uncorrected",scope="volatile"', "ecc_uncorrected_volatile", AS_IS),
            ('type="corrected",scope="aggregate"', "ecc_corrected_aggregate", AS_IS),
            ('type="uncorrected",scope="aggregate"', "ecc_uncorrected_aggregate", AS_IS),
        ],
    ),
    (
        _family(
            "gpufleet_gpu_remapped_rows_total",
            "counter",
            "Memory rows remapped, by the error that caused it.",
        ),
        [
            ('type="correctable"', "remapped_rows_correctable", AS_IS),
            ('type="uncorrectable"', "remapped_rows_uncorrectable", AS_IS),
        ],
    ),
    (
        _family("gpufleet_gpu_nvlink_errors_total", "counter", "NVLink errors summed over the GPU's links."),
        [
            ('type="crc_flit"', "nvlink_crc_flit_errors", AS_IS),
            ('type="crc_data"', "nvlink_crc_data_errors", AS_IS),
            ('type="replay"', "nvlink_replay_errors", AS_IS),
            ('type="recovery"', "nvlink_recovery_errors", AS_IS),
        ],
    ),
]
GPU_PROCESSES = _family("gpufleet_gpu_processes", "gauge", "Compute processes running on the GPU.")
NODE_AGENT_ATTRIBUTION_ERRORS = _family(
    "gpufleet_node_agent_attribution_errors_total",
    "counter",
    "Attribution reads that failed on the node (kubelet errors, unreadable job files or environments).",
)
NODE_AGENT_ATTRIBUTION_TRUNCATED = _family(
    "gpufleet_node_agent_attribution_values_truncated_total",
    "counter",
    "Attribution values the node's agent cut to the length limit or dropped over the count limit.",
)
NODE_ATTRIBUTION_AVAILABLE = _family(
    "gpufleet_node_attribution_available",
    "gauge",
    "1 if the node's agent could read this attribution source (kubernetes, slurm) in its latest refresh.",
)
GPU_ALLOCATION_INFO = _family(
    "gpufleet_gpu_allocation_info",
    "gauge",
    "Who holds the GPU or its MIG instance (value 1, one series per workload); join on (node, gpu).",
)
MIG_INFO = _family(
    "gpufleet_mig_info", "gauge", "A MIG instance (value 1): its uuid, profile and compute instance id."
)
MIG_MEMORY_TOTAL = _family("gpufleet_mig_memory_total_bytes", "gauge", "The MIG instance's memory.")
MIG_MEMORY_USED = _family("gpufleet_mig_memory_used_bytes", "gauge", "The MIG instance's memory in use.")
MIG_PROCESSES = _family("gpufleet_mig_processes", "gauge", "Compute processes running on the MIG instance.")
MIG_ACTIVITY: list[tuple[int, str]] = [
    (_family(f"gpufleet_mig_{stem}_ratio", "gauge", f"{what}, of the MIG instance {GPM_NOTE}."), field_name)
    for field_name, stem, what in ACTIVITY_FIELDS
]

NODE_FAMILY_COUNT = len(FAMILIES)

# -- fleet aggregates ------------------------------------------------------------------

FLEET_GPUS = _named(Family("gpufleet_fleet_gpus", "gauge", "GPUs by cluster, model and health state."))
FLEET_NODES = _named(Family("gpufleet_fleet_nodes", "gauge", "Nodes by cluster and liveness state."))
FLEET_UTILIZATION = _named(
    Family(
        "gpufleet_fleet_gpu_utilization_mean_ratio",
        "gauge",
        "Mean utilization of reachable GPUs, by cluster and model.",
    )
)
FLEET_IDLE = _named(
    Family(
        "gpufleet_fleet_idle_gpus",
        "gauge",
        f"Reachable GPUs under {IDLE_UTILIZATION_PERCENT} % utilization, by cluster and model.",
    )
)
FLEET_POWER = _named(
    Family("gpufleet_fleet_power_watts", "gauge", "Power drawn by reachable GPUs, by cluster.")
)
FLEET_RMA_DUE = _named(
    Family(
        "gpufleet_fleet_gpus_rma_due",
        "gauge",
        "GPUs due for RMA in the nodes' inventories, by cluster and model.",
    )
)

# -- workloads (collector/workload.py): GPU counts in GPU-equivalents (a MIG instance is its slices / 7) --

WORKLOAD_GPUS = _named(
    Family(
        "gpufleet_workload_gpus", "gauge", "GPUs allocated, by cluster and workload (namespace, job, user)."
    )
)
WORKLOAD_IDLE_GPUS = _named(
    Family(
        "gpufleet_workload_idle_gpus",
        "gauge",
        "Allocated GPUs that are idle, by workload and measure (by: utilization, sm_active).",
    )
)
WORKLOAD_GPU_SECONDS = _named(
    Family(
        "gpufleet_workload_gpu_seconds_total", "counter", "GPU-seconds allocated, by cluster and workload."
    )
)
WORKLOAD_IDLE_GPU_SECONDS = _named(
    Family(
        "gpufleet_workload_idle_gpu_seconds_total",
        "counter",
        "GPU-seconds allocated and idle, by workload and measure.",
    )
)
WORKLOAD_COST = _named(
    Family(
        "gpufleet_workload_cost_total",
        "counter",
        "What the allocated GPU-seconds cost at the collector's --price per GPU-hour, by workload.",
    )
)
WORKLOAD_IDLE_COST = _named(
    Family(
        "gpufleet_workload_idle_cost_total",
        "counter",
        "What the allocated and idle GPU-seconds cost at the collector's --price, by workload and measure.",
    )
)
FLEET_ALLOCATED = _named(
    Family(
        "gpufleet_fleet_allocated_gpus",
        "gauge",
        "Reachable GPUs allocated to a workload, by cluster and model.",
    )
)
FLEET_UNALLOCATED = _named(
    Family(
        "gpufleet_fleet_unallocated_gpus", "gauge", "Reachable GPUs no workload holds, by cluster and model."
    )
)
