"""Who holds the fleet's GPUs, how much of that is idle, and what it costs: the workload ledger.

Each node's agent says who holds its GPUs (Allocations, docs/attribution.md). The ledger turns
that and the GPUs' latest samples into each node's share: GPUs allocated per workload (cluster,
namespace, job, user), of those the idle ones by utilization and by SM activity, and GPUs no one
holds. Shares are summed into running totals (gauges) and integrated over time into GPU-seconds
(counters), so Prometheus can answer for any window and any price; with ``--price`` the collector
also counts what those GPU-seconds cost.

Counting is in integer units (UNITS_PER_GPU to a GPU) so that running sums stay exact: a MIG
instance is its compute slices out of 7, and a GPU (or instance) held by several workloads is
split evenly between them. A node counts while it is up, and a GPU while it is in the node's
inventory; a GPU counts as idle only when its latest read succeeded and said so.

Nodes that changed are taken in batches REFRESH_DELAY_S after the first change, so a transition
(a job starts, a GPU goes idle) is dated within that delay; a node whose inputs did not change
(the same allocations and the same idle flags) costs one comparison.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from gpufleet.allocations import Prices
from gpufleet.collector.exposition.aggregates import _cluster_model
from gpufleet.collector.exposition.catalog import (
    FLEET_ALLOCATED,
    FLEET_UNALLOCATED,
    WORKLOAD_COST,
    WORKLOAD_GPU_SECONDS,
    WORKLOAD_GPUS,
    WORKLOAD_IDLE_COST,
    WORKLOAD_IDLE_GPU_SECONDS,
    WORKLOAD_IDLE_GPUS,
)
from gpufleet.collector.exposition.textformat import Family, escape_label_value
from gpufleet.collector.sinks import BatchedSink
from gpufleet.collector.state import UP, FleetState, GpuRecord, NodeRecord
from gpufleet.definitions import IDLE_SM_ACTIVE_PPM, IDLE_UTILIZATION_PERCENT
from gpufleet.v1 import allocation_pb2, telemetry_pb2

# 7! : a whole GPU, divisible by every MIG slice count (1-7) and by up to 7 sharing workloads.
UNITS_PER_GPU = 5040
MIG_SLICES_PER_GPU = 7
# The measures by which an allocated GPU can be idle (the `by` label).
BY_UTILIZATION = "utilization"
BY_SM_ACTIVE = "sm_active"
MEASURES = (BY_UTILIZATION, BY_SM_ACTIVE)
# A workload's counters are kept this long after it last held a GPU, then dropped (its series end).
RETENTION_S = 3600.0
EXPIRE_EVERY_S = 60.0
# Where each kind of workload share goes in the per-workload lists of _gauges and _accrued.
_KIND_POSITION = {"gpus": 0, "idle_utilization": 1, "idle_sm_active": 2}
_OK = telemetry_pb2.GPU_READ_STATUS_OK
# "3g.40gb": 3 slices; a compute instance's profile "1c.3g.40gb": its 1 slice of the 3.
_PROFILE_SLICES = re.compile(r"^(?:(\d+)c\.)?(\d+)g\.")

# (cluster, namespace, job, user)
WorkloadKey = tuple[str, str, str, str]


def workload_key(cluster: str, allocation: allocation_pb2.Allocation) -> WorkloadKey:
    return (cluster, allocation.namespace, allocation.job, allocation.user)


@dataclass(slots=True)
class Slot:
    """A GPU or one MIG instance, as the ledger last saw it."""

    gpu_index: int
    gpu_instance_id: int | None
    model: str
    units: int
    allocations: tuple[allocation_pb2.Allocation, ...]
    # Unix times (ns): since when the same workloads hold it, and since when it is idle (0: it is not).
    allocated_since_ns: int = 0
    idle_since_ns: int = 0
    idle_by: tuple[bool, bool] = (False, False)  # by utilization, by SM activity


@dataclass(slots=True)
class _NodeWork:
    signature: tuple[object, ...] = ()
    share: dict[tuple[str, ...], int] = field(default_factory=dict)
    slots: dict[tuple[int, int | None], Slot] = field(default_factory=dict)


@dataclass(slots=True)
class _Counter:
    """Unit-seconds accrued, and the rate (units) at which it grows now."""

    accrued: float = 0.0
    rate: int = 0
    since: float = 0.0
    # When the rate last dropped to 0 (monotonic), for RETENTION_S.
    zero_since: float = 0.0

    def value(self, now: float) -> float:
        return self.accrued + self.rate * (now - self.since)


# The four (idle by utilization, idle by SM activity) pairs, made once: one per GPU would add up.
_FLAGS = {(u, s): (u, s) for u in (False, True) for s in (False, True)}


def _idle_flags(sample: telemetry_pb2.GpuSample | telemetry_pb2.MigSample) -> tuple[bool, bool]:
    by_utilization = (
        isinstance(sample, telemetry_pb2.GpuSample)
        and sample.HasField("gpu_utilization_percent")
        and sample.gpu_utilization_percent < IDLE_UTILIZATION_PERCENT
    )
    by_sm = sample.HasField("sm_active_ppm") and sample.sm_active_ppm < IDLE_SM_ACTIVE_PPM
    return _FLAGS[by_utilization, by_sm]


def mig_units(profile: str) -> int:
    """A MIG instance's share of its GPU, in units: its compute slices out of 7 ("3g.40gb": 3)."""
    match = _PROFILE_SLICES.match(profile)
    slices = int(match.group(1) or match.group(2)) if match else 1
    return UNITS_PER_GPU * min(max(slices, 1), MIG_SLICES_PER_GPU) // MIG_SLICES_PER_GPU


def _readable(node: NodeRecord, gpu: GpuRecord) -> telemetry_pb2.GpuSample | None:
    sample = gpu.sample
    if sample is None or sample.read_status != _OK:
        return None
    return sample


def _signature(node: NodeRecord) -> tuple[object, ...]:
    """What the node's share follows from: if this is unchanged, so is the share.

    Each whole GPU adds three bits to one integer (present and read, idle by utilization, idle
    by SM activity); MIG GPUs, rare, add a tuple of their instances' flags.
    """
    if node.state != UP:
        return (node.state,)
    code = 0
    mig: list[object] = []
    for index, gpu in node.gpus.items():
        code <<= 3
        if gpu.missing:
            continue
        sample = _readable(node, gpu)
        if sample is None:
            code |= 1
        elif gpu.inventory.mig_instances:
            mig.append((index, tuple(_idle_flags(m) for m in sample.mig_instances)))
        else:
            by_utilization, by_sm = _idle_flags(sample)
            code |= 2 | (by_utilization << 2) | by_sm
    return (node.state, node.allocation_version, node.inventory_version, code, tuple(mig))


def _slots(node: NodeRecord) -> Iterator[tuple[Slot, tuple[bool, bool] | None]]:
    """Every GPU (or MIG instance) of an up node, with its allocations and idle flags (None: unread)."""
    by_target: dict[tuple[int, int | None], list[allocation_pb2.Allocation]] = {}
    if node.allocations is not None:
        for allocation in node.allocations.allocations:
            gi = allocation.gpu_instance_id if allocation.HasField("gpu_instance_id") else None
            by_target.setdefault((allocation.gpu_index, gi), []).append(allocation)
    for index in sorted(node.gpus):
        gpu = node.gpus[index]
        if gpu.missing:
            continue
        sample = _readable(node, gpu)
        whole = by_target.get((index, None), [])
        migs = gpu.inventory.mig_instances
        if not migs:
            slot = Slot(index, None, gpu.model, UNITS_PER_GPU, tuple(whole))
            yield slot, (_idle_flags(sample) if sample is not None else None)
            continue
        mig_samples = {m.gpu_instance_id: m for m in sample.mig_instances} if sample is not None else {}
        for mig in migs:
            gi = mig.gpu_instance_id
            held = by_target.get((index, gi)) or whole  # a whole-GPU allocation holds every instance
            mig_sample = mig_samples.get(gi)
            slot = Slot(index, gi, gpu.model, mig_units(mig.profile), tuple(held))
            yield slot, (_idle_flags(mig_sample) if mig_sample is not None else None)


@dataclass(frozen=True)
class WorkloadRow:
    """One workload's GPUs now and its GPU-seconds so far (what the CLI's jobs and idle show)."""

    key: WorkloadKey
    gpus: float
    idle_gpus: dict[str, float]
    gpu_seconds: float
    idle_gpu_seconds: dict[str, float]
    cost: float | None
    idle_cost: dict[str, float] | None


class WorkloadLedger(BatchedSink):
    """Keeps each node's share of the workloads current, their totals and their GPU-seconds."""

    name = "workloads"
    REFRESH_DELAY_S = 0.5
    doing = "accounting the workloads"

    def __init__(
        self,
        state: FleetState,
        prices: Prices | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._state = state
        self.prices = prices or Prices()
        self._clock = clock
        self._wall_ns = wall_clock_ns
        self._nodes: dict[str, _NodeWork] = {}
        super().__init__()
        self._dirty = {node.node_id for node in state.nodes()}
        # ("gpus"|"idle_utilization"|"idle_sm_active", cluster, namespace, job, user, model) -> units,
        # ("allocated"|"unallocated", cluster, model) -> units.
        self._totals: dict[tuple[str, ...], int] = {}
        self._counters: dict[tuple[str, ...], _Counter] = {}
        self._expired_at = clock()
        # Bumped when a total changes: the gauges are rendered again only then.
        self._version = 0
        self._gauge_text: tuple[int, bytes] = (-1, b"")
        self._label_cache: dict[WorkloadKey, str] = {}

    # -- the sink ----------------------------------------------------------------------

    def refresh(self) -> None:
        """Take in the nodes that changed since the last refresh."""
        now = self._clock()
        if now - self._expired_at > EXPIRE_EVERY_S:
            self._expired_at = now
            self._expire(now)
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        now_ns = self._wall_ns()
        for node_id in dirty:
            node = self._state.get(node_id)
            work = self._nodes.get(node_id)
            if node is None:
                if work is not None:
                    del self._nodes[node_id]
                    self._account(work.share, {}, now)
                continue
            if work is None:
                work = self._nodes[node_id] = _NodeWork()
            signature = _signature(node)
            if signature == work.signature:
                continue
            work.signature = signature
            share, slots = self._share(node, work.slots, now_ns)
            self._account(work.share, share, now)
            work.share, work.slots = share, slots

    # -- shares ------------------------------------------------------------------------

    def _share(
        self, node: NodeRecord, before: dict[tuple[int, int | None], Slot], now_ns: int
    ) -> tuple[dict[tuple[str, ...], int], dict[tuple[int, int | None], Slot]]:
        share: dict[tuple[str, ...], int] = {}
        slots: dict[tuple[int, int | None], Slot] = {}
        if node.state != UP:
            return share, slots
        cluster = node.cluster
        for slot, flags in _slots(node):
            model = slot.model
            target = (slot.gpu_index, slot.gpu_instance_id)
            slots[target] = slot
            key: tuple[str, ...]
            if not slot.allocations:
                key = ("unallocated", cluster, model)
                share[key] = share.get(key, 0) + slot.units
                continue
            key = ("allocated", cluster, model)
            share[key] = share.get(key, 0) + slot.units
            previous = before.get(target)
            if previous is None or previous.allocations != slot.allocations:
                previous = None  # new holders: their time starts now
            slot.allocated_since_ns = previous.allocated_since_ns if previous else now_ns
            slot.idle_by = flags or (False, False)
            if any(slot.idle_by):
                slot.idle_since_ns = previous.idle_since_ns if previous and previous.idle_since_ns else now_ns
            workloads = sorted({workload_key(cluster, a) for a in slot.allocations})
            part = slot.units // len(workloads)
            for workload in workloads:
                for kind, counts in (
                    ("gpus", True),
                    ("idle_utilization", slot.idle_by[0]),
                    ("idle_sm_active", slot.idle_by[1]),
                ):
                    if counts:
                        key = (kind, *workload, model)
                        share[key] = share.get(key, 0) + part
        return share, slots

    def _account(self, old: dict[tuple[str, ...], int], new: dict[tuple[str, ...], int], now: float) -> None:
        if old == new:
            return
        self._version += 1
        totals = self._totals
        for key in old.keys() | new.keys():
            change = new.get(key, 0) - old.get(key, 0)
            if not change:
                continue
            total = totals.get(key, 0) + change
            if total:
                totals[key] = total
            else:
                totals.pop(key, None)
            if key[0] in _KIND_POSITION:
                counter = self._counters.get(key)
                if counter is None:
                    counter = self._counters[key] = _Counter(since=now)
                counter.accrued = counter.value(now)
                counter.since = now
                counter.rate = total
                if not total:
                    counter.zero_since = now

    def _expire(self, now: float) -> None:
        expired = [
            key
            for key, counter in self._counters.items()
            if not counter.rate and now - counter.zero_since > RETENTION_S
        ]
        for key in expired:
            del self._counters[key]
        if expired:
            self._label_cache.clear()

    # -- readers -----------------------------------------------------------------------

    def slots(self) -> Iterator[tuple[NodeRecord, Slot]]:
        """Every GPU and MIG instance of the up nodes, as last accounted."""
        self.refresh()
        for node_id, work in self._nodes.items():
            node = self._state.get(node_id)
            if node is not None:
                for slot in work.slots.values():
                    yield node, slot

    def gpu_slots(self, node_id: str, gpu_index: int) -> list[Slot]:
        """The GPU's slot (or its MIG instances' slots), as last accounted."""
        self.refresh()
        work = self._nodes.get(node_id)
        if work is None:
            return []
        return [slot for (index, _), slot in work.slots.items() if index == gpu_index]

    def _gauges(self) -> dict[WorkloadKey, list[int]]:
        """Units held now per workload: [allocated, idle by utilization, idle by SM activity]."""
        gauges: dict[WorkloadKey, list[int]] = {}
        for key, units in self._totals.items():
            position = _KIND_POSITION.get(key[0])
            if position is not None:
                workload = (key[1], key[2], key[3], key[4])
                per = gauges.get(workload)
                if per is None:
                    per = gauges[workload] = [0, 0, 0]
                per[position] += units
        return gauges

    def _accrued(
        self, now: float
    ) -> tuple[dict[WorkloadKey, list[float | None]], dict[WorkloadKey, list[float | None]]]:
        """GPU-seconds per workload so far (per kind, as _gauges; None: never), and their cost if priced."""
        seconds: dict[WorkloadKey, list[float | None]] = {}
        costs: dict[WorkloadKey, list[float | None]] = {}
        for key, counter in self._counters.items():
            position = _KIND_POSITION[key[0]]
            workload = (key[1], key[2], key[3], key[4])
            value = counter.value(now) / UNITS_PER_GPU
            per = seconds.get(workload)
            if per is None:
                per = seconds[workload] = [None, None, None]
            per[position] = (per[position] or 0.0) + value
            price = self.prices.per_hour(key[5])
            if price is not None:
                per = costs.get(workload)
                if per is None:
                    per = costs[workload] = [None, None, None]
                per[position] = (per[position] or 0.0) + value * price / 3600
        return seconds, costs

    def rows(self) -> list[WorkloadRow]:
        """Every workload that holds GPUs now or held some within RETENTION_S, by its key."""
        self.refresh()
        gauges = self._gauges()
        seconds, costs = self._accrued(self._clock())
        rows = []
        for key in sorted(gauges.keys() | seconds.keys()):
            g = gauges.get(key, [0, 0, 0])
            s = [value or 0.0 for value in seconds.get(key, [None, None, None])]
            c = [value or 0.0 for value in costs[key]] if key in costs else None
            rows.append(
                WorkloadRow(
                    key=key,
                    gpus=g[0] / UNITS_PER_GPU,
                    idle_gpus={by: g[i + 1] / UNITS_PER_GPU for i, by in enumerate(MEASURES)},
                    gpu_seconds=s[0],
                    idle_gpu_seconds={by: s[i + 1] for i, by in enumerate(MEASURES)},
                    cost=c[0] if c is not None else None,
                    idle_cost={by: c[i + 1] for i, by in enumerate(MEASURES)} if c is not None else None,
                )
            )
        return rows

    def _fleet_units(self, kind: str) -> list[tuple[tuple[str, str], int]]:
        """Units of reachable GPUs by (cluster, model): kind "allocated" or "unallocated"."""
        return sorted(((key[1], key[2]), units) for key, units in self._totals.items() if key[0] == kind)

    def fleet_gpus(self) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
        """Allocated and unallocated GPUs by (cluster, model)."""
        self.refresh()
        allocated, unallocated = (
            {key: units / UNITS_PER_GPU for key, units in self._fleet_units(kind)}
            for kind in ("allocated", "unallocated")
        )
        return allocated, unallocated

    def _labels(self, key: WorkloadKey) -> str:
        labels = self._label_cache.get(key)
        if labels is None:
            labels = self._label_cache[key] = _labels(key)
        return labels

    def render(self) -> bytes:
        """The workload families of the fleet view: gauges rendered when they change, counters now."""
        self.refresh()
        if self._gauge_text[0] != self._version:
            self._gauge_text = (self._version, self._render_gauges())
        return self._gauge_text[1] + self._render_counters(self._clock())

    def _render_gauges(self) -> bytes:
        gauges = sorted(self._gauges().items())
        out: list[str] = []
        _family(out, WORKLOAD_GPUS, ((self._labels(key), units) for key, (units, _, _) in gauges if units))
        _family(
            out,
            WORKLOAD_IDLE_GPUS,
            (
                (f'{self._labels(key)},by="{by}"', per[i + 1])
                for key, per in gauges
                if per[0]
                for i, by in enumerate(MEASURES)
            ),
        )
        for family, kind in ((FLEET_ALLOCATED, "allocated"), (FLEET_UNALLOCATED, "unallocated")):
            _family(out, family, ((_cluster_model(*key), units) for key, units in self._fleet_units(kind)))
        return "".join(out).encode()

    def _render_counters(self, now: float) -> bytes:
        """The counters, as they stand now; a workload's idle ones from when it was first idle."""
        seconds, costs = self._accrued(now)
        out: list[str] = []
        for (total, idle), accrued in (
            ((WORKLOAD_GPU_SECONDS, WORKLOAD_IDLE_GPU_SECONDS), seconds),
            ((WORKLOAD_COST, WORKLOAD_IDLE_COST), costs),
        ):
            if accrued is costs and not self.prices:
                continue
            rows = sorted(accrued.items())
            _family(
                out, total, ((self._labels(key), per[0]) for key, per in rows if per[0] is not None), units=1
            )
            _family(
                out,
                idle,
                (
                    (f'{self._labels(key)},by="{by}"', value)
                    for key, per in rows
                    for by, value in zip(MEASURES, per[1:], strict=True)
                    if value is not None
                ),
                units=1,
            )
        return "".join(out).encode()


def _family(
    out: list[str], family: Family, lines: Iterable[tuple[str, float]], units: int = UNITS_PER_GPU
) -> None:
    """A family's header and lines; values in ``units`` to one (whole numbers written as such)."""
    out.append(family.header())
    name = family.name
    for labels, value in lines:
        if units == 1:
            text = repr(float(value))
        elif value % units:
            text = repr(value / units)
        else:
            text = str(int(value) // units)
        out.append(f"{name}{{{labels}}} {text}\n")


def _labels(key: WorkloadKey, by: str | None = None) -> str:
    cluster, namespace, job, user = key
    labels = (
        f'cluster="{escape_label_value(cluster)}",namespace="{escape_label_value(namespace)}",'
        f'hpc_job="{escape_label_value(job)}",user="{escape_label_value(user)}"'
    )
    return labels if by is None else f'{labels},by="{by}"'


# -- groups of workloads, for the query API ------------------------------------------------

GROUPS = ("workload", "namespace", "user", "cluster")


@dataclass
class WorkloadGroup:
    """The GPUs a group of workloads holds now, as the query API reports them."""

    key: dict[str, str]
    units: int = 0
    nodes: set[str] = field(default_factory=set)
    idle_units_by_model: dict[str, int] = field(default_factory=dict)
    # unit-seconds idle, per model
    idle_unit_seconds_by_model: dict[str, float] = field(default_factory=dict)
    since_ns: int = 0
    # (sum of value x units, units) per measure: utilization, sm_active, tensor_active
    means: dict[str, tuple[float, int]] = field(default_factory=dict)

    def mean(self, measure: str) -> float | None:
        total, units = self.means.get(measure, (0.0, 0))
        return total / units if units else None


def _group_key(group_by: str, cluster: str, allocation: allocation_pb2.Allocation) -> dict[str, str]:
    if group_by == "workload":
        key = {"cluster": cluster, "source": allocation.source, "user": allocation.user}
        if allocation.job:
            key |= {"job": allocation.job, "job_name": allocation.job_name}
        else:
            key |= {"namespace": allocation.namespace, "pod": allocation.pod}
        return key
    if group_by == "cluster":
        return {"cluster": cluster}
    return {"cluster": cluster, group_by: getattr(allocation, group_by)}


def _measures(node: NodeRecord, slot: Slot) -> Iterator[tuple[str, float]]:
    """The slot's utilization (whole GPUs only), SM and tensor activity (0-1), where reported."""
    gpu = node.gpus.get(slot.gpu_index)
    sample = gpu.sample if gpu is not None else None
    if sample is None or sample.read_status != _OK:
        return
    values: telemetry_pb2.GpuSample | telemetry_pb2.MigSample = sample
    if slot.gpu_instance_id is not None:
        mig = next((m for m in sample.mig_instances if m.gpu_instance_id == slot.gpu_instance_id), None)
        if mig is None:
            return
        values = mig
    elif sample.HasField("gpu_utilization_percent"):
        yield "utilization", sample.gpu_utilization_percent / 100
    for measure, field_name in (("sm_active", "sm_active_ppm"), ("tensor_active", "tensor_active_ppm")):
        if values.HasField(field_name):
            yield measure, getattr(values, field_name) / 1_000_000


def group_workloads(
    slots: Iterable[tuple[NodeRecord, Slot]], group_by: str, idle_for_s: float, now_ns: int, cluster: str = ""
) -> list[WorkloadGroup]:
    """The held GPUs of ``slots`` by group, with the idle ones (idle at least ``idle_for_s``)."""
    if group_by not in GROUPS:
        raise ValueError(f"unknown grouping {group_by!r}; choose one of {', '.join(GROUPS)}")
    groups: dict[tuple[tuple[str, str], ...], WorkloadGroup] = {}
    for node, slot in slots:
        if not slot.allocations or (cluster and node.cluster != cluster):
            continue
        keys = {tuple(sorted(_group_key(group_by, node.cluster, a).items())) for a in slot.allocations}
        part = slot.units // len(keys)
        idle_s = (now_ns - slot.idle_since_ns) / 1e9 if slot.idle_since_ns else -1.0
        measures = list(_measures(node, slot))
        for key in sorted(keys):
            group = groups.get(key)
            if group is None:
                group = groups[key] = WorkloadGroup(dict(key))
            group.units += part
            group.nodes.add(node.node_id)
            if not group.since_ns or slot.allocated_since_ns < group.since_ns:
                group.since_ns = slot.allocated_since_ns
            if idle_s >= idle_for_s:
                model = slot.model
                group.idle_units_by_model[model] = group.idle_units_by_model.get(model, 0) + part
                seconds = group.idle_unit_seconds_by_model
                seconds[model] = seconds.get(model, 0.0) + part * idle_s
            for measure, value in measures:
                total, units = group.means.get(measure, (0.0, 0))
                group.means[measure] = (total + value * part, units + part)
    return list(groups.values())
