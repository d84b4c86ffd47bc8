"""IngestService over real gRPC: the happy path, and bad input that leaves everyone else served."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.service import Collector
from gpufleet.v1 import ingest_pb2
from tests.conftest import metric
from tests.fleet import inventory_for

METHOD = "/gpufleet.v1.IngestService/Connect"


def hello(index: int, gpus: int = 8, version: int = wire.PROTOCOL_VERSION) -> bytes:
    inventory = inventory_for(SimulatedSource("H100", gpus, node_index=index), index)
    message = ingest_pb2.AgentMessage(
        hello=ingest_pb2.Hello(protocol_version=version, inventory=inventory, report_interval_ms=10_000)
    )
    return message.SerializeToString()


def report(sequence: int, source: SimulatedSource | None = None) -> bytes:
    source = source or SimulatedSource("H100", 8)
    message = ingest_pb2.AgentMessage(
        report=ingest_pb2.Report(
            sequence=sequence, time_unix_nano=1, gpus=source.sample(with_processes=False)
        )
    )
    return message.SerializeToString()


async def exchange(
    collector: Collector, *messages: bytes
) -> tuple[list[ingest_pb2.CollectorMessage], grpc.StatusCode, str]:
    """Send raw messages on one stream; return the answers and the final status."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=ingest_pb2.CollectorMessage.FromString
        )(iter(messages))
        answers = []
        try:
            async for answer in call:
                answers.append(answer)
        except grpc.aio.AioRpcError as exc:
            return answers, exc.code(), exc.details() or ""
        return answers, await call.code(), await call.details()


async def test_hello_reports_and_acknowledgements(collector: Collector) -> None:
    answers, code, _ = await exchange(collector, hello(0), report(1), report(2))
    assert code == grpc.StatusCode.OK
    assert answers[0].hello_ack.last_acked_sequence == 0
    assert [a.report_ack.sequence for a in answers[1:]] == [1, 2]
    node = collector.state.find("node-0000")
    assert node is not None and node.last_sequence == 2 and len(node.gpus) == 8
    # A reconnect learns where to resume; resent reports are dropped as duplicates.
    answers, _, _ = await exchange(collector, hello(0), report(2), report(3))
    assert answers[0].hello_ack.last_acked_sequence == 2
    assert [a.report_ack.sequence for a in answers[1:]] == [2, 3]
    assert metric(collector, "gpufleet_collector_duplicate_reports_total") == 1


@pytest.mark.parametrize(
    ("messages", "status", "reason"),
    [
        ((b"\xff\xff\xff garbage",), grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
        ((report(1),), grpc.StatusCode.FAILED_PRECONDITION, "no_hello"),
        ((hello(0, version=99),), grpc.StatusCode.FAILED_PRECONDITION, "protocol_version"),
        ((hello(0), hello(0)), grpc.StatusCode.FAILED_PRECONDITION, "unexpected_hello"),
    ],
    ids=["malformed", "report-before-hello", "protocol-version", "second-hello"],
)
async def test_bad_streams_get_a_clear_status_and_a_counter(
    collector: Collector, messages: tuple[bytes, ...], status: grpc.StatusCode, reason: str
) -> None:
    _, code, details = await exchange(collector, *messages)
    assert code == status
    assert details  # says what was wrong
    assert metric(collector, "gpufleet_collector_rejected_messages_total", reason=reason) == 1
    # Everyone else is still served.
    answers, code, _ = await exchange(collector, hello(5), report(1))
    assert code == grpc.StatusCode.OK and answers[-1].report_ack.sequence == 1


async def test_oversized_message_is_refused(collector: Collector) -> None:
    huge = ingest_pb2.AgentMessage(hello=ingest_pb2.Hello(protocol_version=1))
    huge.hello.inventory.node_id = "x"
    huge.hello.inventory.labels["blob"] = "x" * (wire.MAX_MESSAGE_BYTES + 1)
    _, code, _ = await exchange(collector, huge.SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _answers, code, _ = await exchange(collector, hello(1), report(1))
    assert code == grpc.StatusCode.OK


async def test_health_and_reflection_services(collector: Collector) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="gpufleet.v1.IngestService")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for answer in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in answer.list_services_response.service}
            assert {"gpufleet.v1.IngestService", "gpufleet.v1.QueryService"} <= names
            break


async def test_a_sequence_going_backwards_on_a_stream_is_refused(collector: Collector) -> None:
    _, code, details = await exchange(collector, hello(0), report(5), report(3))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sequence 3 after 5" in details
    assert metric(collector, "gpufleet_collector_rejected_messages_total", reason="sequence_backwards") == 1
    node = collector.state.find("node-0000")
    assert node is not None and node.last_sequence == 5


async def test_one_node_id_from_two_hosts_is_flagged_never_merged(collector: Collector) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=ingest_pb2.CollectorMessage.FromString
        )()
        await call.write(hello(0))
        assert (await call.read()).HasField("hello_ack")
        impostor = ingest_pb2.AgentMessage.FromString(hello(0))
        impostor.hello.inventory.hostname = "other-host"
        impostor.hello.inventory.boot_id = "other-boot"
        _, code, details = await exchange(collector, impostor.SerializeToString())
        assert code == grpc.StatusCode.ALREADY_EXISTS and "--node-id" in details
        await call.write(report(1))  # the first host keeps reporting
        assert (await call.read()).report_ack.sequence == 1
        await call.done_writing()
    node = collector.state.find("node-0000")
    assert node is not None and node.inventory.hostname == "node-0000"
    conflicts = [e for e in collector.state.events.query(EventMatch(kinds=frozenset({"node_id_conflict"})))]
    assert len(conflicts) == 1 and conflicts[0].attributes["other_hostname"] == "other-host"
