from gpufleet.v1 import allocation_pb2 as _allocation_pb2
from gpufleet.v1 import events_pb2 as _events_pb2
from gpufleet.v1 import inventory_pb2 as _inventory_pb2
from gpufleet.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_UP: _ClassVar[NodeState]
    NODE_STATE_STALE: _ClassVar[NodeState]
    NODE_STATE_DOWN: _ClassVar[NodeState]

class GpuHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_HEALTH_UNSPECIFIED: _ClassVar[GpuHealth]
    GPU_HEALTH_HEALTHY: _ClassVar[GpuHealth]
    GPU_HEALTH_DEGRADED: _ClassVar[GpuHealth]
    GPU_HEALTH_UNHEALTHY: _ClassVar[GpuHealth]
    GPU_HEALTH_LOST: _ClassVar[GpuHealth]
    GPU_HEALTH_UNREACHABLE: _ClassVar[GpuHealth]
    GPU_HEALTH_AT_RISK: _ClassVar[GpuHealth]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_UP: NodeState
NODE_STATE_STALE: NodeState
NODE_STATE_DOWN: NodeState
GPU_HEALTH_UNSPECIFIED: GpuHealth
GPU_HEALTH_HEALTHY: GpuHealth
GPU_HEALTH_DEGRADED: GpuHealth
GPU_HEALTH_UNHEALTHY: GpuHealth
GPU_HEALTH_LOST: GpuHealth
GPU_HEALTH_UNREACHABLE: GpuHealth
GPU_HEALTH_AT_RISK: GpuHealth

class Count(_message.Message):
    __slots__ = ("key", "count")
    KEY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    key: str
    count: int
    def __init__(self, key: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class GetFleetSummaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetFleetSummaryResponse(_message.Message):
    __slots__ = ("nodes", "gpus", "nodes_by_state", "gpus_by_health", "gpus_by_model", "gpus_by_cluster", "idle_gpus", "mean_gpu_utilization_ratio", "power_draw_watts", "measured_gpus", "coverage")
    NODES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NODES_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    GPUS_BY_HEALTH_FIELD_NUMBER: _ClassVar[int]
    GPUS_BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    GPUS_BY_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    IDLE_GPUS_FIELD_NUMBER: _ClassVar[int]
    MEAN_GPU_UTILIZATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_WATTS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_GPUS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    gpus: int
    nodes_by_state: _containers.RepeatedCompositeFieldContainer[Count]
    gpus_by_health: _containers.RepeatedCompositeFieldContainer[Count]
    gpus_by_model: _containers.RepeatedCompositeFieldContainer[Count]
    gpus_by_cluster: _containers.RepeatedCompositeFieldContainer[Count]
    idle_gpus: int
    mean_gpu_utilization_ratio: float
    power_draw_watts: float
    measured_gpus: int
    coverage: Coverage
    def __init__(self, nodes: _Optional[int] = ..., gpus: _Optional[int] = ..., nodes_by_state: _Optional[_Iterable[_Union[Count, _Mapping]]] = ..., gpus_by_health: _Optional[_Iterable[_Union[Count, _Mapping]]] = ..., gpus_by_model: _Optional[_Iterable[_Union[Count, _Mapping]]] = ..., gpus_by_cluster: _Optional[_Iterable[_Union[Count, _Mapping]]] = ..., idle_gpus: _Optional[int] = ..., mean_gpu_utilization_ratio: _Optional[float] = ..., power_draw_watts: _Optional[float] = ..., measured_gpus: _Optional[int] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...

class Coverage(_message.Message):
    __slots__ = ("collectors", "answered", "missing")
    COLLECTORS_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    collectors: int
    answered: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collectors: _Optional[int] = ..., answered: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class NodeView(_message.Message):
    __slots__ = ("node_id", "name", "state", "last_seen_unix_nano", "gpu_count", "unhealthy_gpu_count", "inventory", "agent_stats", "last_sequence")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    state: NodeState
    last_seen_unix_nano: int
    gpu_count: int
    unhealthy_gpu_count: int
    inventory: _inventory_pb2.NodeInventory
    agent_stats: _telemetry_pb2.AgentStats
    last_sequence: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., last_seen_unix_nano: _Optional[int] = ..., gpu_count: _Optional[int] = ..., unhealthy_gpu_count: _Optional[int] = ..., inventory: _Optional[_Union[_inventory_pb2.NodeInventory, _Mapping]] = ..., agent_stats: _Optional[_Union[_telemetry_pb2.AgentStats, _Mapping]] = ..., last_sequence: _Optional[int] = ...) -> None: ...

class GpuView(_message.Message):
    __slots__ = ("node_id", "node_name", "cluster", "inventory", "health", "reasons", "action", "sample", "idle", "allocations", "allocated_since_unix_nano", "idle_since_unix_nano")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    IDLE_SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_name: str
    cluster: str
    inventory: _inventory_pb2.GpuInventory
    health: GpuHealth
    reasons: _containers.RepeatedScalarFieldContainer[str]
    action: str
    sample: _telemetry_pb2.GpuSample
    idle: bool
    allocations: _containers.RepeatedCompositeFieldContainer[_allocation_pb2.Allocation]
    allocated_since_unix_nano: int
    idle_since_unix_nano: int
    def __init__(self, node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., cluster: _Optional[str] = ..., inventory: _Optional[_Union[_inventory_pb2.GpuInventory, _Mapping]] = ..., health: _Optional[_Union[GpuHealth, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., action: _Optional[str] = ..., sample: _Optional[_Union[_telemetry_pb2.GpuSample, _Mapping]] = ..., idle: _Optional[bool] = ..., allocations: _Optional[_Iterable[_Union[_allocation_pb2.Allocation, _Mapping]]] = ..., allocated_since_unix_nano: _Optional[int] = ..., idle_since_unix_nano: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("cluster", "state", "page_size", "page_token")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    state: NodeState
    page_size: int
    page_token: str
    def __init__(self, cluster: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "next_page_token", "total_size", "coverage")
    NODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeView]
    next_page_token: str
    total_size: int
    coverage: Coverage
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeView, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...

class ListGpusRequest(_message.Message):
    __slots__ = ("model", "node", "cluster", "health", "idle_only", "sort_by", "page_size", "page_token", "namespace", "pod", "job", "user")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    IDLE_ONLY_FIELD_NUMBER: _ClassVar[int]
    SORT_BY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    model: str
    node: str
    cluster: str
    health: GpuHealth
    idle_only: bool
    sort_by: str
    page_size: int
    page_token: str
    namespace: str
    pod: str
    job: str
    user: str
    def __init__(self, model: _Optional[str] = ..., node: _Optional[str] = ..., cluster: _Optional[str] = ..., health: _Optional[_Union[GpuHealth, str]] = ..., idle_only: _Optional[bool] = ..., sort_by: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., namespace: _Optional[str] = ..., pod: _Optional[str] = ..., job: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class ListGpusResponse(_message.Message):
    __slots__ = ("gpus", "next_page_token", "total_size", "coverage")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuView]
    next_page_token: str
    total_size: int
    coverage: Coverage
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuView, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class GetNodeResponse(_message.Message):
    __slots__ = ("node", "gpus", "coverage")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    node: NodeView
    gpus: _containers.RepeatedCompositeFieldContainer[GpuView]
    coverage: Coverage
    def __init__(self, node: _Optional[_Union[NodeView, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[GpuView, _Mapping]]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...

class EventFilter(_message.Message):
    __slots__ = ("node", "kinds", "min_severity", "since_unix_nano", "after_id")
    NODE_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    MIN_SEVERITY_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    node: str
    kinds: _containers.RepeatedScalarFieldContainer[str]
    min_severity: _events_pb2.Severity
    since_unix_nano: int
    after_id: int
    def __init__(self, node: _Optional[str] = ..., kinds: _Optional[_Iterable[str]] = ..., min_severity: _Optional[_Union[_events_pb2.Severity, str]] = ..., since_unix_nano: _Optional[int] = ..., after_id: _Optional[int] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("filter", "limit")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    filter: EventFilter
    limit: int
    def __init__(self, filter: _Optional[_Union[EventFilter, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "coverage")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_events_pb2.Event]
    coverage: Coverage
    def __init__(self, events: _Optional[_Iterable[_Union[_events_pb2.Event, _Mapping]]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("filter",)
    FILTER_FIELD_NUMBER: _ClassVar[int]
    filter: EventFilter
    def __init__(self, filter: _Optional[_Union[EventFilter, _Mapping]] = ...) -> None: ...

class ListWorkloadsRequest(_message.Message):
    __slots__ = ("group_by", "idle_for_seconds", "cluster")
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    IDLE_FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    group_by: str
    idle_for_seconds: int
    cluster: str
    def __init__(self, group_by: _Optional[str] = ..., idle_for_seconds: _Optional[int] = ..., cluster: _Optional[str] = ...) -> None: ...

class WorkloadView(_message.Message):
    __slots__ = ("cluster", "source", "namespace", "pod", "job", "user", "job_name", "gpus", "nodes", "idle_gpus", "idle_gpu_seconds", "mean_utilization_ratio", "mean_sm_active_ratio", "mean_tensor_active_ratio", "since_unix_nano", "idle_gpus_by_model", "idle_gpu_seconds_by_model")
    class IdleGpusByModelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class IdleGpuSecondsByModelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    IDLE_GPUS_FIELD_NUMBER: _ClassVar[int]
    IDLE_GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_UTILIZATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEAN_SM_ACTIVE_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEAN_TENSOR_ACTIVE_RATIO_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    IDLE_GPUS_BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    IDLE_GPU_SECONDS_BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    source: str
    namespace: str
    pod: str
    job: str
    user: str
    job_name: str
    gpus: float
    nodes: int
    idle_gpus: float
    idle_gpu_seconds: float
    mean_utilization_ratio: float
    mean_sm_active_ratio: float
    mean_tensor_active_ratio: float
    since_unix_nano: int
    idle_gpus_by_model: _containers.ScalarMap[str, float]
    idle_gpu_seconds_by_model: _containers.ScalarMap[str, float]
    def __init__(self, cluster: _Optional[str] = ..., source: _Optional[str] = ..., namespace: _Optional[str] = ..., pod: _Optional[str] = ..., job: _Optional[str] = ..., user: _Optional[str] = ..., job_name: _Optional[str] = ..., gpus: _Optional[float] = ..., nodes: _Optional[int] = ..., idle_gpus: _Optional[float] = ..., idle_gpu_seconds: _Optional[float] = ..., mean_utilization_ratio: _Optional[float] = ..., mean_sm_active_ratio: _Optional[float] = ..., mean_tensor_active_ratio: _Optional[float] = ..., since_unix_nano: _Optional[int] = ..., idle_gpus_by_model: _Optional[_Mapping[str, float]] = ..., idle_gpu_seconds_by_model: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Price(_message.Message):
    __slots__ = ("model", "per_gpu_hour")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    model: str
    per_gpu_hour: float
    def __init__(self, model: _Optional[str] = ..., per_gpu_hour: _Optional[float] = ...) -> None: ...

class ListWorkloadsResponse(_message.Message):
    __slots__ = ("workloads", "prices", "coverage")
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    workloads: _containers.RepeatedCompositeFieldContainer[WorkloadView]
    prices: _containers.RepeatedCompositeFieldContainer[Price]
    coverage: Coverage
    def __init__(self, workloads: _Optional[_Iterable[_Union[WorkloadView, _Mapping]]] = ..., prices: _Optional[_Iterable[_Union[Price, _Mapping]]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...

class GetGpuRecordRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class GpuInstall(_message.Message):
    __slots__ = ("node_id", "hostname", "gpu_index", "first_seen_unix_nano", "last_seen_unix_nano")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    gpu_index: int
    first_seen_unix_nano: int
    last_seen_unix_nano: int
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., gpu_index: _Optional[int] = ..., first_seen_unix_nano: _Optional[int] = ..., last_seen_unix_nano: _Optional[int] = ...) -> None: ...

class FaultOccurrence(_message.Message):
    __slots__ = ("time_unix_nano", "node_id", "boot_id", "health", "reason", "action")
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    time_unix_nano: int
    node_id: str
    boot_id: str
    health: str
    reason: str
    action: str
    def __init__(self, time_unix_nano: _Optional[int] = ..., node_id: _Optional[str] = ..., boot_id: _Optional[str] = ..., health: _Optional[str] = ..., reason: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class VerdictChange(_message.Message):
    __slots__ = ("time_unix_nano", "old_health", "new_health", "reason")
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    OLD_HEALTH_FIELD_NUMBER: _ClassVar[int]
    NEW_HEALTH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    time_unix_nano: int
    old_health: str
    new_health: str
    reason: str
    def __init__(self, time_unix_nano: _Optional[int] = ..., old_health: _Optional[str] = ..., new_health: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GpuRecord(_message.Message):
    __slots__ = ("serial", "uuid", "model", "node_id", "node_name", "gpu_index", "health", "reasons", "action", "installs", "occurrences", "verdict_changes", "reboots", "rma_due", "rma_reason", "rma_since_unix_nano")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    INSTALLS_FIELD_NUMBER: _ClassVar[int]
    OCCURRENCES_FIELD_NUMBER: _ClassVar[int]
    VERDICT_CHANGES_FIELD_NUMBER: _ClassVar[int]
    REBOOTS_FIELD_NUMBER: _ClassVar[int]
    RMA_DUE_FIELD_NUMBER: _ClassVar[int]
    RMA_REASON_FIELD_NUMBER: _ClassVar[int]
    RMA_SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    serial: str
    uuid: str
    model: str
    node_id: str
    node_name: str
    gpu_index: int
    health: GpuHealth
    reasons: _containers.RepeatedScalarFieldContainer[str]
    action: str
    installs: _containers.RepeatedCompositeFieldContainer[GpuInstall]
    occurrences: _containers.RepeatedCompositeFieldContainer[FaultOccurrence]
    verdict_changes: _containers.RepeatedCompositeFieldContainer[VerdictChange]
    reboots: int
    rma_due: bool
    rma_reason: str
    rma_since_unix_nano: int
    def __init__(self, serial: _Optional[str] = ..., uuid: _Optional[str] = ..., model: _Optional[str] = ..., node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., gpu_index: _Optional[int] = ..., health: _Optional[_Union[GpuHealth, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., action: _Optional[str] = ..., installs: _Optional[_Iterable[_Union[GpuInstall, _Mapping]]] = ..., occurrences: _Optional[_Iterable[_Union[FaultOccurrence, _Mapping]]] = ..., verdict_changes: _Optional[_Iterable[_Union[VerdictChange, _Mapping]]] = ..., reboots: _Optional[int] = ..., rma_due: _Optional[bool] = ..., rma_reason: _Optional[str] = ..., rma_since_unix_nano: _Optional[int] = ...) -> None: ...

class GetGpuRecordResponse(_message.Message):
    __slots__ = ("record", "coverage")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    record: GpuRecord
    coverage: Coverage
    def __init__(self, record: _Optional[_Union[GpuRecord, _Mapping]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...

class ListRmaRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRmaResponse(_message.Message):
    __slots__ = ("records", "coverage")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[GpuRecord]
    coverage: Coverage
    def __init__(self, records: _Optional[_Iterable[_Union[GpuRecord, _Mapping]]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ...) -> None: ...
