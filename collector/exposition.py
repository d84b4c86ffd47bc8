"""Prometheus text exposition of the fleet, built for 100,000 GPUs.

Like kube-state-metrics, each node's lines are rendered once when the node
changes and kept, one chunk per metric family; a scrape writes each family's
HELP/TYPE once, followed by every node's chunk for it. A report's values are
formatted by one %-operation on a template shared by nodes of the same shape.
Each shard view keeps, per family, references to its nodes' chunks and gzip
members of them, made again only for families that changed (docs/benchmarks.md
has the measurements). Fleet aggregates are running totals of per-node shares,
so a fleet-wide dashboard reads a few dozen series instead of 250,000.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import logging
import math
import operator
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from collector import health
from collector.sinks import Sink
from collector.state import (
    NODE_STATE_NAMES,
    UP,
    FleetState,
    GpuRecord,
    NodeRecord,
)
from collector.totals import Contribution, FleetTotals, ModelShare, contribution
from gpufleet.definitions import IDLE_UTILIZATION_PERCENT
from gpufleet.v1 import telemetry_pb2

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# ~300 MB/s per core; level 6 costs 2x for a few percent less.
GZIP_LEVEL = 1


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
# How a sample field's integer becomes the exported value in base units: the
# integer with a decimal exponent, exact and without float formatting
# (95 percent is written 95e-2, 700000 mW 700000e-3 W).
AS_IS = "%d"
PERCENT = "%de-2"
MILLI = "%de-3"
NANO = "%de-9"
MEGA = "%de6"


@dataclass(frozen=True)
class SampleGauge:
    family: int
    field: str
    value_format: str  # the integer in base units: AS_IS, PERCENT, MILLI, NANO or MEGA


def _gauge(name: str, type_: str, help_: str, field_name: str, value_format: str = AS_IS) -> SampleGauge:
    return SampleGauge(_family(name, type_, help_), field_name, value_format)


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
    "gpufleet_fleet_idle_gpus",
    "gauge",
    f"Reachable GPUs under {IDLE_UTILIZATION_PERCENT} % utilization, by cluster and model.",
)
FLEET_POWER = Family("gpufleet_fleet_power_watts", "gauge", "Power drawn by reachable GPUs, by cluster.")


def _line(name: str, labels: str, value: float | int) -> str:
    return f"{name}{{{labels}}} {format_value(value)}\n"


def render_aggregates(totals: FleetTotals) -> str:
    """The fleet aggregates, from the fleet's running totals."""
    out = [FLEET_GPUS.header()]
    for (cluster, model, state), count in totals.rows("gpus"):
        out.append(_line(FLEET_GPUS.name, _cluster_model(cluster, model) + f',health="{state}"', count))
    out.append(FLEET_NODES.header())
    for (cluster, state), count in totals.rows("nodes"):
        out.append(_line(FLEET_NODES.name, f'cluster="{escape_label_value(cluster)}",state="{state}"', count))
    measured = totals.rows("util_n")
    out.append(FLEET_UTILIZATION.header())
    for (cluster, model), count in measured:
        mean = totals.get("util", cluster, model) / 100 / count
        out.append(_line(FLEET_UTILIZATION.name, _cluster_model(cluster, model), mean))
    out.append(FLEET_IDLE.header())
    for (cluster, model), _ in measured:
        out.append(_line(FLEET_IDLE.name, _cluster_model(cluster, model), totals.get("idle", cluster, model)))
    out.append(FLEET_POWER.header())
    for (cluster,), _ in totals.rows("power_n"):
        watts = totals.get("power", cluster) / 1000
        out.append(_line(FLEET_POWER.name, f'cluster="{escape_label_value(cluster)}"', watts))
    return "".join(out)


def _cluster_model(cluster: str, model: str) -> str:
    return f'cluster="{escape_label_value(cluster)}",model="{escape_label_value(model)}"'


def shard_of(node_id: str, shards: int) -> int:
    """Stable shard of a node, so that scrape jobs can split the per-node series."""
    return zlib.crc32(node_id.encode()) % shards


# -- one node's lines ------------------------------------------------------------------


# A value slot of a GPU: one series of one family, filled from one sample field.
@dataclass(frozen=True)
class _Slot:
    family: int
    field: str
    labels: str  # extra labels after node and gpu, with a leading comma, or ""
    value_format: str


SLOTS: list[_Slot] = [_Slot(g.family, g.field, "", g.value_format) for g in SAMPLE_GAUGES] + [
    _Slot(family, field_name, f",{labels}", value_format)
    for family, members in LABELLED_GAUGES
    for labels, field_name, value_format in members
]
SLOT_FIELDS = tuple(slot.field for slot in SLOTS)
_slot_values = operator.attrgetter(*SLOT_FIELDS)
# The families a node's template fills, in exposition order: everything that
# changes with a report. The others change rarely and are rendered on change.
NODE_VALUE_FAMILIES = (NODE_LAST_SEEN, NODE_AGENT_INVALID, NODE_AGENT_REPORTS_DROPPED, NODE_AGENT_RECONNECTS)
TEMPLATE_FAMILIES = sorted({*NODE_VALUE_FAMILIES, *(slot.family for slot in SLOTS), GPU_PROCESSES})
_SLOTS_BY_FAMILY: dict[int, list[int]] = defaultdict(list)
for _position, _slot in enumerate(SLOTS):
    _SLOTS_BY_FAMILY[_slot.family].append(_position)
# A node's flat value list: these node values first (its label as a value, so
# that one template serves every node of the same shape), then per reading GPU
# its slot values and its process count.
_LABEL = 0
_NODE_VALUES = 1 + len(NODE_VALUE_FAMILIES)
_GPU_VALUES = len(SLOTS) + 1
_SEPARATOR = b"\x00"
_UTILIZATION = SLOT_FIELDS.index("gpu_utilization_percent")
_POWER = SLOT_FIELDS.index("power_draw_milliwatts")
_HEALTH_NAMES = {int(value): name for value, name in health.HEALTH_NAMES.items()}
_OK = telemetry_pb2.GPU_READ_STATUS_OK
# (GPU index, fields present, process count present) of each GPU that reads.
Shape = tuple[tuple[int, tuple[bool, ...], bool], ...]


@dataclass(frozen=True)
class _Template:
    """How every node of one shape is formatted, with one %-operation."""

    joined: bytes  # every template family, separated by NUL bytes
    parts: tuple[bytes, ...]  # the same, one per family (for label values that hold NUL)
    counts: tuple[int, ...]  # placeholders per family
    pick: Callable[[list[Any]], tuple[Any, ...]]  # flat values -> placeholder order


@functools.lru_cache(maxsize=4096)
def _template(shape: Shape) -> _Template:
    parts: list[bytes] = []
    counts: list[int] = []
    positions: list[int] = []
    for family in TEMPLATE_FAMILIES:
        name = FAMILIES[family].name.encode()
        lines: list[bytes] = []
        if family in NODE_VALUE_FAMILIES:
            value = b"%b" if family == NODE_LAST_SEEN else b"%d"
            lines.append(name + b"{%b} " + value + b"\n")
            positions += (_LABEL, 1 + NODE_VALUE_FAMILIES.index(family))
        for gpu_position, (index, present, has_processes) in enumerate(shape):
            base = _NODE_VALUES + gpu_position * _GPU_VALUES
            labels = name + b'{%b,gpu="' + str(index).encode() + b'"'
            if family == GPU_PROCESSES:
                if has_processes:
                    lines.append(labels + b"} %d\n")
                    positions += (_LABEL, base + len(SLOTS))
                continue
            for slot_position in _SLOTS_BY_FAMILY.get(family, ()):
                if present[slot_position]:
                    slot = SLOTS[slot_position]
                    lines.append(labels + slot.labels.encode() + b"} " + slot.value_format.encode() + b"\n")
                    positions += (_LABEL, base + slot_position)
        parts.append(b"".join(lines))
        counts.append(2 * len(lines))
    getter = operator.itemgetter(*positions)
    return _Template(_SEPARATOR.join(parts), tuple(parts), tuple(counts), getter)


class _NodeLines:
    """One node's rendered lines, one bytes chunk per family, and its share of the aggregates.

    A report changes values only: they are formatted by one %-operation on the
    template of the node's shape. Inventory, liveness, health and XID lines are
    rendered again only when they change. (Slots and tuples: at 100,000 GPUs,
    fewer objects for Python's garbage collector to walk.)
    """

    __slots__ = (
        "_health_key",
        "_inventory_key",
        "_label",
        "_label_bytes",
        "_name",
        "_state_key",
        "_up_key",
        "_xid_key",
        "chunks",
        "contribution",
        "crc",
    )

    def __init__(self, node_id: str) -> None:
        self.crc = zlib.crc32(node_id.encode())
        self.chunks: tuple[bytes, ...] = (b"",) * NODE_FAMILY_COUNT
        self.contribution: Contribution = {}
        self._forget("")

    def _forget(self, name: str) -> None:
        self._name = name
        self._label = f'node="{escape_label_value(name)}"'
        self._label_bytes = self._label.encode()
        self._inventory_key: tuple[object, ...] = ()
        self._state_key: int | None = None
        self._health_key: tuple[int, ...] | None = None
        self._up_key: tuple[bool, ...] | None = None
        self._xid_key: tuple[object, ...] = ()

    def render(self, node: NodeRecord) -> list[int]:
        """Bring the chunks up to date with ``node``; return the families whose lines changed."""
        if node.name != self._name:
            self._forget(node.name)
        old = self.chunks
        new = list(old)
        gpus = [node.gpus[index] for index in sorted(node.gpus)]
        inventory_key = (node.inventory, *[gpu.inventory for gpu in gpus])
        if inventory_key != self._inventory_key:
            self._inventory_key = inventory_key
            self._render_inventory(node, gpus, new)
        state = node.state
        if state != self._state_key:
            self._state_key = state
            new[NODE_STATE] = self._lines(
                ("gpufleet_node_state", f',state="{name}"', int(state == known))
                for known, name in NODE_STATE_NAMES.items()
            )
        up = state == UP
        stats = node.agent_stats
        values: list[Any] = [
            self._label_bytes,
            repr(node.last_seen_unix_ns / 1e9).encode(),
            stats.invalid_values_dropped_total,
            stats.reports_dropped_total,
            stats.reconnects_total,
        ]
        shape = []
        verdicts = []
        oks = []
        by_model: dict[str, ModelShare] = {}
        for gpu in gpus:
            health_now = node.gpu_verdict(gpu).health
            verdicts.append(health_now)
            model = gpu.model
            part = by_model.get(model)
            if part is None:
                part = by_model[model] = ModelShare()
            part.healths[_HEALTH_NAMES[health_now]] += 1
            sample = gpu.sample
            if not (up and sample is not None and not gpu.missing and sample.read_status == _OK):
                oks.append(False)
                continue
            oks.append(True)
            present = tuple(map(sample.HasField, SLOT_FIELDS))
            slot_values = _slot_values(sample)
            shape.append((gpu.inventory.index, present, gpu.processes is not None))
            values += slot_values
            values.append(gpu.processes)
            part.reachable(
                slot_values[_UTILIZATION] if present[_UTILIZATION] else None,
                slot_values[_POWER] if present[_POWER] else None,
            )
        health_key = tuple(verdicts)
        if health_key != self._health_key:
            self._health_key = health_key
            new[GPU_HEALTH] = self._lines(
                ("gpufleet_gpu_health", f',gpu="{gpu.inventory.index}",state="{name}"', int(now == known))
                for gpu, now in zip(gpus, health_key, strict=True)
                for known, name in health.HEALTH_NAMES.items()
            )
        up_key = tuple(oks)
        if up_key != self._up_key:
            self._up_key = up_key
            new[GPU_UP] = self._lines(
                ("gpufleet_gpu_up", f',gpu="{gpu.inventory.index}"', int(ok))
                for gpu, ok in zip(gpus, oks, strict=True)
            )
        if self._xid_key or any(gpu.xid_totals for gpu in gpus):
            self._render_xids(gpus, new)
        self._fill(_template(tuple(shape)), values, new)
        self.contribution = contribution(node.inventory.cluster, NODE_STATE_NAMES[state], by_model)
        self.chunks = tuple(new)
        return [family for family in range(NODE_FAMILY_COUNT) if new[family] != old[family]]

    def _lines(self, lines: Iterable[tuple[str, str, float | int]]) -> bytes:
        """Lines of this node from (metric, labels after the node label, value)."""
        label = self._label
        return "".join(_line(name, label + labels, value) for name, labels, value in lines).encode()

    def _render_inventory(self, node: NodeRecord, gpus: list[GpuRecord], new: list[bytes]) -> None:
        inv = node.inventory
        node_labels = "".join(
            f',{key}="{escape_label_value(value)}"'
            for key, value in (
                ("node_id", node.node_id),
                ("hostname", inv.hostname),
                ("datacenter", inv.datacenter),
                ("cluster", inv.cluster),
                ("rack", inv.rack),
                ("driver_version", inv.driver_version),
                ("cuda_version", inv.cuda_version),
                ("agent_version", inv.agent_version),
            )
        )
        new[NODE_INFO] = self._lines([("gpufleet_node_info", node_labels, 1)])
        new[NODE_GPUS] = self._lines([("gpufleet_node_gpus", "", len(node.gpus))])
        driver = escape_label_value(inv.driver_version)
        info, memory, power = [], [], []
        for gpu in gpus:
            gpu_inv = gpu.inventory
            labels = f',gpu="{gpu_inv.index}"'
            info.append(
                (
                    "gpufleet_gpu_info",
                    f'{labels},uuid="{escape_label_value(gpu_inv.uuid)}",'
                    f'model="{escape_label_value(gpu.model)}",'
                    f'serial="{escape_label_value(gpu_inv.serial)}",'
                    f'pci_bus_id="{escape_label_value(gpu_inv.pci_bus_id)}",'
                    f'driver_version="{driver}"',
                    1,
                )
            )
            if gpu_inv.HasField("memory_total_bytes"):
                memory.append(("gpufleet_gpu_memory_total_bytes", labels, gpu_inv.memory_total_bytes))
            if gpu_inv.HasField("power_limit_enforced_milliwatts"):
                watts = gpu_inv.power_limit_enforced_milliwatts / 1000
                power.append(("gpufleet_gpu_power_limit_watts", labels, watts))
        new[GPU_INFO] = self._lines(info)
        new[GPU_MEMORY_TOTAL] = self._lines(memory)
        new[GPU_POWER_LIMIT] = self._lines(power)

    def _render_xids(self, gpus: list[GpuRecord], new: list[bytes]) -> None:
        key = tuple((gpu.inventory.index, tuple(sorted(gpu.xid_totals.items()))) for gpu in gpus)
        if key == self._xid_key:
            return
        self._xid_key = key if any(totals for _, totals in key) else ()
        new[GPU_XIDS] = self._lines(
            ("gpufleet_gpu_xid_errors_total", f',gpu="{index}",xid="{code}"', count)
            for index, totals in key
            for code, count in totals
        )

    @staticmethod
    def _fill(template: _Template, values: list[Any], new: list[bytes]) -> None:
        ordered = template.pick(values)
        chunks = (template.joined % ordered).split(_SEPARATOR)
        if len(chunks) != len(TEMPLATE_FAMILIES):  # a label value holds a NUL byte
            chunks, start = [], 0
            for part, count in zip(template.parts, template.counts, strict=True):
                chunks.append(part % ordered[start : start + count])
                start += count
        for family, chunk in zip(TEMPLATE_FAMILIES, chunks, strict=True):
            new[family] = chunk


# -- scrapes -----------------------------------------------------------------------------

# Text is written and compressed in blocks of about this size: never one large
# buffer for a whole scrape, and a gzip member per block.
BLOCK_BYTES = 512 * 1024


def gzip_member(data: bytes) -> bytes:
    """``data`` as one complete gzip member."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


class _Segment:
    """One family's lines in one view: its header and every node's chunk (references, not a copy).

    The text is joined block by block when written; each block's gzip member is
    made once and kept as long as the segment (until the family's lines change).
    """

    __slots__ = ("_bounds", "_members", "_pieces", "length")

    def __init__(self, header: bytes, chunks: list[bytes]) -> None:
        pieces = [header, *chunks]
        ends = list(itertools.accumulate(map(len, pieces)))
        bounds = [0]
        start = 0  # where the current block starts, in bytes
        while True:
            # The block ends after the piece that takes it to BLOCK_BYTES.
            cut = bisect.bisect_left(ends, start + BLOCK_BYTES) + 1
            if cut >= len(pieces):
                break
            bounds.append(cut)
            start = ends[cut - 1]
        bounds.append(len(pieces))
        self._pieces = pieces
        self._bounds = bounds
        self._members: list[bytes | None] = [None] * (len(bounds) - 1)
        self.length = ends[-1]

    def blocks(self) -> Iterator[bytes]:
        pieces = self._pieces
        for start, end in itertools.pairwise(self._bounds):
            yield b"".join(pieces[start:end])

    def pending(self) -> int:
        """Bytes not compressed yet."""
        if all(member is not None for member in self._members):
            return 0
        ends = [0, *itertools.accumulate(map(len, self._pieces))]
        return sum(
            ends[end] - ends[start]
            for (start, end), member in zip(itertools.pairwise(self._bounds), self._members, strict=True)
            if member is None
        )

    def members(self) -> list[bytes]:
        """The gzip member of every block, compressing those not made yet."""
        members = self._members
        for block, member in enumerate(members):
            if member is None:
                start, end = self._bounds[block], self._bounds[block + 1]
                members[block] = gzip_member(b"".join(self._pieces[start:end]))
        return [member for member in members if member is not None]


class Body:
    """A scrape's exposition text, in pieces: one segment per metric family, then a tail.

    Written block by block, never joined into one large buffer. The gzip form is
    a gzip member per block (Prometheus, like every HTTP client, accepts several
    members in a row), kept until the family's lines change: a scrape compresses
    only what changed since the previous one. ``bytes(body)`` gives the whole text.
    """

    __slots__ = ("_length", "_segments", "_tail")

    def __init__(self, segments: Sequence[_Segment], tail: bytes = b"") -> None:
        # Segments are never changed once made (a change makes new ones): a body
        # can be written or compressed while the event loop renders newer lines.
        self._segments = tuple(segments)
        self._tail = tail
        self._length = sum(segment.length for segment in self._segments) + len(tail)

    def __len__(self) -> int:
        return self._length

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks())

    def chunks(self) -> Iterator[bytes]:
        """The text, block by block."""
        for segment in self._segments:
            yield from segment.blocks()
        if self._tail:
            yield self._tail

    def gzip_pending(self) -> int:
        """How many bytes ``gzip_chunks`` has yet to compress."""
        return sum(segment.pending() for segment in self._segments) + len(self._tail)

    def gzip_chunks(self) -> list[bytes]:
        """The gzip form, member by member, compressing what is not yet (safe in another thread)."""
        members = [member for segment in self._segments for member in segment.members()]
        if self._tail or not members:
            members.append(gzip_member(self._tail))
        return members

    def gzip(self) -> bytes:
        return b"".join(self.gzip_chunks())


class _View:
    """The nodes of one shard and their lines, one segment per family, built on demand."""

    def __init__(self, members: list[_NodeLines]) -> None:
        self.members = members
        self.segments: list[_Segment | None] = [None] * NODE_FAMILY_COUNT
        self.built = [False] * NODE_FAMILY_COUNT
        self.body: Body | None = None

    def invalidate(self, families: Iterable[int]) -> None:
        built = self.built
        for family in families:
            built[family] = False
        self.body = None

    def build(self, headers: Sequence[bytes]) -> list[_Segment]:
        """The view's segments, those of families that changed made again."""
        segments = self.segments
        for family, built in enumerate(self.built):
            if not built:
                chunks = list(filter(None, [lines.chunks[family] for lines in self.members]))
                segments[family] = _Segment(headers[family], chunks) if chunks else None
                self.built[family] = True
        return [segment for segment in segments if segment is not None]


class Exposition(Sink):
    """Keeps every node's rendered lines current and joins them on scrape.

    Nodes that changed are rendered in small batches, REFRESH_DELAY_S after the
    first change (when an event loop runs), so that a scrape finds little left to
    render; a scrape renders what is left first.
    """

    # Shard views kept (least recently scraped dropped first).
    MAX_VIEWS = 64
    REFRESH_DELAY_S = 0.05

    def __init__(
        self, state: FleetState, extra: Callable[[], bytes] = lambda: b"", totals: FleetTotals | None = None
    ) -> None:
        self._state = state
        self._extra = extra
        self._nodes: dict[str, _NodeLines] = {}
        self._dirty: set[str] = {node.node_id for node in state.nodes()}
        self._totals = totals or FleetTotals()
        self._aggregates = render_aggregates(self._totals).encode()
        self._headers = [family.header().encode() for family in FAMILIES]
        self._views: dict[tuple[int, int], _View] = {}
        # How many views there are for each shard count.
        self._shard_counts: Counter[int] = Counter()
        self._refresh_scheduled = False

    name = "exposition"

    def node_removed(self, node: NodeRecord) -> None:
        self.node_changed(node)

    def node_changed(self, node: NodeRecord) -> None:
        self._dirty.add(node.node_id)
        if not self._refresh_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop: refreshed on the next scrape
                return
            self._refresh_scheduled = True
            loop.call_later(self.REFRESH_DELAY_S, self._scheduled_refresh)

    def _scheduled_refresh(self) -> None:
        self._refresh_scheduled = False
        try:
            self.refresh()
        except Exception:
            log.exception("rendering the exposition failed; retrying with the next change")

    def refresh(self) -> int:
        """Re-render the nodes that changed since the last refresh; return how many."""
        if not self._dirty:
            return 0
        dirty, self._dirty = self._dirty, set()
        totals = self._totals
        shares_changed = False
        for node_id in dirty:
            node = self._state.get(node_id)
            lines = self._nodes.get(node_id)
            if node is None:
                if lines is not None:
                    del self._nodes[node_id]
                    shares_changed |= totals.replace(lines.contribution, {})
                    for view in self._views_of(lines):
                        view.members.remove(lines)
                        view.invalidate(f for f, chunk in enumerate(lines.chunks) if chunk)
                continue
            added = lines is None
            if lines is None:
                lines = self._nodes[node_id] = _NodeLines(node_id)
            share = lines.contribution
            changed = lines.render(node)
            for view in self._views_of(lines):
                if added:
                    view.members.append(lines)
                view.invalidate(changed)
            shares_changed |= totals.replace(share, lines.contribution)
        if shares_changed:
            self._aggregates = render_aggregates(totals).encode()
        return len(dirty)

    def _views_of(self, lines: _NodeLines) -> Iterator[_View]:
        for shards in self._shard_counts:
            view = self._views.get((lines.crc % shards, shards))
            if view is not None:
                yield view

    def _view(self, shard: int, shards: int) -> _View:
        key = (shard, shards)
        view = self._views.pop(key, None)
        if view is None:
            view = _View([lines for lines in self._nodes.values() if lines.crc % shards == shard])
            self._shard_counts[shards] += 1
            if len(self._views) >= self.MAX_VIEWS:
                oldest = next(iter(self._views))
                del self._views[oldest]
                self._shard_counts[oldest[1]] -= 1
                if not self._shard_counts[oldest[1]]:
                    del self._shard_counts[oldest[1]]
        self._views[key] = view
        return view

    def totals(self) -> FleetTotals:
        """The fleet's running totals, current (what the aggregates are rendered from)."""
        self.refresh()
        return self._totals

    def fleet(self) -> bytes:
        """The small view: fleet aggregates and the collector's own metrics."""
        self.refresh()
        return self._aggregates + self._extra()

    def nodes(self, shard: int = 0, shards: int = 1) -> Body:
        """Every per-node and per-GPU series, or one shard of them."""
        self.refresh()
        view = self._view(shard, shards)
        if view.body is None:
            view.body = Body(view.build(self._headers))
        return view.body

    def everything(self) -> Body:
        """Every node's and GPU's series, then the fleet aggregates and the collector's own metrics."""
        self.refresh()
        return Body(self._view(0, 1).build(self._headers), self.fleet())
