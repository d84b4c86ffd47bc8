"""IngestService: agents' streams in, acknowledgements out.

The handler takes raw bytes and parses them itself, so that a malformed message
gets INVALID_ARGUMENT with a reason (and a counter) instead of a bare INTERNAL.
A report is acknowledged only once the store has made it durable.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from collector.admission import Admission
from collector.selfmetrics import CollectorMetrics
from collector.state import FleetState, NodeIdConflict, NodeRecord
from gpufleet import wire
from gpufleet.v1 import ingest_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "gpufleet.v1.IngestService"


async def _nothing_to_wait_for() -> None:
    return None


class IngestServicer:
    def __init__(
        self,
        state: FleetState,
        metrics: CollectorMetrics,
        *,
        durable: Callable[[], Awaitable[None]] = _nothing_to_wait_for,
        admission: Admission | None = None,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._durable = durable
        self._admission = admission

    async def _reject(
        self,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        reason: str,
        details: str,
        trailing_metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._metrics.rejected.labels(reason).inc()
        log.warning("rejected agent stream from %s: %s", context.peer(), details)
        await context.abort(code, details, trailing_metadata)

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
        node: NodeRecord | None = None
        stream_sequence = 0
        self._metrics.streams.inc()
        try:
            async for raw in requests:
                message = await self._parse(raw, context)
                kind = message.WhichOneof("kind")
                if node is None:
                    node = await self._hello(message, kind, context)
                    await self._durable()
                    yield ingest_pb2.CollectorMessage(
                        hello_ack=ingest_pb2.HelloAck(last_acked_sequence=node.last_sequence)
                    )
                    continue
                if kind != "report":
                    await self._reject(
                        context,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "unexpected_hello",
                        "Hello was already sent on this stream; open a new stream to re-register",
                    )
                sequence = message.report.sequence
                if sequence <= stream_sequence:
                    await self._reject(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "sequence_backwards",
                        f"report sequence {sequence} after {stream_sequence} on the same stream",
                    )
                stream_sequence = sequence
                if self._state.apply_report(node, message.report):
                    self._metrics.reports.inc()
                else:
                    self._metrics.duplicate_reports.inc()
                await self._durable()
                yield ingest_pb2.CollectorMessage(
                    report_ack=ingest_pb2.ReportAck(sequence=node.last_sequence)
                )
        finally:
            self._metrics.streams.dec()
            if node is not None:
                self._state.disconnected(node)

    async def _hello(
        self, message: ingest_pb2.AgentMessage, kind: str | None, context: grpc.aio.ServicerContext
    ) -> NodeRecord:
        if kind != "hello":
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
        if not hello.inventory.node_id:
            await self._reject(
                context, grpc.StatusCode.INVALID_ARGUMENT, "no_node_id", "Hello without a node_id"
            )
        if self._admission is not None and (wait_s := self._admission.admit()):
            wait_ms = max(int(wait_s * 1000), 1)
            self._metrics.admission_rejections.inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many agents connecting at once; retry in {wait_ms} ms",
                ((wire.RETRY_AFTER_KEY, str(wait_ms)),),
            )
        try:
            return self._state.hello(hello)
        except NodeIdConflict as exc:
            await self._reject(context, grpc.StatusCode.ALREADY_EXISTS, "node_id_conflict", str(exc))
            raise  # not reached: abort raises


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
