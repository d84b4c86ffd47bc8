"""IngestService: agents' streams in, acknowledgements out.

The handler takes raw bytes and parses them itself, so that a malformed message
gets INVALID_ARGUMENT with a reason (and a counter) instead of a bare INTERNAL.
Every message is checked against the collector's limits before it touches the
fleet's state, and a report is acknowledged only once the store has made it durable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from gpufleet import wire
from gpufleet.collector.admission import TokenBucket
from gpufleet.collector.limits import (
    LimitExceeded,
    Limits,
    bound_allocations,
    check_hello,
    check_report,
    clamp_report,
)
from gpufleet.collector.ownership import Ownership
from gpufleet.collector.selfmetrics import CollectorMetrics
from gpufleet.collector.state import FleetState, NodeIdConflict, NodeRecord
from gpufleet.collector.store import CommitFailed
from gpufleet.v1 import ingest_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "gpufleet.v1.IngestService"
# At most one log line per rejection reason in this many seconds (a flood must not flood the log).
REJECTION_LOG_INTERVAL_S = 10.0
# When a commit failed: come back after this long (the collector runs from memory by then).
STORE_RETRY_S = 1.0


async def _nothing_to_wait_for() -> None:
    return None


@dataclass(frozen=True)
class IngestPolicy:
    limits: Limits = field(default_factory=Limits)
    # New streams accepted per second and at once (reconnection storms).
    admission_rate_per_s: float = 500.0
    admission_burst: int = 500
    # With mutual TLS: a node may only report under the identity in its certificate.
    bind_node_id_to_certificate: bool = False


def certificate_identities(context: grpc.aio.ServicerContext) -> set[str]:
    """The common name and subject alternative names of the peer's verified certificate."""
    auth = context.auth_context()
    names = auth.get("x509_common_name", []) + auth.get("x509_subject_alternative_name", [])
    return {name.decode() if isinstance(name, bytes) else str(name) for name in names}


class IngestServicer:
    def __init__(
        self,
        state: FleetState,
        metrics: CollectorMetrics,
        *,
        durable: Callable[[], Awaitable[None]] = _nothing_to_wait_for,
        policy: IngestPolicy | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        """``ownership``: in a tier, which nodes this collector serves (None: every node)."""
        self._state = state
        self._ownership = ownership
        self._metrics = metrics
        self._durable = durable
        self._policy = policy or IngestPolicy()
        self._limits = self._policy.limits
        self._admission = TokenBucket(self._policy.admission_rate_per_s, self._policy.admission_burst)
        self._report_rates: dict[str, TokenBucket] = {}
        self._registrations: dict[str, TokenBucket] = {}
        self._streams_by_peer: dict[str, int] = {}
        self._open_streams = 0
        self._last_logged: dict[str, float] = {}

    async def _reject(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        reason: str,
        details: str,
        trailing_metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._metrics.rejected.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_logged.get(reason, -REJECTION_LOG_INTERVAL_S) >= REJECTION_LOG_INTERVAL_S:
            self._last_logged[reason] = now
            log.warning(
                "rejected agent stream from %s: %s (%s; logged at most every %.0f s)",
                context.peer(),
                details,
                reason,
                REJECTION_LOG_INTERVAL_S,
            )
        await context.abort(code, details, trailing_metadata)

    async def _retry_later(
        self, context: grpc.aio.ServicerContext, reason: str, wait_s: float, why: str
    ) -> None:
        wait_ms = max(int(wait_s * 1000), 1)
        await self._reject(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            reason,
            f"{why}; retry in {wait_ms} ms",
            ((wire.RETRY_AFTER_KEY, str(wait_ms)),),
        )

    async def _committed(self, context: grpc.aio.ServicerContext) -> None:
        """Wait until what this stream changed is durable; end the stream if it cannot be."""
        try:
            await self._durable()
        except CommitFailed as exc:
            await self._retry_later(
                context, "store", STORE_RETRY_S, f"the collector could not store the report ({exc})"
            )

    async def _parse(self, raw: bytes, context: grpc.aio.ServicerContext) -> ingest_pb2.AgentMessage:
        message = ingest_pb2.AgentMessage()
        try:
            message.ParseFromString(raw)
        except DecodeError as exc:
            await self._reject(
                context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", f"malformed AgentMessage: {exc}"
            )
        return message

    async def Connect(  # noqa: N802 (gRPC method name)
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingest_pb2.CollectorMessage]:
        if self._open_streams >= self._limits.max_streams:
            await self._retry_later(context, "streams", 5.0, f"{self._open_streams} agent streams are open")
        peer = peer_key(context)
        if self._streams_by_peer.get(peer, 0) >= self._limits.max_streams_per_peer:
            await self._retry_later(
                context,
                "streams_per_peer",
                5.0,
                f"{self._limits.max_streams_per_peer} agent streams are open from {context.peer()}",
            )
        self._open_streams += 1
        self._streams_by_peer[peer] = self._streams_by_peer.get(peer, 0) + 1
        self._metrics.streams.inc()
        node: NodeRecord | None = None
        task = asyncio.current_task()
        try:
            messages = requests.__aiter__()
            try:
                first = await asyncio.wait_for(messages.__anext__(), self._limits.hello_timeout_s)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                await self._reject(
                    context,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "hello_timeout",
                    f"no Hello within {self._limits.hello_timeout_s:.0f} s",
                )
            node = await self._hello(await self._parse(first, context), context)
            if self._ownership is not None:
                self._ownership.attach(node.node_id, task)
            await self._committed(context)
            await self._still_served(node, context)
            yield ingest_pb2.CollectorMessage(
                hello_ack=ingest_pb2.HelloAck(last_acked_sequence=node.last_sequence)
            )
            stream_sequence = 0
            async for raw in messages:
                report = await self._report(await self._parse(raw, context), node, stream_sequence, context)
                stream_sequence = report.sequence
                if self._state.apply_report(node, report):
                    self._metrics.reports.inc()
                else:
                    self._metrics.duplicate_reports.inc()
                await self._committed(context)
                await self._still_served(node, context)
                yield ingest_pb2.CollectorMessage(
                    report_ack=ingest_pb2.ReportAck(sequence=node.last_sequence)
                )
        finally:
            self._open_streams -= 1
            if (left := self._streams_by_peer.pop(peer) - 1) > 0:
                self._streams_by_peer[peer] = left
            self._metrics.streams.dec()
            if node is not None:
                self._state.disconnected(node)
                if self._ownership is not None:
                    self._ownership.detach(node.node_id, task)

    async def _still_served(self, node: NodeRecord, context: grpc.aio.ServicerContext) -> None:
        """In a tier: acknowledge only while this collector holds the node's lease (fencing)."""
        if self._ownership is not None and not self._ownership.owns(node.node_id):
            await self._reject(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "not_owner",
                f"this collector no longer serves node {node.name}: try another collector of the tier",
            )

    async def _hello(self, message: ingest_pb2.AgentMessage, context: grpc.aio.ServicerContext) -> NodeRecord:
        if message.WhichOneof("kind") != "hello":
            await self._reject(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "no_hello",
                "the first message of a stream must be a Hello",
            )
        hello = message.hello
        if hello.protocol_version != wire.PROTOCOL_VERSION:
            await self._reject(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "protocol_version",
                f"protocol version {hello.protocol_version} is not supported "
                f"(this collector speaks {wire.PROTOCOL_VERSION}); upgrade the agent or collector",
            )
        inventory = hello.inventory
        if not inventory.node_id:
            await self._reject(
                context, grpc.StatusCode.INVALID_ARGUMENT, "no_node_id", "Hello without a node_id"
            )
        try:
            check_hello(hello, self._limits)
        except LimitExceeded as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"limit_{exc.reason}", str(exc))
        if self._policy.bind_node_id_to_certificate:
            identities = certificate_identities(context)
            if inventory.node_id not in identities:
                await self._reject(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    "identity",
                    f"node id {inventory.node_id!r} is not the identity of this client's "
                    f"certificate ({', '.join(sorted(identities)) or 'none'})",
                )
        if wait_s := self._admission.admit():
            self._metrics.admission_rejections.inc()
            wait_ms = max(int(wait_s * 1000), 1)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many agents connecting at once; retry in {wait_ms} ms",
                ((wire.RETRY_AFTER_KEY, str(wait_ms)),),
            )
        if self._ownership is not None:
            await self._acquire(inventory.node_id, context)
            await self._ownership.read_serials([gpu.serial for gpu in inventory.gpus])
        if self._state.get(inventory.node_id) is None:
            await self._admit_new_node(context)
        if hello.HasField("allocations") and (cut := bound_allocations(hello.allocations, self._limits)):
            self._metrics.attribution_truncated.inc(cut)
        try:
            return self._state.hello(hello)
        except NodeIdConflict as exc:
            await self._reject(context, grpc.StatusCode.ALREADY_EXISTS, "node_id_conflict", str(exc))
            raise  # not reached: abort raises

    async def _acquire(self, node_id: str, context: grpc.aio.ServicerContext) -> None:
        """In a tier: take the node's lease, or tell the agent when to ask again, or to go elsewhere."""
        assert self._ownership is not None
        owner = await self._ownership.acquire(node_id)
        if owner is None:
            return
        if owner:
            await self._retry_later(
                context,
                "not_owner",
                self._ownership.retry_after_s,
                f"node {node_id} is served by collector {owner}, which is asked to let it go",
            )
        await self._reject(
            context,
            grpc.StatusCode.UNAVAILABLE,
            "fenced",
            "this collector cannot reach the tier's shared store: try another collector",
        )

    async def _admit_new_node(self, context: grpc.aio.ServicerContext) -> None:
        """A node the collector has never seen: within the node cap, and the peer's registration rate."""
        limits = self._limits
        if len(self._state) >= limits.max_nodes:
            await self._reject(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "max_nodes",
                f"the collector holds {len(self._state)} nodes, its limit (--max-nodes); "
                "forget decommissioned nodes or raise the limit",
            )
        peer = peer_key(context)
        bucket = self._registrations.get(peer)
        if bucket is None:
            if len(self._registrations) >= limits.max_nodes:
                self._registrations.clear()  # full buckets are the default: forgetting them is safe
            bucket = self._registrations[peer] = TokenBucket(
                limits.registrations_per_peer_per_second, limits.registration_burst_per_peer
            )
        if wait_s := bucket.admit():
            await self._retry_later(
                context,
                "registration_rate",
                wait_s,
                f"more than {limits.registrations_per_peer_per_second:g} new nodes per second from "
                f"{context.peer()}",
            )

    async def _report(
        self,
        message: ingest_pb2.AgentMessage,
        node: NodeRecord,
        stream_sequence: int,
        context: grpc.aio.ServicerContext,
    ) -> ingest_pb2.Report:
        if message.WhichOneof("kind") != "report":
            await self._reject(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "unexpected_hello",
                "Hello was already sent on this stream; open a new stream to re-register",
            )
        report = message.report
        if report.sequence <= stream_sequence:
            await self._reject(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "sequence_backwards",
                f"report sequence {report.sequence} after {stream_sequence} on the same stream",
            )
        try:
            check_report(report, self._limits)
        except LimitExceeded as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"limit_{exc.reason}", str(exc))
        bucket = self._report_rates.get(node.node_id)
        if bucket is None:
            bucket = self._report_rates[node.node_id] = TokenBucket(
                self._limits.reports_per_second, self._limits.report_burst
            )
        if wait_s := bucket.admit():
            await self._retry_later(
                context,
                "report_rate",
                wait_s,
                f"more than {self._limits.reports_per_second:g} reports per second from node {node.name}",
            )
        if touched := clamp_report(report, time.time_ns(), self._limits):
            self._metrics.implausible_values.inc(touched)
        if report.HasField("allocations") and (cut := bound_allocations(report.allocations, self._limits)):
            self._metrics.attribution_truncated.inc(cut)
        return report


def peer_key(context: grpc.aio.ServicerContext) -> str:
    """Who is on the other end, for per-peer limits: the bearer token if any (hashed), else the address."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return "token:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    address = context.peer() or ""
    # "ipv4:10.0.0.1:4242", "ipv6:[::1]:4242": the address without the port.
    return address.rsplit(":", 1)[0] if address.count(":") >= 2 else address


def handler(servicer: IngestServicer) -> grpc.GenericRpcHandler:
    """The service's handler, with raw-bytes requests (parsed by the servicer)."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Connect": grpc.stream_stream_rpc_method_handler(
                servicer.Connect,
                request_deserializer=None,
                response_serializer=ingest_pb2.CollectorMessage.SerializeToString,
            ),
        },
    )
