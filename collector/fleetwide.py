"""QueryService for a collector in a tier: every answer is for the whole fleet, from any collector.

Each question is answered for this collector's own nodes (QueryServicer) and asked of every live
peer (`peers.py`); the answers are merged here, as if one collector held the fleet: counts summed,
means weighed by what they are over, rows merged in the same order and paged by the same key
(a page token names the last row, so the next page starts after it on every collector). Each
answer says how many collectors answered (`coverage`); one that misses any is partial.

A GPU's reliability record is kept by every collector that served a node it was in: the copy of
the collector whose node it is installed in now is the current one, and wins over the others.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from gpufleet.collector.eventlog import EventFollowers, EventMatch
from gpufleet.collector.peers import Gathered, Peers, member_scoped
from gpufleet.collector.query import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    QueryServicer,
    gpu_key,
    gpu_order,
    no_gpu,
    node_key,
    page_size,
    page_token,
    view_key,
)
from gpufleet.collector.state import FleetState
from gpufleet.collector.totals import FleetTotals
from gpufleet.collector.workload import WorkloadLedger
from gpufleet.v1 import events_pb2, query_pb2

WORKLOAD_KEY = ("cluster", "source", "namespace", "pod", "job", "user", "job_name")
WORKLOAD_MEANS = ("mean_utilization_ratio", "mean_sm_active_ratio", "mean_tensor_active_ratio")


class FleetwideQueries(QueryServicer):
    def __init__(
        self,
        state: FleetState,
        totals: Callable[[], FleetTotals],
        followers: EventFollowers,
        workloads: WorkloadLedger,
        peers: Peers,
    ) -> None:
        super().__init__(state, totals, followers, workloads)
        self._peers = peers

    async def _gather(
        self, method: str, request: Any, response_type: Any, context: grpc.aio.ServicerContext
    ) -> Gathered | None:
        """The peers' answers; None when the caller is a peer (it wants this collector's own)."""
        if member_scoped(context):
            return None
        return await self._peers.gather(method, request, response_type.FromString, context)

    async def GetFleetSummary(  # noqa: N802
        self, request: query_pb2.GetFleetSummaryRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.GetFleetSummaryResponse:
        mine = await super().GetFleetSummary(request, context)
        gathered = await self._gather("GetFleetSummary", request, query_pb2.GetFleetSummaryResponse, context)
        if gathered is None:
            return mine
        answers = [mine, *gathered.answers]
        merged = query_pb2.GetFleetSummaryResponse(
            nodes=sum(a.nodes for a in answers),
            gpus=sum(a.gpus for a in answers),
            idle_gpus=sum(a.idle_gpus for a in answers),
            power_draw_watts=sum(a.power_draw_watts for a in answers),
            measured_gpus=sum(a.measured_gpus for a in answers),
            coverage=gathered.coverage,
        )
        for name in ("nodes_by_state", "gpus_by_health", "gpus_by_model", "gpus_by_cluster"):
            counts: Counter[str] = Counter()
            for answer in answers:
                for count in getattr(answer, name):
                    counts[count.key] += count.count
            getattr(merged, name).extend(query_pb2.Count(key=k, count=v) for k, v in sorted(counts.items()))
        if merged.measured_gpus:
            merged.mean_gpu_utilization_ratio = (
                sum(a.mean_gpu_utilization_ratio * a.measured_gpus for a in answers) / merged.measured_gpus
            )
        return merged

    async def ListNodes(  # noqa: N802
        self, request: query_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListNodesResponse:
        mine = await super().ListNodes(request, context)
        gathered = await self._gather("ListNodes", request, query_pb2.ListNodesResponse, context)
        if gathered is None:
            return mine
        return _merged(mine, gathered, "nodes", node_key, page_size(request.page_size))

    async def ListGpus(  # noqa: N802
        self, request: query_pb2.ListGpusRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListGpusResponse:
        mine = await super().ListGpus(request, context)
        gathered = await self._gather("ListGpus", request, query_pb2.ListGpusResponse, context)
        if gathered is None:
            return mine
        sort, descending = await gpu_order(request.sort_by, context)
        return _merged(
            mine,
            gathered,
            "gpus",
            lambda view: view_key(sort, view),
            page_size(request.page_size),
            descending,
        )

    async def GetNode(  # noqa: N802
        self, request: query_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.GetNodeResponse:
        if self._state.find(request.node) is not None or member_scoped(context):
            mine = await super().GetNode(request, context)
            if not member_scoped(context):
                mine.coverage.CopyFrom(query_pb2.Coverage(collectors=1 + len(self._peers_now()), answered=1))
            return mine
        gathered = await self._gather("GetNode", request, query_pb2.GetNodeResponse, context)
        assert gathered is not None
        if gathered.answers:
            found: query_pb2.GetNodeResponse = gathered.answers[0]
            found.coverage.CopyFrom(gathered.coverage)
            return found
        if gathered.coverage.missing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no node named or with id {request.node!r} among the collectors that answered; "
                f"not answering: {', '.join(gathered.coverage.missing)}",
            )
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no node named or with id {request.node!r}")
        raise AssertionError("not reached")

    async def GetGpuRecord(  # noqa: N802
        self, request: query_pb2.GetGpuRecordRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.GetGpuRecordResponse:
        if member_scoped(context):
            return await super().GetGpuRecord(request, context)
        mine = self._gpu_record(await gpu_key(request, context))
        if mine is not None and mine.node_id:
            coverage = query_pb2.Coverage(collectors=1 + len(self._peers_now()), answered=1)
            return query_pb2.GetGpuRecordResponse(record=mine, coverage=coverage)
        gathered = await self._gather("GetGpuRecord", request, query_pb2.GetGpuRecordResponse, context)
        assert gathered is not None
        found = [answer.record for answer in gathered.answers]
        if mine is not None:
            found.insert(0, mine)
        if found:
            return query_pb2.GetGpuRecordResponse(record=_current(found), coverage=gathered.coverage)
        if gathered.coverage.missing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{no_gpu(request.key)}; not answering: {', '.join(gathered.coverage.missing)}",
            )
        await context.abort(grpc.StatusCode.NOT_FOUND, no_gpu(request.key))
        raise AssertionError("not reached")

    async def ListRma(  # noqa: N802
        self, request: query_pb2.ListRmaRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListRmaResponse:
        mine = await super().ListRma(request, context)
        gathered = await self._gather("ListRma", request, query_pb2.ListRmaResponse, context)
        if gathered is None:
            return mine
        copies: dict[str, list[query_pb2.GpuRecord]] = {}
        for answer in (mine, *gathered.answers):
            for record in answer.records:
                copies.setdefault(record.serial, []).append(record)
        records = sorted(
            (_current(c) for c in copies.values()), key=lambda r: (r.rma_since_unix_nano, r.serial)
        )
        return query_pb2.ListRmaResponse(records=records, coverage=gathered.coverage)

    def _peers_now(self) -> Sequence[object]:
        return self._peers.members()

    async def ListEvents(  # noqa: N802
        self, request: query_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListEventsResponse:
        if member_scoped(context):
            return await super().ListEvents(request, context)
        mine = await self._own_events(request, context)
        gathered = await self._gather("ListEvents", request, query_pb2.ListEventsResponse, context)
        assert gathered is not None
        answers = [mine, *gathered.answers]
        node = request.filter.node
        if node and not self._knows(node) and not gathered.answers and not gathered.coverage.missing:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no node named or with id {node!r}")
        limit = min(request.limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        newest = heapq.nlargest(limit, (e for a in answers for e in a.events), key=lambda e: e.id)
        newest.reverse()
        return query_pb2.ListEventsResponse(events=newest, coverage=gathered.coverage)

    def _knows(self, node: str) -> bool:
        return self._state.find(node) is not None

    async def _own_events(
        self, request: query_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListEventsResponse:
        if request.filter.node and not self._knows(request.filter.node):
            return query_pb2.ListEventsResponse()
        return await super().ListEvents(request, context)

    async def _follow_match(
        self, event_filter: query_pb2.EventFilter, context: grpc.aio.ServicerContext
    ) -> EventMatch:
        if event_filter.node and not self._knows(event_filter.node):
            match = await self._match(query_pb2.EventFilter(**_without_node(event_filter)), context)
            return EventMatch(
                match.node_id,
                match.kinds,
                match.min_severity,
                match.since_unix_nano,
                match.after_id,
                node=event_filter.node,
            )
        return await self._match(event_filter, context)

    async def _replay(
        self, event_filter: query_pb2.EventFilter, limit: int, context: grpc.aio.ServicerContext
    ) -> list[events_pb2.Event]:
        answer = await self.ListEvents(
            query_pb2.ListEventsRequest(filter=event_filter, limit=MAX_PAGE_SIZE), context
        )
        return list(answer.events)

    async def ListWorkloads(  # noqa: N802
        self, request: query_pb2.ListWorkloadsRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListWorkloadsResponse:
        mine = await super().ListWorkloads(request, context)
        gathered = await self._gather("ListWorkloads", request, query_pb2.ListWorkloadsResponse, context)
        if gathered is None:
            return mine
        merged = query_pb2.ListWorkloadsResponse(prices=mine.prices, coverage=gathered.coverage)
        groups: dict[tuple[str, ...], list[query_pb2.WorkloadView]] = {}
        for answer in (mine, *gathered.answers):
            for view in answer.workloads:
                groups.setdefault(tuple(getattr(view, k) for k in WORKLOAD_KEY), []).append(view)
        for views in groups.values():
            merged.workloads.append(_merged_workload(views))
        merged.workloads.sort(key=lambda view: tuple(getattr(view, k) for k in WORKLOAD_KEY))
        return merged


def _current(copies: list[query_pb2.GpuRecord]) -> query_pb2.GpuRecord:
    """Of one GPU's records from several collectors, the one installed on a node it serves, else the first."""
    return next((record for record in copies if record.node_id), copies[0])


def _without_node(event_filter: query_pb2.EventFilter) -> dict[str, Any]:
    return {
        "kinds": list(event_filter.kinds),
        "min_severity": event_filter.min_severity,
        "since_unix_nano": event_filter.since_unix_nano,
        "after_id": event_filter.after_id,
    }


R = TypeVar("R", query_pb2.ListNodesResponse, query_pb2.ListGpusResponse)


def _merged(
    mine: R,
    gathered: Gathered,
    field: str,
    key: Callable[[Any], tuple[Any, ...]],
    size: int,
    descending: bool = False,
) -> R:
    """Each collector's page after the same token, merged: the first ``size`` rows, the next token."""
    answers = [mine, *gathered.answers]
    rows = sorted((row for answer in answers for row in getattr(answer, field)), key=key, reverse=descending)
    page = rows[:size]
    more = any(answer.next_page_token for answer in answers) or len(rows) > size
    merged = type(mine)(
        next_page_token=page_token(key(page[-1])) if page and more else "",
        total_size=sum(answer.total_size for answer in answers),
        coverage=gathered.coverage,
    )
    getattr(merged, field).extend(page)
    return merged


def _merged_workload(views: list[query_pb2.WorkloadView]) -> query_pb2.WorkloadView:
    """One workload's views from several collectors (its GPUs on nodes each serves) as one."""
    merged = query_pb2.WorkloadView()
    merged.CopyFrom(views[0])
    if len(views) == 1:
        return merged
    merged.gpus = sum(v.gpus for v in views)
    merged.nodes = sum(v.nodes for v in views)
    merged.idle_gpus = sum(v.idle_gpus for v in views)
    merged.idle_gpu_seconds = sum(v.idle_gpu_seconds for v in views)
    merged.since_unix_nano = min((v.since_unix_nano for v in views if v.since_unix_nano), default=0)
    for name in WORKLOAD_MEANS:
        weighed = [(getattr(v, name), v.gpus) for v in views if v.HasField(name)]
        total = sum(gpus for _, gpus in weighed)
        if total:
            setattr(merged, name, sum(mean * gpus for mean, gpus in weighed) / total)
        else:
            merged.ClearField(name)
    for field_name in ("idle_gpus_by_model", "idle_gpu_seconds_by_model"):
        sums: Counter[str] = Counter()
        for view in views:
            for model, value in getattr(view, field_name).items():
                sums[model] += value
        target = getattr(merged, field_name)
        target.clear()
        target.update(sums)
    return merged
