"""QueryService: the fleet summary, nodes, GPUs (filtered, sorted, paged), one node, and the GPUs'
reliability records (one by serial or UUID, and those due for RMA)."""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc

from gpufleet.collector import health
from gpufleet.collector.eventlog import EventFollowers, EventMatch
from gpufleet.collector.reliability import SerialRecord
from gpufleet.collector.state import UP, FleetState, GpuRecord, NodeRecord, NodeState
from gpufleet.collector.totals import FleetTotals
from gpufleet.collector.workload import GROUPS, UNITS_PER_GPU, Slot, WorkloadLedger, group_workloads
from gpufleet.v1 import allocation_pb2, events_pb2, query_pb2, query_pb2_grpc, telemetry_pb2

DEFAULT_PAGE_SIZE = 1000
# Events a follower of StreamEvents may fall behind before it is cut off.
FOLLOW_QUEUE = 10_000
# A GpuView is at most a few KiB: this keeps every page well under 4 MiB.
MAX_PAGE_SIZE = 1000

T = TypeVar("T")

GpuRow = tuple[NodeRecord, GpuRecord]


def _sample_value(field_name: str) -> Callable[[telemetry_pb2.GpuSample | None, int], Any]:
    def value(sample: telemetry_pb2.GpuSample | None, health_code: int) -> Any:
        return getattr(sample, field_name) if sample is not None and sample.HasField(field_name) else -1

    return value


# What ListGpus sorts by: a value from a GPU's sample and verdict. Rows are ordered by
# (value, node name, GPU index), so that pages, and pages merged from a tier's collectors, agree.
GPU_SORT_KEYS: dict[str, Callable[[telemetry_pb2.GpuSample | None, int], Any]] = {
    "node": lambda sample, health_code: 0,
    "utilization": _sample_value("gpu_utilization_percent"),
    "temperature": _sample_value("gpu_temperature_celsius"),
    "power": _sample_value("power_draw_milliwatts"),
    "memory": _sample_value("memory_used_bytes"),
    "health": lambda sample, health_code: health.SEVERITY_ORDER[cast(Any, health_code)],
}


def row_key(sort: str, row: GpuRow) -> tuple[Any, ...]:
    node, gpu = row
    return (GPU_SORT_KEYS[sort](gpu.sample, node.gpu_verdict(gpu).health), node.name, gpu.inventory.index)


def view_key(sort: str, view: query_pb2.GpuView) -> tuple[Any, ...]:
    """The same order as ``row_key``, from a view (what other collectors of a tier answer)."""
    sample = view.sample if view.HasField("sample") else None
    return (GPU_SORT_KEYS[sort](sample, view.health), view.node_name, view.inventory.index)


def page_token(key: Sequence[Any]) -> str:
    """An opaque token: the sort key of the last row of a page (the next page starts after it)."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def token_key(token: str) -> tuple[Any, ...] | None:
    """The key a page token holds; None for an invalid one."""
    try:
        key = _tuples(json.loads(base64.urlsafe_b64decode(token.encode())))
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, tuple) else None


def gpu_view(node: NodeRecord, gpu: GpuRecord, slots: Sequence[Slot] = ()) -> query_pb2.GpuView:
    verdict = node.gpu_verdict(gpu)
    view = query_pb2.GpuView(
        node_id=node.node_id,
        node_name=node.name,
        cluster=node.cluster,
        inventory=gpu.inventory,
        health=verdict.health,
        reasons=verdict.reasons,
        action=verdict.action,
        idle=node.state == UP and gpu.is_idle(),
    )
    if gpu.sample is not None:
        view.sample.CopyFrom(gpu.sample)
    view.allocations.extend(node.allocations_of(gpu.inventory.index))
    held = [slot for slot in slots if slot.allocations]
    if held:
        view.allocated_since_unix_nano = min(slot.allocated_since_ns for slot in held)
        idle = [slot.idle_since_ns for slot in held if slot.idle_since_ns]
        view.idle_since_unix_nano = min(idle) if len(idle) == len(held) else 0
    return view


# The allocation fields ListGpus filters on.
HOLDER_FILTERS = ("namespace", "pod", "job", "user")


def _held_by(allocations: Sequence[allocation_pb2.Allocation], wanted: dict[str, str]) -> bool:
    return any(all(getattr(a, name) == value for name, value in wanted.items()) for a in allocations)


# The state's liveness in the wire contract's terms.
WIRE_NODE_STATES = {
    NodeState.UP: query_pb2.NODE_STATE_UP,
    NodeState.STALE: query_pb2.NODE_STATE_STALE,
    NodeState.DOWN: query_pb2.NODE_STATE_DOWN,
}


def node_view(node: NodeRecord, with_inventory: bool = False) -> query_pb2.NodeView:
    view = query_pb2.NodeView(
        node_id=node.node_id,
        name=node.name,
        state=WIRE_NODE_STATES[node.state],
        last_seen_unix_nano=node.last_seen_unix_ns,
        gpu_count=len(node.gpus),
        agent_stats=node.agent_stats,
        last_sequence=node.last_sequence,
        unhealthy_gpu_count=sum(node.gpu_verdict(g).health != health.HEALTHY for g in node.gpus.values()),
    )
    view.inventory.CopyFrom(node.inventory)
    if not with_inventory:
        view.inventory.ClearField("gpus")
    return view


def gpu_record_view(state: FleetState, record: SerialRecord) -> query_pb2.GpuRecord:
    """A GPU's reliability record, and where it is installed now if on a node of ``state``."""
    view = query_pb2.GpuRecord(
        serial=record.serial,
        uuid=record.uuid,
        model=record.model,
        reboots=record.reboots,
        rma_due=record.rma_due,
        rma_reason=record.rma_reason,
        rma_since_unix_nano=record.rma_since_unix_nano,
        installs=[
            query_pb2.GpuInstall(
                node_id=i.node_id,
                hostname=i.hostname,
                gpu_index=i.gpu_index,
                first_seen_unix_nano=i.first_seen_unix_nano,
                last_seen_unix_nano=i.last_seen_unix_nano,
            )
            for i in record.installs
        ],
        occurrences=[
            query_pb2.FaultOccurrence(
                time_unix_nano=o.time_unix_nano,
                node_id=o.node_id,
                boot_id=o.boot_id,
                health=o.health,
                reason=o.reason,
                action=o.action,
            )
            for o in record.occurrences
        ],
        verdict_changes=[
            query_pb2.VerdictChange(
                time_unix_nano=v.time_unix_nano, old_health=v.old, new_health=v.new, reason=v.reason
            )
            for v in record.verdicts
        ],
    )
    installed = record.installed
    node = state.get(installed.node_id) if installed is not None else None
    gpu = node.gpus.get(installed.gpu_index) if node is not None and installed is not None else None
    if node is not None and gpu is not None and gpu.inventory.serial == record.serial and not gpu.missing:
        verdict = node.gpu_verdict(gpu)
        view.node_id, view.node_name, view.gpu_index = node.node_id, node.name, gpu.inventory.index
        view.health, view.action = verdict.health, verdict.action
        view.reasons.extend(verdict.reasons)
    return view


def page_size(requested: int) -> int:
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


async def _page(
    items: Sequence[T],
    key: Callable[[T], tuple[Any, ...]],
    size: int,
    token: str,
    context: grpc.aio.ServicerContext,
    descending: bool = False,
) -> tuple[Sequence[T], str]:
    """The page of ``items`` (sorted by ``key``) after the row ``token`` names, and the next token."""
    start = 0
    if token:
        after = token_key(token)
        if after is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid page_token {token!r}")
        assert after is not None
        keys = [key(item) for item in items]
        try:
            if descending:
                start = len(keys) - bisect.bisect_left(keys[::-1], after)
            else:
                start = bisect.bisect_right(keys, after)
        except TypeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"page_token {token!r} is for another order"
            )
    page = items[start : start + size]
    return page, (page_token(key(page[-1])) if page and start + size < len(items) else "")


def node_key(node: NodeRecord | query_pb2.NodeView) -> tuple[str, str]:
    return node.name, node.node_id


async def gpu_order(sort_by: str, context: grpc.aio.ServicerContext) -> tuple[str, bool]:
    """ListGpus' sort_by as (key, descending), or INVALID_ARGUMENT."""
    sort_by = sort_by or "node"
    sort = sort_by.lstrip("-")
    if sort not in GPU_SORT_KEYS:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unknown sort_by {sort_by!r}; one of {', '.join(GPU_SORT_KEYS)}",
        )
    return sort, sort_by.startswith("-")


async def gpu_key(request: query_pb2.GetGpuRecordRequest, context: grpc.aio.ServicerContext) -> str:
    """GetGpuRecord's key, or INVALID_ARGUMENT when it is empty."""
    if not request.key.strip():
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key is empty: give a GPU serial or UUID")
    return request.key.strip()


def no_gpu(key: str) -> str:
    return (
        f"no GPU with serial or UUID {key!r}: a GPU is known once a node reports it in its inventory "
        "(`gpufleet gpus -o json` lists the UUIDs)"
    )


def _counts(counter: Counter[str]) -> list[query_pb2.Count]:
    return [query_pb2.Count(key=key, count=count) for key, count in sorted(counter.items())]


class QueryServicer(query_pb2_grpc.QueryServiceServicer):
    def __init__(
        self,
        state: FleetState,
        totals: Callable[[], FleetTotals],
        followers: EventFollowers,
        workloads: WorkloadLedger,
    ) -> None:
        """``totals``: the fleet's running totals, current (the same the fleet metrics show);
        ``workloads``: the ledger registered with the state's sinks."""
        self._state = state
        self._totals = totals
        self._followers = followers
        self._workloads = workloads

    def _gpu_view(self, node: NodeRecord, gpu: GpuRecord) -> query_pb2.GpuView:
        return gpu_view(node, gpu, self._workloads.gpu_slots(node.node_id, gpu.inventory.index))

    async def GetFleetSummary(  # noqa: N802
        self, request: query_pb2.GetFleetSummaryRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.GetFleetSummaryResponse:
        summary = self._totals().summary()
        response = query_pb2.GetFleetSummaryResponse(
            nodes=summary.nodes,
            gpus=summary.gpus,
            nodes_by_state=_counts(summary.nodes_by_state),
            gpus_by_health=_counts(summary.gpus_by_health),
            gpus_by_model=_counts(summary.gpus_by_model),
            gpus_by_cluster=_counts(summary.gpus_by_cluster),
            idle_gpus=summary.idle_gpus,
            power_draw_watts=summary.power_watts,
            measured_gpus=summary.measured_gpus,
        )
        if summary.mean_utilization_ratio is not None:
            response.mean_gpu_utilization_ratio = summary.mean_utilization_ratio
        return response

    async def ListNodes(  # noqa: N802
        self, request: query_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListNodesResponse:
        nodes = sorted(
            (
                n
                for n in self._state.nodes()
                if (not request.cluster or n.cluster == request.cluster)
                and (not request.state or WIRE_NODE_STATES[n.state] == request.state)
            ),
            key=node_key,
        )
        page, token = await _page(nodes, node_key, page_size(request.page_size), request.page_token, context)
        return query_pb2.ListNodesResponse(
            nodes=[node_view(n) for n in page], next_page_token=token, total_size=len(nodes)
        )

    async def ListGpus(  # noqa: N802
        self, request: query_pb2.ListGpusRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListGpusResponse:
        sort, descending = await gpu_order(request.sort_by, context)

        def key(row: GpuRow) -> tuple[Any, ...]:
            return row_key(sort, row)

        rows = sorted(self._matching_gpus(request), key=key, reverse=descending)
        page, token = await _page(
            rows, key, page_size(request.page_size), request.page_token, context, descending
        )
        return query_pb2.ListGpusResponse(
            gpus=[self._gpu_view(n, g) for n, g in page], next_page_token=token, total_size=len(rows)
        )

    def _matching_gpus(self, request: query_pb2.ListGpusRequest) -> list[GpuRow]:
        model = request.model.lower()
        holders = {name: getattr(request, name) for name in HOLDER_FILTERS if getattr(request, name)}
        rows = []
        for node in self._state.nodes():
            if request.node and request.node not in (node.name, node.node_id):
                continue
            if request.cluster and node.cluster != request.cluster:
                continue
            for gpu in node.gpus.values():
                if model and model not in gpu.model.lower():
                    continue
                if request.health and node.gpu_verdict(gpu).health != request.health:
                    continue
                if request.idle_only and not (node.state == UP and gpu.is_idle()):
                    continue
                if holders and not _held_by(node.allocations_of(gpu.inventory.index), holders):
                    continue
                rows.append((node, gpu))
        return rows

    async def _node(self, key: str, context: grpc.aio.ServicerContext) -> NodeRecord:
        node = self._state.find(key)
        if node is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no node named or with id {key!r}")
        assert node is not None
        return node

    async def GetNode(  # noqa: N802
        self, request: query_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.GetNodeResponse:
        node = await self._node(request.node, context)
        return query_pb2.GetNodeResponse(
            node=node_view(node, with_inventory=True),
            gpus=[self._gpu_view(node, node.gpus[i]) for i in sorted(node.gpus)],
        )

    def _gpu_record(self, key: str) -> query_pb2.GpuRecord | None:
        record = self._state.reliability.find(key)
        return None if record is None else gpu_record_view(self._state, record)

    async def GetGpuRecord(  # noqa: N802
        self, request: query_pb2.GetGpuRecordRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.GetGpuRecordResponse:
        view = self._gpu_record(await gpu_key(request, context))
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, no_gpu(request.key))
        return query_pb2.GetGpuRecordResponse(record=view)

    async def ListRma(  # noqa: N802
        self, request: query_pb2.ListRmaRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListRmaResponse:
        due = self._state.reliability.due_for_rma()
        return query_pb2.ListRmaResponse(records=[gpu_record_view(self._state, r) for r in due])

    async def ListWorkloads(  # noqa: N802
        self, request: query_pb2.ListWorkloadsRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListWorkloadsResponse:
        group_by = request.group_by or "workload"
        if group_by not in GROUPS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown group_by {group_by!r}; one of {', '.join(GROUPS)}"
            )
        ledger = self._workloads
        groups = group_workloads(
            ledger.slots(), group_by, request.idle_for_seconds, time.time_ns(), request.cluster
        )
        response = query_pb2.ListWorkloadsResponse(
            prices=[
                query_pb2.Price(model=model, per_gpu_hour=price) for model, price in ledger.prices.items()
            ]
        )
        for group in groups:
            view = response.workloads.add(
                gpus=group.units / UNITS_PER_GPU,
                nodes=len(group.nodes),
                idle_gpus=sum(group.idle_units_by_model.values()) / UNITS_PER_GPU,
                idle_gpu_seconds=sum(group.idle_unit_seconds_by_model.values()) / UNITS_PER_GPU,
                since_unix_nano=group.since_ns,
                **group.key,
            )
            for measure in ("utilization", "sm_active", "tensor_active"):
                mean = group.mean(measure)
                if mean is not None:
                    setattr(view, f"mean_{measure}_ratio", mean)
            for model, units in group.idle_units_by_model.items():
                view.idle_gpus_by_model[model] = units / UNITS_PER_GPU
            for model, unit_seconds in group.idle_unit_seconds_by_model.items():
                view.idle_gpu_seconds_by_model[model] = unit_seconds / UNITS_PER_GPU
        return response

    async def _match(
        self, event_filter: query_pb2.EventFilter, context: grpc.aio.ServicerContext
    ) -> EventMatch:
        node_id = (await self._node(event_filter.node, context)).node_id if event_filter.node else ""
        return EventMatch(
            node_id,
            frozenset(event_filter.kinds),
            event_filter.min_severity,
            event_filter.since_unix_nano,
            event_filter.after_id,
        )

    async def ListEvents(  # noqa: N802
        self, request: query_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListEventsResponse:
        match = await self._match(request.filter, context)
        limit = min(request.limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        return query_pb2.ListEventsResponse(events=self._state.events.query(match, limit))

    async def StreamEvents(  # noqa: N802
        self, request: query_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.Event]:
        match = await self._follow_match(request.filter, context)
        queue: asyncio.Queue[events_pb2.Event] = asyncio.Queue(maxsize=FOLLOW_QUEUE)
        fell_behind = False

        def on_event(event: events_pb2.Event) -> None:
            nonlocal fell_behind
            if match(event):
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    fell_behind = True

        self._followers.follow(on_event)
        try:
            last_id = 0
            replayed: set[int] = set()
            if match.after_id or match.since_unix_nano:
                for event in await self._replay(request.filter, FOLLOW_QUEUE, context):
                    last_id = max(last_id, event.id)
                    replayed.add(event.id)
                    yield event
            while True:
                event = await queue.get()
                if fell_behind:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this follower fell {FOLLOW_QUEUE} events behind; reconnect with after_id={last_id}",
                    )
                if event.id not in replayed:
                    last_id = max(last_id, event.id)
                    yield event
        finally:
            self._followers.unfollow(on_event)

    async def _follow_match(
        self, event_filter: query_pb2.EventFilter, context: grpc.aio.ServicerContext
    ) -> EventMatch:
        """Which events a follower gets (a tier matches a node it does not serve by name or id)."""
        return await self._match(event_filter, context)

    async def _replay(
        self, event_filter: query_pb2.EventFilter, limit: int, context: grpc.aio.ServicerContext
    ) -> list[events_pb2.Event]:
        """The events a follower asked for from before it followed (after_id, since), oldest first."""
        return self._state.events.query(await self._match(event_filter, context), limit)
