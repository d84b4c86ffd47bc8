from gpufleet.v1 import allocation_pb2 as _allocation_pb2
from gpufleet.v1 import inventory_pb2 as _inventory_pb2
from gpufleet.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentMessage(_message.Message):
    __slots__ = ("hello", "report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    report: Report
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., report: _Optional[_Union[Report, _Mapping]] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("hello_ack", "report_ack")
    HELLO_ACK_FIELD_NUMBER: _ClassVar[int]
    REPORT_ACK_FIELD_NUMBER: _ClassVar[int]
    hello_ack: HelloAck
    report_ack: ReportAck
    def __init__(self, hello_ack: _Optional[_Union[HelloAck, _Mapping]] = ..., report_ack: _Optional[_Union[ReportAck, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "inventory", "report_interval_ms", "allocations")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    inventory: _inventory_pb2.NodeInventory
    report_interval_ms: int
    allocations: _allocation_pb2.Allocations
    def __init__(self, protocol_version: _Optional[int] = ..., inventory: _Optional[_Union[_inventory_pb2.NodeInventory, _Mapping]] = ..., report_interval_ms: _Optional[int] = ..., allocations: _Optional[_Union[_allocation_pb2.Allocations, _Mapping]] = ...) -> None: ...

class HelloAck(_message.Message):
    __slots__ = ("last_acked_sequence",)
    LAST_ACKED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    last_acked_sequence: int
    def __init__(self, last_acked_sequence: _Optional[int] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("sequence", "time_unix_nano", "gpus", "agent_stats", "inventory", "allocations")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATS_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time_unix_nano: int
    gpus: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.GpuSample]
    agent_stats: _telemetry_pb2.AgentStats
    inventory: _inventory_pb2.NodeInventory
    allocations: _allocation_pb2.Allocations
    def __init__(self, sequence: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[_telemetry_pb2.GpuSample, _Mapping]]] = ..., agent_stats: _Optional[_Union[_telemetry_pb2.AgentStats, _Mapping]] = ..., inventory: _Optional[_Union[_inventory_pb2.NodeInventory, _Mapping]] = ..., allocations: _Optional[_Union[_allocation_pb2.Allocations, _Mapping]] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...
