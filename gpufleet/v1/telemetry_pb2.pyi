from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GpuReadStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_READ_STATUS_UNSPECIFIED: _ClassVar[GpuReadStatus]
    GPU_READ_STATUS_OK: _ClassVar[GpuReadStatus]
    GPU_READ_STATUS_LOST: _ClassVar[GpuReadStatus]
    GPU_READ_STATUS_ERROR: _ClassVar[GpuReadStatus]
GPU_READ_STATUS_UNSPECIFIED: GpuReadStatus
GPU_READ_STATUS_OK: GpuReadStatus
GPU_READ_STATUS_LOST: GpuReadStatus
GPU_READ_STATUS_ERROR: GpuReadStatus

class GpuSample(_message.Message):
    __slots__ = ("index", "read_status", "read_error", "gpu_utilization_percent", "memory_copy_utilization_percent", "encoder_utilization_percent", "decoder_utilization_percent", "memory_used_bytes", "memory_free_bytes", "memory_reserved_bytes", "gpu_temperature_celsius", "memory_temperature_celsius", "power_draw_milliwatts", "energy_millijoules", "sm_clock_mhz", "memory_clock_mhz", "fan_speed_percent", "performance_state", "clock_event_reasons", "throttle_power_cap_nanoseconds", "throttle_sw_thermal_nanoseconds", "throttle_hw_thermal_nanoseconds", "throttle_hw_power_brake_nanoseconds", "pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second", "pcie_replay_count", "ecc_corrected_volatile", "ecc_uncorrected_volatile", "ecc_corrected_aggregate", "ecc_uncorrected_aggregate", "remapped_rows_correctable", "remapped_rows_uncorrectable", "row_remap_pending", "row_remap_failure", "recovery_action", "xid_events", "nvlink_crc_flit_errors", "nvlink_crc_data_errors", "nvlink_replay_errors", "nvlink_recovery_errors", "processes", "graphics_active_ppm", "sm_active_ppm", "sm_occupancy_ppm", "tensor_active_ppm", "dram_active_ppm", "fp64_active_ppm", "fp32_active_ppm", "fp16_active_ppm", "nvlink_tx_bytes_per_second", "nvlink_rx_bytes_per_second", "mig_instances")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    READ_STATUS_FIELD_NUMBER: _ClassVar[int]
    READ_ERROR_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_COPY_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ENCODER_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DECODER_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_MILLIWATTS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MILLIJOULES_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    FAN_SPEED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PERFORMANCE_STATE_FIELD_NUMBER: _ClassVar[int]
    CLOCK_EVENT_REASONS_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_POWER_CAP_NANOSECONDS_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_SW_THERMAL_NANOSECONDS_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_HW_THERMAL_NANOSECONDS_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_HW_POWER_BRAKE_NANOSECONDS_FIELD_NUMBER: _ClassVar[int]
    PCIE_TX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PCIE_RX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PCIE_REPLAY_COUNT_FIELD_NUMBER: _ClassVar[int]
    ECC_CORRECTED_VOLATILE_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_VOLATILE_FIELD_NUMBER: _ClassVar[int]
    ECC_CORRECTED_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_ROWS_CORRECTABLE_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_ROWS_UNCORRECTABLE_FIELD_NUMBER: _ClassVar[int]
    ROW_REMAP_PENDING_FIELD_NUMBER: _ClassVar[int]
    ROW_REMAP_FAILURE_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_ACTION_FIELD_NUMBER: _ClassVar[int]
    XID_EVENTS_FIELD_NUMBER: _ClassVar[int]
    NVLINK_CRC_FLIT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NVLINK_CRC_DATA_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NVLINK_REPLAY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NVLINK_RECOVERY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    GRAPHICS_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    SM_OCCUPANCY_PPM_FIELD_NUMBER: _ClassVar[int]
    TENSOR_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    DRAM_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    FP64_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    FP32_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    FP16_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    NVLINK_TX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NVLINK_RX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MIG_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    index: int
    read_status: GpuReadStatus
    read_error: str
    gpu_utilization_percent: int
    memory_copy_utilization_percent: int
    encoder_utilization_percent: int
    decoder_utilization_percent: int
    memory_used_bytes: int
    memory_free_bytes: int
    memory_reserved_bytes: int
    gpu_temperature_celsius: int
    memory_temperature_celsius: int
    power_draw_milliwatts: int
    energy_millijoules: int
    sm_clock_mhz: int
    memory_clock_mhz: int
    fan_speed_percent: int
    performance_state: int
    clock_event_reasons: int
    throttle_power_cap_nanoseconds: int
    throttle_sw_thermal_nanoseconds: int
    throttle_hw_thermal_nanoseconds: int
    throttle_hw_power_brake_nanoseconds: int
    pcie_tx_bytes_per_second: int
    pcie_rx_bytes_per_second: int
    pcie_replay_count: int
    ecc_corrected_volatile: int
    ecc_uncorrected_volatile: int
    ecc_corrected_aggregate: int
    ecc_uncorrected_aggregate: int
    remapped_rows_correctable: int
    remapped_rows_uncorrectable: int
    row_remap_pending: bool
    row_remap_failure: bool
    recovery_action: int
    xid_events: _containers.RepeatedCompositeFieldContainer[XidEvent]
    nvlink_crc_flit_errors: int
    nvlink_crc_data_errors: int
    nvlink_replay_errors: int
    nvlink_recovery_errors: int
    processes: ProcessList
    graphics_active_ppm: int
    sm_active_ppm: int
    sm_occupancy_ppm: int
    tensor_active_ppm: int
    dram_active_ppm: int
    fp64_active_ppm: int
    fp32_active_ppm: int
    fp16_active_ppm: int
    nvlink_tx_bytes_per_second: int
    nvlink_rx_bytes_per_second: int
    mig_instances: _containers.RepeatedCompositeFieldContainer[MigSample]
    def __init__(self, index: _Optional[int] = ..., read_status: _Optional[_Union[GpuReadStatus, str]] = ..., read_error: _Optional[str] = ..., gpu_utilization_percent: _Optional[int] = ..., memory_copy_utilization_percent: _Optional[int] = ..., encoder_utilization_percent: _Optional[int] = ..., decoder_utilization_percent: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., memory_reserved_bytes: _Optional[int] = ..., gpu_temperature_celsius: _Optional[int] = ..., memory_temperature_celsius: _Optional[int] = ..., power_draw_milliwatts: _Optional[int] = ..., energy_millijoules: _Optional[int] = ..., sm_clock_mhz: _Optional[int] = ..., memory_clock_mhz: _Optional[int] = ..., fan_speed_percent: _Optional[int] = ..., performance_state: _Optional[int] = ..., clock_event_reasons: _Optional[int] = ..., throttle_power_cap_nanoseconds: _Optional[int] = ..., throttle_sw_thermal_nanoseconds: _Optional[int] = ..., throttle_hw_thermal_nanoseconds: _Optional[int] = ..., throttle_hw_power_brake_nanoseconds: _Optional[int] = ..., pcie_tx_bytes_per_second: _Optional[int] = ..., pcie_rx_bytes_per_second: _Optional[int] = ..., pcie_replay_count: _Optional[int] = ..., ecc_corrected_volatile: _Optional[int] = ..., ecc_uncorrected_volatile: _Optional[int] = ..., ecc_corrected_aggregate: _Optional[int] = ..., ecc_uncorrected_aggregate: _Optional[int] = ..., remapped_rows_correctable: _Optional[int] = ..., remapped_rows_uncorrectable: _Optional[int] = ..., row_remap_pending: _Optional[bool] = ..., row_remap_failure: _Optional[bool] = ..., recovery_action: _Optional[int] = ..., xid_events: _Optional[_Iterable[_Union[XidEvent, _Mapping]]] = ..., nvlink_crc_flit_errors: _Optional[int] = ..., nvlink_crc_data_errors: _Optional[int] = ..., nvlink_replay_errors: _Optional[int] = ..., nvlink_recovery_errors: _Optional[int] = ..., processes: _Optional[_Union[ProcessList, _Mapping]] = ..., graphics_active_ppm: _Optional[int] = ..., sm_active_ppm: _Optional[int] = ..., sm_occupancy_ppm: _Optional[int] = ..., tensor_active_ppm: _Optional[int] = ..., dram_active_ppm: _Optional[int] = ..., fp64_active_ppm: _Optional[int] = ..., fp32_active_ppm: _Optional[int] = ..., fp16_active_ppm: _Optional[int] = ..., nvlink_tx_bytes_per_second: _Optional[int] = ..., nvlink_rx_bytes_per_second: _Optional[int] = ..., mig_instances: _Optional[_Iterable[_Union[MigSample, _Mapping]]] = ...) -> None: ...

class MigSample(_message.Message):
    __slots__ = ("gpu_instance_id", "compute_instance_id", "memory_used_bytes", "memory_free_bytes", "processes", "graphics_active_ppm", "sm_active_ppm", "sm_occupancy_ppm", "tensor_active_ppm", "dram_active_ppm", "fp64_active_ppm", "fp32_active_ppm", "fp16_active_ppm")
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    GRAPHICS_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    SM_OCCUPANCY_PPM_FIELD_NUMBER: _ClassVar[int]
    TENSOR_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    DRAM_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    FP64_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    FP32_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    FP16_ACTIVE_PPM_FIELD_NUMBER: _ClassVar[int]
    gpu_instance_id: int
    compute_instance_id: int
    memory_used_bytes: int
    memory_free_bytes: int
    processes: ProcessList
    graphics_active_ppm: int
    sm_active_ppm: int
    sm_occupancy_ppm: int
    tensor_active_ppm: int
    dram_active_ppm: int
    fp64_active_ppm: int
    fp32_active_ppm: int
    fp16_active_ppm: int
    def __init__(self, gpu_instance_id: _Optional[int] = ..., compute_instance_id: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., processes: _Optional[_Union[ProcessList, _Mapping]] = ..., graphics_active_ppm: _Optional[int] = ..., sm_active_ppm: _Optional[int] = ..., sm_occupancy_ppm: _Optional[int] = ..., tensor_active_ppm: _Optional[int] = ..., dram_active_ppm: _Optional[int] = ..., fp64_active_ppm: _Optional[int] = ..., fp32_active_ppm: _Optional[int] = ..., fp16_active_ppm: _Optional[int] = ...) -> None: ...

class XidEvent(_message.Message):
    __slots__ = ("code", "time_unix_nano")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    code: int
    time_unix_nano: int
    def __init__(self, code: _Optional[int] = ..., time_unix_nano: _Optional[int] = ...) -> None: ...

class ProcessList(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    def __init__(self, processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ...) -> None: ...

class GpuProcess(_message.Message):
    __slots__ = ("pid", "name", "used_memory_bytes")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    used_memory_bytes: int
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., used_memory_bytes: _Optional[int] = ...) -> None: ...

class AgentStats(_message.Message):
    __slots__ = ("invalid_values_dropped_total", "nvml_errors_total", "reports_dropped_total", "reconnects_total", "xid_events_total", "event_reports_dropped_total", "attribution_errors_total", "attribution_values_truncated_total")
    INVALID_VALUES_DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NVML_ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REPORTS_DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    XID_EVENTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EVENT_REPORTS_DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_VALUES_TRUNCATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    invalid_values_dropped_total: int
    nvml_errors_total: int
    reports_dropped_total: int
    reconnects_total: int
    xid_events_total: int
    event_reports_dropped_total: int
    attribution_errors_total: int
    attribution_values_truncated_total: int
    def __init__(self, invalid_values_dropped_total: _Optional[int] = ..., nvml_errors_total: _Optional[int] = ..., reports_dropped_total: _Optional[int] = ..., reconnects_total: _Optional[int] = ..., xid_events_total: _Optional[int] = ..., event_reports_dropped_total: _Optional[int] = ..., attribution_errors_total: _Optional[int] = ..., attribution_values_truncated_total: _Optional[int] = ...) -> None: ...
