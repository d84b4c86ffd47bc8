"""Real GPUs through NVML (the official nvidia-ml-py binding, module ``pynvml``).

Every NVML call goes through ``NvmlSource._call``: NOT_SUPPORTED becomes "absent"
(None), a missing function is logged once, GPU_IS_LOST aborts only that GPU's
sample, and other errors are counted and logged once per call and code. Counters
that NVML exposes as fields are read in one ``nvmlDeviceGetFieldValues`` call per
GPU. XID events arrive on their own thread through NVML's event API.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.sources.base import SourceUnavailable
from gpufleet.v1 import inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15

# Field ids (gpu-fleet-facts.md section 6), read in one batch per GPU.
FIELDS: dict[int, str] = {
    3: "ecc_corrected_volatile",
    4: "ecc_uncorrected_volatile",
    5: "ecc_corrected_aggregate",
    6: "ecc_uncorrected_aggregate",
    82: "memory_temperature_celsius",
    83: "energy_millijoules",
    94: "pcie_replay_count",
    142: "remapped_rows_correctable",
    143: "remapped_rows_uncorrectable",
    144: "row_remap_pending",
    145: "row_remap_failure",
    230: "recovery_action",
    74: "throttle_power_cap_nanoseconds",
    269: "throttle_sw_thermal_nanoseconds",
    270: "throttle_hw_thermal_nanoseconds",
    271: "throttle_hw_power_brake_nanoseconds",
    38: "nvlink_crc_flit_errors",
    45: "nvlink_crc_data_errors",
    52: "nvlink_replay_errors",
    59: "nvlink_recovery_errors",
}
FIELD_NVLINK_LINK_COUNT = 91

# nvmlValueType_t -> the member of the value union that holds it.
VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")

ARCHITECTURES = {
    2: "Kepler",
    3: "Maxwell",
    4: "Pascal",
    5: "Volta",
    6: "Turing",
    7: "Ampere",
    8: "Ada",
    9: "Hopper",
    10: "Blackwell",
}

XID_EVENT_TYPE = 0x8  # nvmlEventTypeXidCriticalError
MEMORY_INFO_V2 = 0x02000028  # nvmlMemory_v2: adds the reserved size
TEMPERATURE_GPU = 0
CLOCK_SM = 1
CLOCK_MEM = 2
PCIE_TX_BYTES = 0
PCIE_RX_BYTES = 1
PCIE_THROUGHPUT_UNIT_BYTES = 1024  # NVML reports PCIe throughput in KB/s


class GpuLost(Exception):
    """NVML returned GPU_IS_LOST: the GPU fell off the bus."""


def _decode(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class NvmlSource:
    """A node's GPUs as NVML sees them."""

    def __init__(self, nvml: Any = None, *, watch_xids: bool = True) -> None:
        """``nvml``: the pynvml module (imported when None), or a stand-in with its API."""
        if nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise SourceUnavailable(
                    "the nvidia-ml-py package is not installed; `pip install nvidia-ml-py`, "
                    "or use --source sim to run without GPUs"
                ) from exc
            nvml = pynvml
        self._nvml: Any = nvml
        self._logged: set[tuple[str, int]] = set()
        self.errors_total = 0
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            raise SourceUnavailable(
                f"NVML could not start ({exc}): is the NVIDIA driver installed and loaded? "
                "Use --source sim to run without GPUs"
            ) from exc
        count = self._nvml.nvmlDeviceGetCount()
        self._handles: list[Any] = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._xid_lock = threading.Lock()
        self._xids: list[tuple[int, int, int]] = []  # (gpu index, xid, time ns)
        self._stop = threading.Event()
        self._xid_thread: threading.Thread | None = None
        if watch_xids:
            self._xid_thread = threading.Thread(target=self._watch_xids, name="nvml-xid-events", daemon=True)
            self._xid_thread.start()

    # -- the choke point -------------------------------------------------------------

    def _call(self, name: str, *args: Any) -> Any:
        """Call NVML's ``name``; None means absent. Raises GpuLost."""
        fn: Callable[..., Any] | None = getattr(self._nvml, name, None)
        if fn is None:
            self._log_once(name, NVML_ERROR_FUNCTION_NOT_FOUND, "not in this nvidia-ml-py")
            return None
        try:
            return _decode(fn(*args))
        except self._nvml.NVMLError as exc:
            code = getattr(exc, "value", -1)
            if code == NVML_ERROR_NOT_SUPPORTED:
                return None
            if code == NVML_ERROR_GPU_IS_LOST:
                raise GpuLost(str(exc)) from exc
            if code != NVML_ERROR_FUNCTION_NOT_FOUND:
                self.errors_total += 1
            self._log_once(name, code, str(exc))
            return None

    def _log_once(self, name: str, code: int, message: str) -> None:
        if (name, code) not in self._logged:
            self._logged.add((name, code))
            log.warning("NVML %s failed: %s (logged once)", name, message)

    # -- inventory -------------------------------------------------------------------

    def inventory(self) -> inventory_pb2.NodeInventory:
        cuda = self._call("nvmlSystemGetCudaDriverVersion")
        node = inventory_pb2.NodeInventory(
            driver_version=self._call("nvmlSystemGetDriverVersion") or "",
            cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else "",
            nvml_version=self._call("nvmlSystemGetNVMLVersion") or "",
        )
        for index, handle in enumerate(self._handles):
            try:
                node.gpus.append(self._gpu_inventory(index, handle))
            except GpuLost:
                node.gpus.append(inventory_pb2.GpuInventory(index=index))
        return node

    def _gpu_inventory(self, index: int, handle: Any) -> inventory_pb2.GpuInventory:
        gpu = inventory_pb2.GpuInventory(
            index=index,
            uuid=self._call("nvmlDeviceGetUUID", handle) or "",
            serial=self._call("nvmlDeviceGetSerial", handle) or "",
            name=self._call("nvmlDeviceGetName", handle) or "",
            vbios_version=self._call("nvmlDeviceGetVbiosVersion", handle) or "",
        )
        arch = self._call("nvmlDeviceGetArchitecture", handle)
        if arch is not None:
            gpu.architecture = ARCHITECTURES.get(arch, f"unknown ({arch})")
        cc = self._call("nvmlDeviceGetCudaComputeCapability", handle)
        if cc is not None:
            gpu.compute_capability = f"{cc[0]}.{cc[1]}"
        pci = self._call("nvmlDeviceGetPciInfo", handle)
        if pci is not None:
            gpu.pci_bus_id = _decode(pci.busId)
        memory = self._call("nvmlDeviceGetMemoryInfo", handle)
        if memory is not None:
            gpu.memory_total_bytes = memory.total
        _set(
            gpu,
            "power_limit_default_milliwatts",
            self._call("nvmlDeviceGetPowerManagementDefaultLimit", handle),
        )
        _set(gpu, "power_limit_enforced_milliwatts", self._call("nvmlDeviceGetEnforcedPowerLimit", handle))
        limits = self._call("nvmlDeviceGetPowerManagementLimitConstraints", handle)
        if limits is not None:
            gpu.power_limit_min_milliwatts, gpu.power_limit_max_milliwatts = limits
        _set(gpu, "max_sm_clock_mhz", self._call("nvmlDeviceGetMaxClockInfo", handle, CLOCK_SM))
        _set(gpu, "max_memory_clock_mhz", self._call("nvmlDeviceGetMaxClockInfo", handle, CLOCK_MEM))
        for field_name, function in (
            ("mig_enabled", "nvmlDeviceGetMigMode"),
            ("ecc_enabled", "nvmlDeviceGetEccMode"),
        ):
            current_and_pending = self._call(function, handle)
            if current_and_pending is not None:
                setattr(gpu, field_name, bool(current_and_pending[0]))
        persistence = self._call("nvmlDeviceGetPersistenceMode", handle)
        if persistence is not None:
            gpu.persistence_enabled = bool(persistence)
        links = self._field_values(handle, [FIELD_NVLINK_LINK_COUNT]).get(FIELD_NVLINK_LINK_COUNT)
        if links is not None:
            gpu.nvlink_link_count = int(links)
        return gpu

    # -- telemetry -------------------------------------------------------------------

    def sample(self, *, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        samples = []
        xids = self._take_xids()
        for index, handle in enumerate(self._handles):
            try:
                sample = self._gpu_sample(index, handle, with_processes)
            except GpuLost as exc:
                sample = telemetry_pb2.GpuSample(
                    index=index, read_status=telemetry_pb2.GPU_READ_STATUS_LOST, read_error=str(exc)
                )
            for gpu_index, code, at_ns in xids:
                if gpu_index == index:
                    sample.xid_events.add(code=code, time_unix_nano=at_ns)
            samples.append(sample)
        return samples

    def _gpu_sample(self, index: int, handle: Any, with_processes: bool) -> telemetry_pb2.GpuSample:
        s = telemetry_pb2.GpuSample(index=index, read_status=telemetry_pb2.GPU_READ_STATUS_OK)
        util = self._call("nvmlDeviceGetUtilizationRates", handle)
        if util is not None:
            s.gpu_utilization_percent = util.gpu
            s.memory_copy_utilization_percent = util.memory
        for field_name, function in (
            ("encoder_utilization_percent", "nvmlDeviceGetEncoderUtilization"),
            ("decoder_utilization_percent", "nvmlDeviceGetDecoderUtilization"),
        ):
            value_and_period = self._call(function, handle)
            if value_and_period is not None:
                setattr(s, field_name, value_and_period[0])
        memory = self._call("nvmlDeviceGetMemoryInfo", handle, MEMORY_INFO_V2)
        if memory is not None:
            s.memory_used_bytes = memory.used
            s.memory_free_bytes = memory.free
            s.memory_reserved_bytes = memory.reserved
        _set(s, "gpu_temperature_celsius", self._call("nvmlDeviceGetTemperature", handle, TEMPERATURE_GPU))
        _set(s, "power_draw_milliwatts", self._call("nvmlDeviceGetPowerUsage", handle))
        _set(s, "sm_clock_mhz", self._call("nvmlDeviceGetClockInfo", handle, CLOCK_SM))
        _set(s, "memory_clock_mhz", self._call("nvmlDeviceGetClockInfo", handle, CLOCK_MEM))
        _set(s, "fan_speed_percent", self._call("nvmlDeviceGetFanSpeed", handle))
        _set(s, "performance_state", self._call("nvmlDeviceGetPerformanceState", handle))
        _set(s, "clock_event_reasons", self._call("nvmlDeviceGetCurrentClocksEventReasons", handle))
        for field_name, counter in (
            ("pcie_tx_bytes_per_second", PCIE_TX_BYTES),
            ("pcie_rx_bytes_per_second", PCIE_RX_BYTES),
        ):
            kilobytes = self._call("nvmlDeviceGetPcieThroughput", handle, counter)
            if kilobytes is not None:
                setattr(s, field_name, kilobytes * PCIE_THROUGHPUT_UNIT_BYTES)
        for field_id, value in self._field_values(handle, list(FIELDS)).items():
            field_name = FIELDS[field_id]
            setattr(s, field_name, bool(value) if field_name.startswith("row_remap_") else int(value))
        if with_processes:
            processes = self._call("nvmlDeviceGetComputeRunningProcesses", handle)
            if processes is not None:
                s.processes.SetInParent()
                for process in processes:
                    entry = s.processes.processes.add(pid=process.pid, name=_process_name(process.pid))
                    if process.usedGpuMemory is not None:
                        entry.used_memory_bytes = process.usedGpuMemory
        return s

    def _field_values(self, handle: Any, field_ids: list[int]) -> dict[int, float | int]:
        """One nvmlDeviceGetFieldValues call; each value checked on its own return code."""
        values = self._call("nvmlDeviceGetFieldValues", handle, field_ids)
        if values is None:
            return {}
        result: dict[int, float | int] = {}
        for value in values:
            if value.nvmlReturn == NVML_ERROR_GPU_IS_LOST:
                raise GpuLost("GPU is lost")
            if value.nvmlReturn != NVML_SUCCESS or not 0 <= value.valueType < len(VALUE_MEMBERS):
                continue
            result[value.fieldId] = getattr(value.value, VALUE_MEMBERS[value.valueType])
        return result

    # -- XID events ------------------------------------------------------------------

    def _watch_xids(self) -> None:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.warning("NVML events unavailable, XIDs will not be reported: %s", exc)
            return
        registered = 0
        for handle in self._handles:
            try:
                nvml.nvmlDeviceRegisterEvents(handle, XID_EVENT_TYPE, event_set)
                registered += 1
            except nvml.NVMLError as exc:
                log.warning("cannot watch XIDs on a GPU: %s", exc)
        try:
            while registered and not self._stop.is_set():
                try:
                    data = nvml.nvmlEventSetWait_v2(event_set, 500)
                except nvml.NVMLError as exc:
                    if getattr(exc, "value", None) != NVML_ERROR_TIMEOUT:
                        self._log_once("nvmlEventSetWait_v2", getattr(exc, "value", -1), str(exc))
                        self._stop.wait(1.0)
                    continue
                if data.eventType & XID_EVENT_TYPE:
                    index = self._call("nvmlDeviceGetIndex", data.device)
                    with self._xid_lock:
                        self._xids.append(
                            (index if index is not None else -1, int(data.eventData), time.time_ns())
                        )
        finally:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlEventSetFree(event_set)

    def _take_xids(self) -> list[tuple[int, int, int]]:
        with self._xid_lock:
            xids, self._xids = self._xids, []
        return xids

    def close(self) -> None:
        self._stop.set()
        if self._xid_thread is not None:
            self._xid_thread.join(timeout=2.0)
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def _set(message: Any, field_name: str, value: Any) -> None:
    if value is not None:
        setattr(message, field_name, value)


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
