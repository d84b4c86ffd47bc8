from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Allocation(_message.Message):
    __slots__ = ("gpu_index", "gpu_instance_id", "source", "namespace", "pod", "container", "job", "user", "account", "partition", "job_name")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    gpu_instance_id: int
    source: str
    namespace: str
    pod: str
    container: str
    job: str
    user: str
    account: str
    partition: str
    job_name: str
    def __init__(self, gpu_index: _Optional[int] = ..., gpu_instance_id: _Optional[int] = ..., source: _Optional[str] = ..., namespace: _Optional[str] = ..., pod: _Optional[str] = ..., container: _Optional[str] = ..., job: _Optional[str] = ..., user: _Optional[str] = ..., account: _Optional[str] = ..., partition: _Optional[str] = ..., job_name: _Optional[str] = ...) -> None: ...

class AttributionSource(_message.Message):
    __slots__ = ("name", "available", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    available: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., available: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class Allocations(_message.Message):
    __slots__ = ("allocations", "sources")
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[Allocation]
    sources: _containers.RepeatedCompositeFieldContainer[AttributionSource]
    def __init__(self, allocations: _Optional[_Iterable[_Union[Allocation, _Mapping]]] = ..., sources: _Optional[_Iterable[_Union[AttributionSource, _Mapping]]] = ...) -> None: ...
