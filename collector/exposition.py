"""Prometheus text exposition of the fleet, built for 100,000 GPUs.

Like kube-state-metrics, each node's lines are rendered once when the node
changes and kept, one chunk per metric family; a scrape writes each family's
HELP/TYPE once, followed by every node's chunk for it. Fleet aggregates are
summed from per-node contributions, so a fleet-wide dashboard reads a few dozen
series instead of 250,000.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from collector import health
from collector.state import NODE_STATE_NAMES, UP, FleetState, GpuRecord, NodeRecord
from gpufleet.v1 import telemetry_pb2

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label_value(value: str) -> str:
    """Escape per the text format: backslash, double quote and newline."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def format_value(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    help: str

    def header(self) -> str:
        return f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.type}\n"


FAMILIES: list[Family] = []


def _family(name: str, type_: str, help_: str) -> int:
    FAMILIES.append(Family(name, type_, help_))
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
GPU_XIDS = _family("gpufleet_gpu_xid_errors_total", "counter", "XID errors seen on the GPU, per XID code.")
GPU_MEMORY_TOTAL = _family("gpufleet_gpu_memory_total_bytes", "gauge", "Framebuffer size.")
GPU_POWER_LIMIT = _family("gpufleet_gpu_power_limit_watts", "gauge", "Enforced power limit.")


Convert = Callable[[int], float | int]


def _percent(value: int) -> float:
    return value / 100


def _milli(value: int) -> float:
    return value / 1000


def _nano(value: int) -> float:
    return value / 1e9


def _mega(value: int) -> int:
    return value * 1_000_000


@dataclass(frozen=True)
class SampleGauge:
    family: int
    field: str
    convert: Convert | None  # to the base unit; None: the value as it is


def _gauge(name: str, type_: str, help_: str, field_name: str, convert: Convert | None = None) -> SampleGauge:
    return SampleGauge(_family(name, type_, help_), field_name, convert)


# Telemetry fields exported one series per GPU, converted to base units.
SAMPLE_GAUGES: list[SampleGauge] = [
    _gauge(
        "gpufleet_gpu_utilization_ratio",
        "gauge",
        "Fraction of time a kernel ran (0-1).",
        "gpu_utilization_percent",
        _percent,
    ),
    _gauge(
        "gpufleet_gpu_memory_copy_utilization_ratio",
        "gauge",
        "Fraction of time device memory was read or written (0-1).",
        "memory_copy_utilization_percent",
        _percent,
    ),
    _gauge(
        "gpufleet_gpu_encoder_utilization_ratio",
        "gauge",
        "Video encoder utilization (0-1).",
        "encoder_utilization_percent",
        _percent,
    ),
    _gauge(
        "gpufleet_gpu_decoder_utilization_ratio",
        "gauge",
        "Video decoder utilization (0-1).",
        "decoder_utilization_percent",
        _percent,
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
    _gauge("gpufleet_gpu_power_watts", "gauge", "Power draw.", "power_draw_milliwatts", _milli),
    _gauge(
        "gpufleet_gpu_energy_joules_total",
        "counter",
        "Energy used since the driver loaded.",
        "energy_millijoules",
        _milli,
    ),
    _gauge("gpufleet_gpu_sm_clock_hertz", "gauge", "SM clock.", "sm_clock_mhz", _mega),
    _gauge("gpufleet_gpu_memory_clock_hertz", "gauge", "Memory clock.", "memory_clock_mhz", _mega),
    _gauge(
        "gpufleet_gpu_fan_speed_ratio",
        "gauge",
        "Fan speed (0-1); absent on fanless boards.",
        "fan_speed_percent",
        _percent,
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
]

# Telemetry fields exported as one family, told apart by labels.
LABELLED_GAUGES: list[tuple[int, list[tuple[str, str, Convert | None]]]] = [
    (
        _family("gpufleet_gpu_throttle_seconds_total", "counter", "Time clocks were held down, per reason."),
        [
            ('reason="power_cap"', "throttle_power_cap_nanoseconds", _nano),
            ('reason="sw_thermal"', "throttle_sw_thermal_nanoseconds", _nano),
            ('reason="hw_thermal"', "throttle_hw_thermal_nanoseconds", _nano),
            ('reason="hw_power_brake"', "throttle_hw_power_brake_nanoseconds", _nano),
        ],
    ),
    (
        _family(
            "gpufleet_gpu_ecc_errors_total",
            "counter",
            "ECC errors, corrected (single-bit) and uncorrected (double-bit); volatile: since driver load.",
        ),
        [
            ('type="corrected",scope="volatile"', "ecc_corrected_volatile", None),
            ('type="uncorrected",scope="volatile"', "ecc_uncorrected_volatile", None),
            ('type="corrected",scope="aggregate"', "ecc_corrected_aggregate", None),
            ('type="uncorrected",scope="aggregate"', "ecc_uncorrected_aggregate", None),
        ],
    ),
    (
        _family(
            "gpufleet_gpu_remapped_rows_total",
            "counter",
            "Memory rows remapped, by the error that caused it.",
        ),
        [
            ('type="correctable"', "remapped_rows_correctable", None),
            ('type="uncorrectable"', "remapped_rows_uncorrectable", None),
        ],
    ),
    (
        _family("gpufleet_gpu_nvlink_errors_total", "counter", "NVLink errors summed over the GPU's links."),
        [
            ('type="crc_flit"', "nvlink_crc_flit_errors", None),
            ('type="crc_data"', "nvlink_crc_data_errors", None),
            ('type="replay"', "nvlink_replay_errors", None),
            ('type="recovery"', "nvlink_recovery_errors", None),
        ],
    ),
]
GPU_PROCESSES = _family("gpufleet_gpu_processes", "gauge", "Compute processes running on the GPU.")

NODE_FAMILY_COUNT = len(FAMILIES)

# -- fleet aggregates ------------------------------------------------------------------

FLEET_GPUS = Family("gpufleet_fleet_gpus", "gauge", "GPUs by cluster, model and health state.")
FLEET_NODES = Family("gpufleet_fleet_nodes", "gauge", "Nodes by cluster and liveness state.")
FLEET_UTILIZATION = Family(
    "gpufleet_fleet_gpu_utilization_mean_ratio",
    "gauge",
    "Mean utilization of reachable GPUs, by cluster and model.",
)
FLEET_IDLE = Family(
    "gpufleet_fleet_idle_gpus", "gauge", "Reachable GPUs under 5 % utilization, by cluster and model."
)
FLEET_POWER = Family("gpufleet_fleet_power_watts", "gauge", "Power drawn by reachable GPUs, by cluster.")


@dataclass
class Contribution:
    """What one node adds to the fleet aggregates."""

    gpus: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    nodes: Counter[tuple[str, str]] = field(default_factory=Counter)
    utilization: dict[tuple[str, str], list[float]] = field(
        default_factory=lambda: defaultdict(lambda: [0.0, 0])
    )
    idle: Counter[tuple[str, str]] = field(default_factory=Counter)
    power_watts: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _line(name: str, labels: str, value: float | int) -> str:
    return f"{name}{{{labels}}} {format_value(value)}\n"


def _converted(sample: telemetry_pb2.GpuSample, field_name: str, convert: Convert | None) -> float | int:
    value = int(getattr(sample, field_name))  # bools become 0/1
    return value if convert is None else convert(value)


def render_node(node: NodeRecord) -> tuple[list[str], Contribution]:
    """The node's lines, one string per node family, and its share of the aggregates."""
    lines: list[list[str]] = [[] for _ in range(NODE_FAMILY_COUNT)]
    inv = node.inventory
    node_label = f'node="{escape_label_value(node.name)}"'
    up = node.state == UP
    lines[NODE_INFO].append(
        _line(
            "gpufleet_node_info",
            ",".join(
                (
                    node_label,
                    f'node_id="{escape_label_value(node.node_id)}"',
                    f'hostname="{escape_label_value(inv.hostname)}"',
                    f'datacenter="{escape_label_value(inv.datacenter)}"',
                    f'cluster="{escape_label_value(inv.cluster)}"',
                    f'rack="{escape_label_value(inv.rack)}"',
                    f'driver_version="{escape_label_value(inv.driver_version)}"',
                    f'cuda_version="{escape_label_value(inv.cuda_version)}"',
                    f'agent_version="{escape_label_value(inv.agent_version)}"',
                )
            ),
            1,
        )
    )
    for state, state_name in NODE_STATE_NAMES.items():
        lines[NODE_STATE].append(
            _line("gpufleet_node_state", f'{node_label},state="{state_name}"', int(node.state == state))
        )
    lines[NODE_LAST_SEEN].append(
        _line("gpufleet_node_last_seen_timestamp_seconds", node_label, node.last_seen_unix_ns / 1e9)
    )
    lines[NODE_GPUS].append(_line("gpufleet_node_gpus", node_label, len(node.gpus)))
    stats = node.agent_stats
    lines[NODE_AGENT_INVALID].append(
        _line(
            "gpufleet_node_agent_invalid_values_dropped_total", node_label, stats.invalid_values_dropped_total
        )
    )
    lines[NODE_AGENT_REPORTS_DROPPED].append(
        _line("gpufleet_node_agent_reports_dropped_total", node_label, stats.reports_dropped_total)
    )
    lines[NODE_AGENT_RECONNECTS].append(
        _line("gpufleet_node_agent_reconnects_total", node_label, stats.reconnects_total)
    )
    contribution = Contribution()
    cluster = inv.cluster
    contribution.nodes[(cluster, NODE_STATE_NAMES[node.state])] += 1
    driver = escape_label_value(inv.driver_version)
    for index in sorted(node.gpus):
        _render_gpu(lines, node, node.gpus[index], f'{node_label},gpu="{index}"', driver, up, contribution)
    return ["".join(family_lines) for family_lines in lines], contribution


def _render_gpu(
    lines: list[list[str]],
    node: NodeRecord,
    gpu: GpuRecord,
    labels: str,
    driver: str,
    up: bool,
    contribution: Contribution,
) -> None:
    inv = gpu.inventory
    model = gpu.model
    lines[GPU_INFO].append(
        _line(
            "gpufleet_gpu_info",
            (
                f'{labels},uuid="{escape_label_value(inv.uuid)}",model="{escape_label_value(model)}",'
                f'serial="{escape_label_value(inv.serial)}",pci_bus_id="{escape_label_value(inv.pci_bus_id)}",'
                f'driver_version="{driver}"'
            ),
            1,
        )
    )
    verdict = node.gpu_verdict(gpu)
    for state, state_name in health.HEALTH_NAMES.items():
        lines[GPU_HEALTH].append(
            _line("gpufleet_gpu_health", f'{labels},state="{state_name}"', int(verdict.health == state))
        )
    for code in sorted(gpu.xid_totals):
        lines[GPU_XIDS].append(
            _line("gpufleet_gpu_xid_errors_total", f'{labels},xid="{code}"', gpu.xid_totals[code])
        )
    if inv.HasField("memory_total_bytes"):
        lines[GPU_MEMORY_TOTAL].append(
            _line("gpufleet_gpu_memory_total_bytes", labels, inv.memory_total_bytes)
        )
    if inv.HasField("power_limit_enforced_milliwatts"):
        lines[GPU_POWER_LIMIT].append(
            _line("gpufleet_gpu_power_limit_watts", labels, _milli(inv.power_limit_enforced_milliwatts))
        )
    contribution.gpus[(node.cluster, model, verdict.name)] += 1
    sample = gpu.sample
    reading = up and sample is not None and sample.read_status == telemetry_pb2.GPU_READ_STATUS_OK
    lines[GPU_UP].append(_line("gpufleet_gpu_up", labels, int(reading)))
    if not reading or sample is None:
        return
    for gauge in SAMPLE_GAUGES:
        if sample.HasField(gauge.field):
            name = FAMILIES[gauge.family].name
            lines[gauge.family].append(_line(name, labels, _converted(sample, gauge.field, gauge.convert)))
    for family, members in LABELLED_GAUGES:
        name = FAMILIES[family].name
        for member_labels, field_name, convert in members:
            if sample.HasField(field_name):
                lines[family].append(
                    _line(name, f"{labels},{member_labels}", _converted(sample, field_name, convert))
                )
    if gpu.processes is not None:
        lines[GPU_PROCESSES].append(_line("gpufleet_gpu_processes", labels, gpu.processes))
    key = (node.cluster, model)
    if sample.HasField("gpu_utilization_percent"):
        total = contribution.utilization[key]
        total[0] += sample.gpu_utilization_percent / 100
        total[1] += 1
        if gpu.is_idle():
            contribution.idle[key] += 1
    if sample.HasField("power_draw_milliwatts"):
        contribution.power_watts[node.cluster] += sample.power_draw_milliwatts / 1000


def render_aggregates(contributions: Iterable[Contribution]) -> str:
    gpus: Counter[tuple[str, str, str]] = Counter()
    nodes: Counter[tuple[str, str]] = Counter()
    utilization: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    idle: Counter[tuple[str, str]] = Counter()
    power: dict[str, float] = defaultdict(float)
    for c in contributions:
        gpus.update(c.gpus)
        nodes.update(c.nodes)
        idle.update(c.idle)
        for key, (total, count) in c.utilization.items():
            utilization[key][0] += total
            utilization[key][1] += count
        for cluster, watts in c.power_watts.items():
            power[cluster] += watts
    out = [FLEET_GPUS.header()]
    for (cluster, model, state), count in sorted(gpus.items()):
        out.append(_line(FLEET_GPUS.name, _cluster_model(cluster, model) + f',health="{state}"', count))
    out.append(FLEET_NODES.header())
    for (cluster, state), count in sorted(nodes.items()):
        out.append(_line(FLEET_NODES.name, f'cluster="{escape_label_value(cluster)}",state="{state}"', count))
    out.append(FLEET_UTILIZATION.header())
    for key, (total, count) in sorted(utilization.items()):
        out.append(_line(FLEET_UTILIZATION.name, _cluster_model(*key), total / count if count else 0.0))
    out.append(FLEET_IDLE.header())
    for key in sorted(utilization):
        out.append(_line(FLEET_IDLE.name, _cluster_model(*key), idle.get(key, 0)))
    out.append(FLEET_POWER.header())
    for cluster, watts in sorted(power.items()):
        out.append(_line(FLEET_POWER.name, f'cluster="{escape_label_value(cluster)}"', watts))
    return "".join(out)


def _cluster_model(cluster: str, model: str) -> str:
    return f'cluster="{escape_label_value(cluster)}",model="{escape_label_value(model)}"'


def shard_of(node_id: str, shards: int) -> int:
    """Stable shard of a node, so that scrape jobs can split the per-node series."""
    return zlib.crc32(node_id.encode()) % shards


class Exposition:
    """Keeps every node's rendered lines current and joins them on scrape."""

    def __init__(self, state: FleetState, extra: Callable[[], bytes] = lambda: b"") -> None:
        self._state = state
        self._extra = extra
        self._chunks: dict[str, list[str]] = {}
        self._contributions: dict[str, Contribution] = {}
        self._dirty: set[str] = {node.node_id for node in state.nodes()}
        self._aggregates = render_aggregates(())
        self._headers = [family.header() for family in FAMILIES]
        self._cache: dict[tuple[int, int], bytes] = {}
        state.add_listener(self._node_changed)

    def _node_changed(self, node: NodeRecord) -> None:
        self._dirty.add(node.node_id)

    def refresh(self) -> int:
        """Re-render the nodes that changed since the last refresh; return how many."""
        if not self._dirty:
            return 0
        dirty, self._dirty = self._dirty, set()
        for node_id in dirty:
            node = self._state.find(node_id)
            if node is None:
                self._chunks.pop(node_id, None)
                self._contributions.pop(node_id, None)
                continue
            self._chunks[node_id], self._contributions[node_id] = render_node(node)
        self._aggregates = render_aggregates(self._contributions.values())
        self._cache.clear()
        return len(dirty)

    def fleet(self) -> bytes:
        """The small view: fleet aggregates and the collector's own metrics."""
        self.refresh()
        return self._aggregates.encode() + self._extra()

    def nodes(self, shard: int = 0, shards: int = 1) -> bytes:
        """Every per-node and per-GPU series, or one shard of them."""
        self.refresh()
        key = (shard, shards)
        body = self._cache.get(key)
        if body is None:
            chunks = [
                c for node_id, c in self._chunks.items() if shards == 1 or shard_of(node_id, shards) == shard
            ]
            parts: list[str] = []
            for family, header in enumerate(self._headers):
                family_parts = [node_chunks[family] for node_chunks in chunks if node_chunks[family]]
                if family_parts:
                    parts.append(header)
                    parts.extend(family_parts)
            body = self._cache[key] = "".join(parts).encode()
        return body

    def everything(self) -> bytes:
        return self.nodes() + self.fleet()
