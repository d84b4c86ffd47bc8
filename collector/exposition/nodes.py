"""One node's lines: a chunk per family, values formatted by one %-operation on a shared template."""

from __future__ import annotations

import functools
import logging
import operator
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gpufleet.collector import health
from gpufleet.collector.exposition.aggregates import _line
from gpufleet.collector.exposition.catalog import (
    FAMILIES,
    GPU_ALLOCATION_INFO,
    GPU_HEALTH,
    GPU_INFO,
    GPU_MEMORY_TOTAL,
    GPU_POWER_LIMIT,
    GPU_PROCESSES,
    GPU_RMA_DUE,
    GPU_UP,
    GPU_XIDS,
    LABELLED_GAUGES,
    MIG_ACTIVITY,
    MIG_INFO,
    MIG_MEMORY_TOTAL,
    MIG_MEMORY_USED,
    MIG_PROCESSES,
    NODE_AGENT_ATTRIBUTION_ERRORS,
    NODE_AGENT_ATTRIBUTION_TRUNCATED,
    NODE_AGENT_INVALID,
    NODE_AGENT_RECONNECTS,
    NODE_AGENT_REPORTS_DROPPED,
    NODE_ATTRIBUTION_AVAILABLE,
    NODE_FAMILY_COUNT,
    NODE_GPUS,
    NODE_INFO,
    NODE_LAST_SEEN,
    NODE_STATE,
    SAMPLE_GAUGES,
)
from gpufleet.collector.exposition.textformat import escape_label_value
from gpufleet.collector.state import NODE_STATE_NAMES, UP, GpuRecord, NodeRecord
from gpufleet.collector.totals import Contribution, ModelShare, contribution
from gpufleet.v1 import allocation_pb2, telemetry_pb2

log = logging.getLogger(__name__)

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
NODE_VALUE_FAMILIES = (
    NODE_LAST_SEEN,
    NODE_AGENT_INVALID,
    NODE_AGENT_REPORTS_DROPPED,
    NODE_AGENT_RECONNECTS,
    NODE_AGENT_ATTRIBUTION_ERRORS,
    NODE_AGENT_ATTRIBUTION_TRUNCATED,
)
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
    template of the node's shape. Inventory, liveness, health, RMA and XID lines
    are rendered again only when they change. (Slots and tuples: at 100,000 GPUs,
    fewer objects for Python's garbage collector to walk.)
    """

    __slots__ = (
        "_allocation_key",
        "_health_key",
        "_inventory_key",
        "_label",
        "_label_bytes",
        "_mig_key",
        "_name",
        "_rma_key",
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
        self._rma_key: tuple[int, ...] | None = None
        self._up_key: tuple[bool, ...] | None = None
        self._xid_key: tuple[object, ...] = ()
        self._allocation_key: tuple[int, int, int] | None = None
        self._mig_key: tuple[object, ...] = ()

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
                (FAMILIES[NODE_STATE].name, f',state="{name}"', int(state == known))
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
            stats.attribution_errors_total,
            stats.attribution_values_truncated_total,
        ]
        shape = []
        mig_samples: list[tuple[int, telemetry_pb2.GpuSample]] = []
        verdicts = []
        oks = []
        due = []
        by_model: dict[str, ModelShare] = {}
        for gpu in gpus:
            record = gpu.serial_record
            if record is not None and record.rma_due and not gpu.missing:
                due.append(gpu)
            health_now = node.gpu_verdict(gpu).health
            verdicts.append(health_now)
            model = gpu.model
            part = by_model.get(model)
            if part is None:
                part = by_model[model] = ModelShare()
            healths = part.healths
            name = _HEALTH_NAMES[health_now]
            healths[name] = healths.get(name, 0) + 1
            sample = gpu.sample
            if not (up and sample is not None and not gpu.missing and sample.read_status == _OK):
                oks.append(False)
                continue
            oks.append(True)
            if sample.mig_instances:
                mig_samples.append((gpu.inventory.index, sample))
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
                (FAMILIES[GPU_HEALTH].name, f',gpu="{gpu.inventory.index}",state="{name}"', int(now == known))
                for gpu, now in zip(gpus, health_key, strict=True)
                for known, name in health.HEALTH_NAMES.items()
            )
        rma_key = tuple(gpu.inventory.index for gpu in due)
        if rma_key != self._rma_key:
            self._rma_key = rma_key
            new[GPU_RMA_DUE] = self._lines(
                (FAMILIES[GPU_RMA_DUE].name, f',gpu="{index}"', 1) for index in rma_key
            )
        up_key = tuple(oks)
        if up_key != self._up_key:
            self._up_key = up_key
            new[GPU_UP] = self._lines(
                (FAMILIES[GPU_UP].name, f',gpu="{gpu.inventory.index}"', int(ok))
                for gpu, ok in zip(gpus, oks, strict=True)
            )
        if self._xid_key or any(gpu.xid_totals for gpu in gpus):
            self._render_xids(gpus, new)
        # The lines name the GPUs' UUIDs, and only GPUs the node has (a sample may add one).
        allocation_key = (node.allocation_version, node.inventory_version, len(node.gpus))
        if allocation_key != self._allocation_key:
            self._allocation_key = allocation_key
            self._render_allocations(node, new)
        if mig_samples or self._mig_key:
            self._render_mig_samples(mig_samples, new)
        self._fill(_template(tuple(shape)), values, new)
        self.contribution = contribution(node.inventory.cluster, NODE_STATE_NAMES[state], by_model)
        for gpu in due:  # ("rma", cluster, model) -> GPUs due for RMA (gpufleet_fleet_gpus_rma_due)
            key = ("rma", node.inventory.cluster, gpu.model)
            self.contribution[key] = self.contribution.get(key, 0) + 1
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
        new[NODE_INFO] = self._lines([(FAMILIES[NODE_INFO].name, node_labels, 1)])
        new[NODE_GPUS] = self._lines([(FAMILIES[NODE_GPUS].name, "", len(node.gpus))])
        driver = escape_label_value(inv.driver_version)
        info, memory, power = [], [], []
        for gpu in gpus:
            gpu_inv = gpu.inventory
            labels = f',gpu="{gpu_inv.index}"'
            info.append(
                (
                    FAMILIES[GPU_INFO].name,
                    f'{labels},uuid="{escape_label_value(gpu_inv.uuid)}",'
                    f'model="{escape_label_value(gpu.model)}",'
                    f'serial="{escape_label_value(gpu_inv.serial)}",'
                    f'pci_bus_id="{escape_label_value(gpu_inv.pci_bus_id)}",'
                    f'driver_version="{driver}"',
                    1,
                )
            )
            if gpu_inv.HasField("memory_total_bytes"):
                memory.append((FAMILIES[GPU_MEMORY_TOTAL].name, labels, gpu_inv.memory_total_bytes))
            if gpu_inv.HasField("power_limit_enforced_milliwatts"):
                watts = gpu_inv.power_limit_enforced_milliwatts / 1000
                power.append((FAMILIES[GPU_POWER_LIMIT].name, labels, watts))
        new[GPU_INFO] = self._lines(info)
        new[GPU_MEMORY_TOTAL] = self._lines(memory)
        new[GPU_POWER_LIMIT] = self._lines(power)
        mig_info, mig_memory = [], []
        for gpu in gpus:
            for mig in gpu.inventory.mig_instances:
                labels = f',gpu="{gpu.inventory.index}",mig="{mig.gpu_instance_id}"'
                mig_info.append(
                    (
                        FAMILIES[MIG_INFO].name,
                        f'{labels},uuid="{escape_label_value(mig.uuid)}",'
                        f'profile="{escape_label_value(mig.profile)}",'
                        f'compute_instance="{mig.compute_instance_id}"',
                        1,
                    )
                )
                if mig.HasField("memory_total_bytes"):
                    mig_memory.append((FAMILIES[MIG_MEMORY_TOTAL].name, labels, mig.memory_total_bytes))
        new[MIG_INFO] = self._lines(mig_info)
        new[MIG_MEMORY_TOTAL] = self._lines(mig_memory)

    def _render_allocations(self, node: NodeRecord, new: list[bytes]) -> None:
        """One info line per allocation of a GPU (or MIG instance) the node has; sources' availability."""
        allocations = node.allocations or allocation_pb2.Allocations()
        lines = []
        for allocation in allocations.allocations:
            gpu = node.gpus.get(allocation.gpu_index)
            if gpu is None:
                continue
            uuid, mig = gpu.inventory.uuid, ""
            if allocation.HasField("gpu_instance_id"):
                mig = str(allocation.gpu_instance_id)
                uuid = next(
                    (
                        m.uuid
                        for m in gpu.inventory.mig_instances
                        if m.gpu_instance_id == allocation.gpu_instance_id
                    ),
                    "",
                )
            values = "".join(
                f',{key}="{escape_label_value(value)}"'
                for key, value in (
                    ("namespace", allocation.namespace),
                    ("pod", allocation.pod),
                    ("container", allocation.container),
                    ("hpc_job", allocation.job),
                    ("user", allocation.user),
                    ("account", allocation.account),
                )
            )
            labels = f',gpu="{allocation.gpu_index}",uuid="{escape_label_value(uuid)}",mig="{mig}"{values}'
            lines.append((FAMILIES[GPU_ALLOCATION_INFO].name, labels, 1))
        new[GPU_ALLOCATION_INFO] = self._lines(dict.fromkeys(lines))
        new[NODE_ATTRIBUTION_AVAILABLE] = self._lines(
            (
                FAMILIES[NODE_ATTRIBUTION_AVAILABLE].name,
                f',source="{escape_label_value(source.name)}"',
                int(source.available),
            )
            for source in {source.name: source for source in allocations.sources}.values()
        )

    def _render_mig_samples(
        self, samples: list[tuple[int, telemetry_pb2.GpuSample]], new: list[bytes]
    ) -> None:
        """The MIG instances' memory, processes and activity (MIG nodes only: not templated)."""
        key = tuple((index, tuple(sample.mig_instances)) for index, sample in samples)
        if key == self._mig_key:
            return
        self._mig_key = key
        used: list[tuple[str, str, float | int]] = []
        processes: list[tuple[str, str, float | int]] = []
        activity: dict[int, list[tuple[str, str, float | int]]] = {family: [] for family, _ in MIG_ACTIVITY}
        for index, sample in samples:
            for mig in sample.mig_instances:
                labels = f',gpu="{index}",mig="{mig.gpu_instance_id}"'
                if mig.HasField("memory_used_bytes"):
                    used.append((FAMILIES[MIG_MEMORY_USED].name, labels, mig.memory_used_bytes))
                if mig.HasField("processes"):
                    processes.append((FAMILIES[MIG_PROCESSES].name, labels, len(mig.processes.processes)))
                for family, field_name in MIG_ACTIVITY:
                    if mig.HasField(field_name):
                        activity[family].append(
                            (FAMILIES[family].name, labels, getattr(mig, field_name) / 1e6)
                        )
        new[MIG_MEMORY_USED] = self._lines(used)
        new[MIG_PROCESSES] = self._lines(processes)
        for family, lines in activity.items():
            new[family] = self._lines(lines)

    def _render_xids(self, gpus: list[GpuRecord], new: list[bytes]) -> None:
        key = tuple((gpu.inventory.index, tuple(sorted(gpu.xid_totals.items()))) for gpu in gpus)
        if key == self._xid_key:
            return
        self._xid_key = key if any(totals for _, totals in key) else ()
        new[GPU_XIDS] = self._lines(
            (FAMILIES[GPU_XIDS].name, f',gpu="{index}",xid="{code}"', count)
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
