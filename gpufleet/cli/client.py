"""A small client of the collector's QueryService, with errors an operator can act on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from gpufleet import wire
from gpufleet.security import ClientSecurity
from gpufleet.v1 import admin_pb2, admin_pb2_grpc, allocation_pb2, events_pb2, query_pb2, query_pb2_grpc
from gpufleet.wire import message_dict

GIB = 1024**3
ADMIN_METHODS = frozenset({"ForgetNode"})


class CollectorUnavailable(Exception):
    """The collector could not be reached or refused the question; the message says what to do."""


def _explain(exc: grpc.RpcError, target: str) -> CollectorUnavailable:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CollectorUnavailable(
            f"cannot reach the collector at {target} ({details}); is it running? "
            "Set --collector HOST:PORT or GPUFLEET_COLLECTOR"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CollectorUnavailable(
            f"the collector at {target} refused: {details}; pass --token-file (or GPUFLEET_TOKEN_FILE)"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return CollectorUnavailable(f"the collector at {target} refused: {details}")
    return CollectorUnavailable(f"collector at {target}: {details}")


class FleetClient:
    def __init__(self, target: str, timeout_s: float = 10.0, security: ClientSecurity | None = None) -> None:
        self.target = target
        self._timeout = timeout_s
        security = security or ClientSecurity()
        self._metadata = security.metadata()
        self._channel = security.channel(target, wire.CLIENT_OPTIONS)
        self._stub = query_pb2_grpc.QueryServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        # In a tier of collectors: how many there are, and those that did not answer.
        self.collectors = 1
        self.missing: set[str] = set()

    def partial(self) -> str:
        """A warning when collectors of the tier did not answer ("" when every one did)."""
        if not self.missing:
            return ""
        return (
            f"partial answer: {len(self.missing)} of {self.collectors} collectors did not answer "
            f"({', '.join(sorted(self.missing))}); the nodes they serve are missing"
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            stub = self._admin if method in ADMIN_METHODS else self._stub
            answer = getattr(stub, method)(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _explain(exc, self.target) from exc
        coverage = getattr(answer, "coverage", None)
        if coverage is not None and coverage.collectors:
            self.collectors = coverage.collectors
            self.missing.update(coverage.missing)
        return answer

    def summary(self) -> query_pb2.GetFleetSummaryResponse:
        request = query_pb2.GetFleetSummaryRequest()
        answer: query_pb2.GetFleetSummaryResponse = self._call("GetFleetSummary", request)
        return answer

    def _pages(self, method: str, request: Any, field: str) -> Iterator[Any]:
        """Every item of a paged answer, asking for the next page until there is none."""
        while True:
            page = self._call(method, request)
            yield from getattr(page, field)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def nodes(self, request: query_pb2.ListNodesRequest) -> Iterator[query_pb2.NodeView]:
        return self._pages("ListNodes", request, "nodes")

    def gpus(self, request: query_pb2.ListGpusRequest) -> Iterator[query_pb2.GpuView]:
        return self._pages("ListGpus", request, "gpus")

    def gpus_page(self, request: query_pb2.ListGpusRequest) -> query_pb2.ListGpusResponse:
        """One page of GPUs: ``request.page_size`` of them after ``request.page_token``."""
        answer: query_pb2.ListGpusResponse = self._call("ListGpus", request)
        return answer

    def workloads(self, request: query_pb2.ListWorkloadsRequest) -> query_pb2.ListWorkloadsResponse:
        answer: query_pb2.ListWorkloadsResponse = self._call("ListWorkloads", request)
        return answer

    def forget(self, name: str) -> admin_pb2.ForgetNodeResponse:
        answer: admin_pb2.ForgetNodeResponse = self._call(
            "ForgetNode", admin_pb2.ForgetNodeRequest(node=name)
        )
        return answer

    def node(self, name: str) -> query_pb2.GetNodeResponse:
        answer: query_pb2.GetNodeResponse = self._call("GetNode", query_pb2.GetNodeRequest(node=name))
        return answer

    def gpu_record(self, key: str) -> query_pb2.GpuRecord:
        """A GPU's reliability record by serial or UUID."""
        answer = self._call("GetGpuRecord", query_pb2.GetGpuRecordRequest(key=key))
        record: query_pb2.GpuRecord = answer.record
        return record

    def rma(self) -> list[query_pb2.GpuRecord]:
        """The GPUs due for RMA, the longest due first."""
        return list(self._call("ListRma", query_pb2.ListRmaRequest()).records)

    def events(self, event_filter: query_pb2.EventFilter, limit: int = 1000) -> list[events_pb2.Event]:
        answer = self._call("ListEvents", query_pb2.ListEventsRequest(filter=event_filter, limit=limit))
        return list(answer.events)

    def follow(self, event_filter: query_pb2.EventFilter) -> Iterator[events_pb2.Event]:
        """Events as they happen, until interrupted; no deadline."""
        try:
            yield from self._stub.StreamEvents(
                query_pb2.StreamEventsRequest(filter=event_filter), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _explain(exc, self.target) from exc


def health_name(value: int) -> str:
    return query_pb2.GpuHealth.Name(value).removeprefix("GPU_HEALTH_").lower()


def node_state_name(value: int) -> str:
    return query_pb2.NodeState.Name(value).removeprefix("NODE_STATE_").lower()


def _optional(message: Any, field: str, divisor: int = 1) -> float | int | None:
    """The field converted to base units, or None when absent."""
    if not message.HasField(field):
        return None
    value: int = getattr(message, field)
    return value if divisor == 1 else value / divisor


def gpu_row(view: query_pb2.GpuView) -> dict[str, Any]:
    """A GPU as a flat row in base units (the CLI's JSON and CSV)."""
    inv, sample = view.inventory, view.sample
    has_sample = view.HasField("sample")
    return {
        "node": view.node_name,
        "node_id": view.node_id,
        "cluster": view.cluster,
        "gpu": inv.index,
        "uuid": inv.uuid,
        "model": inv.name,
        "health": health_name(view.health),
        "reasons": list(view.reasons),
        "action": view.action,
        "idle": view.idle,
        "utilization_ratio": _optional(sample, "gpu_utilization_percent", 100) if has_sample else None,
        "memory_used_bytes": _optional(sample, "memory_used_bytes") if has_sample else None,
        "memory_total_bytes": _optional(inv, "memory_total_bytes"),
        "temperature_celsius": _optional(sample, "gpu_temperature_celsius") if has_sample else None,
        "power_watts": _optional(sample, "power_draw_milliwatts", 1000) if has_sample else None,
        "sm_active_ratio": _optional(sample, "sm_active_ppm", 1_000_000) if has_sample else None,
        "tensor_active_ratio": _optional(sample, "tensor_active_ppm", 1_000_000) if has_sample else None,
        "held_by": ", ".join(dict.fromkeys(holder(a) for a in view.allocations)),
        "allocations": [message_dict(a) for a in view.allocations],
        "idle_since_unix": view.idle_since_unix_nano / 1e9 or None,
    }


def holder(allocation: allocation_pb2.Allocation) -> str:
    """Who holds a GPU, in a few characters: "ml/train-0", "job 4242 (ana)", "user ana"."""
    mig = f"[MIG {allocation.gpu_instance_id}] " if allocation.HasField("gpu_instance_id") else ""
    if allocation.job:
        who = f"job {allocation.job}" + (f" ({allocation.user})" if allocation.user else "")
    elif allocation.pod or allocation.namespace:
        who = f"{allocation.namespace}/{allocation.pod}"
    else:
        who = f"user {allocation.user}"
    return mig + who


def node_row(view: query_pb2.NodeView) -> dict[str, Any]:
    inv = view.inventory
    return {
        "node": view.name,
        "node_id": view.node_id,
        "state": node_state_name(view.state),
        "datacenter": inv.datacenter,
        "cluster": inv.cluster,
        "rack": inv.rack,
        "gpus": view.gpu_count,
        "unhealthy_gpus": view.unhealthy_gpu_count,
        "driver_version": inv.driver_version,
        "last_seen_unix": view.last_seen_unix_nano / 1e9,
    }


def record_row(record: query_pb2.GpuRecord) -> dict[str, Any]:
    """A GPU's reliability record as a flat row (the CLI's JSON and CSV): its lists as counts."""
    return {
        "serial": record.serial,
        "uuid": record.uuid,
        "model": record.model,
        "node": record.node_name,
        "node_id": record.node_id,
        "gpu": record.gpu_index if record.HasField("gpu_index") else None,
        "health": health_name(record.health) if record.node_id else None,
        "reasons": list(record.reasons),
        "action": record.action,
        "rma_due": record.rma_due,
        "rma_reason": record.rma_reason,
        "rma_since_unix": record.rma_since_unix_nano / 1e9 or None,
        "occurrences": len(record.occurrences),
        "installs": len(record.installs),
        "reboots": record.reboots,
    }


def record_detail(record: query_pb2.GpuRecord) -> dict[str, Any]:
    """The whole record (`gpufleet gpu -o json`): the row, with its installs, occurrences and verdicts."""
    return {
        **record_row(record),
        "installs": [
            {
                "node_id": i.node_id,
                "hostname": i.hostname,
                "gpu": i.gpu_index,
                "first_seen_unix": i.first_seen_unix_nano / 1e9,
                "last_seen_unix": i.last_seen_unix_nano / 1e9,
            }
            for i in record.installs
        ],
        "occurrences": [
            {
                "time_unix": o.time_unix_nano / 1e9,
                "node_id": o.node_id,
                "boot_id": o.boot_id,
                "health": o.health,
                "reason": o.reason,
                "action": o.action,
            }
            for o in record.occurrences
        ],
        "verdict_changes": [
            {
                "time_unix": v.time_unix_nano / 1e9,
                "old": v.old_health,
                "new": v.new_health,
                "reason": v.reason,
            }
            for v in record.verdict_changes
        ],
    }
