from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInventory(_message.Message):
    __slots__ = ("node_id", "hostname", "boot_id", "datacenter", "cluster", "rack", "labels", "agent_version", "driver_version", "cuda_version", "nvml_version", "gpus")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    DATACENTER_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NVML_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    boot_id: str
    datacenter: str
    cluster: str
    rack: str
    labels: _containers.ScalarMap[str, str]
    agent_version: str
    driver_version: str
    cuda_version: str
    nvml_version: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInventory]
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., boot_id: _Optional[str] = ..., datacenter: _Optional[str] = ..., cluster: _Optional[str] = ..., rack: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., driver_version: _Optional[str] = ..., cuda_version: _Optional[str] = ..., nvml_version: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuInventory, _Mapping]]] = ...) -> None: ...

class GpuInventory(_message.Message):
    __slots__ = ("index", "uuid", "serial", "name", "architecture", "compute_capability", "pci_bus_id", "memory_total_bytes", "power_limit_default_milliwatts", "power_limit_enforced_milliwatts", "power_limit_min_milliwatts", "power_limit_max_milliwatts", "max_sm_clock_mhz", "max_memory_clock_mhz", "vbios_version", "mig_enabled", "ecc_enabled", "persistence_enabled", "nvlink_link_count", "mig_instances")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_DEFAULT_MILLIWATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_ENFORCED_MILLIWATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MIN_MILLIWATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MAX_MILLIWATTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    VBIOS_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIG_ENABLED_FIELD_NUMBER: _ClassVar[int]
    ECC_ENABLED_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    NVLINK_LINK_COUNT_FIELD_NUMBER: _ClassVar[int]
    MIG_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    serial: str
    name: str
    architecture: str
    compute_capability: str
    pci_bus_id: str
    memory_total_bytes: int
    power_limit_default_milliwatts: int
    power_limit_enforced_milliwatts: int
    power_limit_min_milliwatts: int
    power_limit_max_milliwatts: int
    max_sm_clock_mhz: int
    max_memory_clock_mhz: int
    vbios_version: str
    mig_enabled: bool
    ecc_enabled: bool
    persistence_enabled: bool
    nvlink_link_count: int
    mig_instances: _containers.RepeatedCompositeFieldContainer[MigInventory]
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., serial: _Optional[str] = ..., name: _Optional[str] = ..., architecture: _Optional[str] = ..., compute_capability: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., power_limit_default_milliwatts: _Optional[int] = ..., power_limit_enforced_milliwatts: _Optional[int] = ..., power_limit_min_milliwatts: _Optional[int] = ..., power_limit_max_milliwatts: _Optional[int] = ..., max_sm_clock_mhz: _Optional[int] = ..., max_memory_clock_mhz: _Optional[int] = ..., vbios_version: _Optional[str] = ..., mig_enabled: _Optional[bool] = ..., ecc_enabled: _Optional[bool] = ..., persistence_enabled: _Optional[bool] = ..., nvlink_link_count: _Optional[int] = ..., mig_instances: _Optional[_Iterable[_Union[MigInventory, _Mapping]]] = ...) -> None: ...

class MigInventory(_message.Message):
    __slots__ = ("index", "uuid", "gpu_instance_id", "compute_instance_id", "profile", "memory_total_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    profile: str
    memory_total_bytes: int
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., gpu_instance_id: _Optional[int] = ..., compute_instance_id: _Optional[int] = ..., profile: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ...) -> None: ...
