"""A fake ``pynvml`` module: tables of what real GPUs return, NOT_SUPPORTED and lost GPUs included.

Values come from real `nvidia-smi -q` captures summarised in gpu-fleet-facts.md
(H100 on driver 565, A100 on driver 555). Errors are the real binding's
``pynvml.NVMLError(code)`` (which is the matching NVMLError_* subclass); handles are the
binding's ``c_nvmlDevice_t`` pointers, and values come back in its own ctypes structures
(memory, utilization, PCI info, field values, event data), so attribute names and value
types are those of nvidia-ml-py. Constants the fake does not define itself (NVML_*,
nvmlEventType*) are the binding's; ``renumbered`` changes any of them, to show that code
uses them by name.

Any entry set to NOT_SUPPORTED raises NOT_SUPPORTED; a GPU marked lost raises GPU_IS_LOST
from every call, handle enumeration included. Tests can also add and remove GPUs, unload
and reload the driver, make one GPU fail every call, and make any function raise any
exception.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import queue
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any, Concatenate, ParamSpec, TypeVar


def _load_binding() -> Any:
    """nvidia-ml-py's own ``pynvml``, also where ``import pynvml`` finds a stand-in built on this fake."""
    import pynvml

    if hasattr(pynvml, "c_nvmlMemory_v2_t"):
        return pynvml
    location = importlib.metadata.distribution("nvidia-ml-py").locate_file("pynvml.py")
    spec = importlib.util.spec_from_file_location("_nvidia_ml_py", str(location))
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the binding looks itself up there to make its NVMLError_* classes
    spec.loader.exec_module(module)
    return module


pynvml = _load_binding()

NVMLError = pynvml.NVMLError
NVML_SUCCESS: int = pynvml.NVML_SUCCESS
NVML_ERROR_UNINITIALIZED: int = pynvml.NVML_ERROR_UNINITIALIZED
NVML_ERROR_INVALID_ARGUMENT: int = pynvml.NVML_ERROR_INVALID_ARGUMENT
NVML_ERROR_NOT_SUPPORTED: int = pynvml.NVML_ERROR_NOT_SUPPORTED
NVML_ERROR_NO_PERMISSION: int = pynvml.NVML_ERROR_NO_PERMISSION
NVML_ERROR_DRIVER_NOT_LOADED: int = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
NVML_ERROR_TIMEOUT: int = pynvml.NVML_ERROR_TIMEOUT
NVML_ERROR_LIBRARY_NOT_FOUND: int = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
NVML_ERROR_GPU_IS_LOST: int = pynvml.NVML_ERROR_GPU_IS_LOST
NVML_ERROR_LIB_RM_VERSION_MISMATCH: int = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
NVML_ERROR_UNKNOWN: int = pynvml.NVML_ERROR_UNKNOWN
NOT_SUPPORTED = object()


def h100_table() -> dict[str, Any]:
    return {
        "name": "NVIDIA H100 80GB HBM3",
        "arch": 9,
        "cc": (9, 0),
        "serial": "1654922001234",
        "vbios": "96.00.89.00.01",
        "memory_total": 81_559 * 2**20,
        "memory_reserved": 454 * 2**20,
        "memory_used": 40_000 * 2**20,
        "power_default": 700_000,
        "power_enforced": 700_000,
        "power_constraints": [200_000, 700_000],
        "max_sm": 1980,
        "max_mem": 2619,
        "mig": [0, 0],
        "ecc": [1, 1],
        "persistence": 1,
        "utilization": (97, 31),
        "encoder": [0, 167000],
        "decoder": [0, 167000],
        "temperature": 64,
        "power": 612_345,
        "sm_clock": 1980,
        "mem_clock": 2619,
        "fan": NOT_SUPPORTED,  # SXM boards have no fan
        "pstate": 0,
        "clock_reasons": 0x0,
        "pcie_tx_kb": 1200,
        "pcie_rx_kb": 3400,
        "processes": [SimpleNamespace(pid=4242, usedGpuMemory=39_000 * 2**20)],
        "fields": {
            3: 0,
            4: 0,
            5: 2,
            6: 0,
            82: 71,
            83: 123_456_789,
            94: 7,
            142: 0,
            143: 0,
            144: 0,
            145: 0,
            230: 0,
            74: 5_000_000,
            269: 0,
            270: 0,
            271: 0,
            38: 0,
            45: 0,
            52: 0,
            59: 0,
            91: 18,
        },
    }


def a100_table() -> dict[str, Any]:
    table = h100_table()
    table.update(
        {
            "name": "NVIDIA A100-SXM4-80GB",
            "arch": 7,
            "cc": (8, 0),
            "memory_total": 81_920 * 2**20,
            "memory_reserved": 763 * 2**20,
            "power_default": 400_000,
            "power_enforced": 400_000,
            "power_constraints": [100_000, 400_000],
            "max_sm": 1410,
            "max_mem": 1593,
            "utilization": (0, 0),
            "temperature": 24,
            "power": 59_000,
            "sm_clock": 210,
            "mem_clock": 1593,
            "clock_reasons": 0x1,
            "processes": [],
        }
    )
    # Driver 555 knows no recovery-action field; the A100 has 12 NVLinks.
    table["fields"] = {**table["fields"], 230: NOT_SUPPORTED, 91: 12, 82: 43}
    return table


@dataclass
class FakeGpu:
    table: dict[str, Any]
    uuid: str
    bus_id: str
    lost: bool = False
    # When set, every call on this GPU raises NVMLError(error), e.g. NVML_ERROR_UNKNOWN.
    error: int | None = None
    # What the handle points at: a cell of its own, as a real handle points at the driver's device.
    _cell: ctypes.c_uint64 = field(default_factory=ctypes.c_uint64, init=False, repr=False, compare=False)

    @property
    def handle(self) -> Any:
        """A real ``c_nvmlDevice_t``: a new pointer object each time, to the same address."""
        return ctypes.cast(ctypes.pointer(self._cell), pynvml.c_nvmlDevice_t)

    @property
    def address(self) -> int:
        return ctypes.addressof(self._cell)


@dataclass
class _EventSet:
    registered: dict[int, int] = field(default_factory=dict)  # GPU address -> event types
    freed: bool = False


P = ParamSpec("P")
R = TypeVar("R")


def _api(fn: Callable[Concatenate[FakeNvml, P], R]) -> Callable[Concatenate[FakeNvml, P], R]:
    """A function of the binding: counted, raising what a test asked for, failing while the driver is out."""

    @functools.wraps(fn)
    def call(nvml: FakeNvml, /, *args: P.args, **kwargs: P.kwargs) -> R:
        name = fn.__name__
        nvml.calls[name] += 1
        if name in nvml.raises:
            raise nvml.raises[name]
        if name not in ("nvmlInit", "nvmlShutdown"):
            if nvml.driver_error is not None:
                raise NVMLError(nvml.driver_error)
            if nvml.stale_session:
                raise NVMLError(nvml._code("NVML_ERROR_UNINITIALIZED"))
        return fn(nvml, *args, **kwargs)

    return call


@dataclass
class FakeNvml:
    """Pass an instance where the code expects the ``pynvml`` module."""

    gpus: list[FakeGpu]
    init_error: int | None = None
    events: queue.Queue[tuple[int, int]] = field(default_factory=queue.Queue)
    driver_version: str = "565.57.01"
    # While set, every call fails with this code (unload_driver sets it, load_driver clears it).
    driver_error: int | None = None
    # After the driver came back, calls fail with UNINITIALIZED until nvmlInit is called again.
    stale_session: bool = False
    # Function name -> the exception it raises instead of answering (OSError, AttributeError ...).
    raises: dict[str, BaseException] = field(default_factory=dict)
    # Binding constant name -> the number this fake uses for it instead of NVML's.
    renumbered: dict[str, int] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    _event_sets: list[_EventSet] = field(default_factory=list, init=False, repr=False)
    _made: int = field(default=0, init=False, repr=False)  # GPUs made so far, for unique ids

    NVMLError = NVMLError

    def __post_init__(self) -> None:
        self._made = len(self.gpus)

    def __getattr__(self, name: str) -> Any:
        # Only constants: a function the fake lacks is one "not in this nvidia-ml-py".
        if name.startswith(("NVML_", "nvmlEventType")) or name in ("nvmlMemory_v2",):
            renumbered = self.__dict__.get("renumbered", {})
            return renumbered[name] if name in renumbered else getattr(pynvml, name)
        raise AttributeError(name)

    # -- helpers for tests ---------------------------------------------------
    def emit_xid(self, index: int, code: int) -> None:
        self.events.put((index, code))

    def add_gpu(self, table: dict[str, Any]) -> FakeGpu:
        """A GPU appears on the node (hot-plugged, or back after a reset); NVML lists it last."""
        gpu = FakeGpu(
            table,
            uuid=f"GPU-{self._made:08d}-aaaa-bbbb-cccc-dddddddddddd",
            bus_id=f"00000000:{0x18 + self._made:02X}:00.0",
        )
        self._made += 1
        self.gpus.append(gpu)
        return gpu

    def remove_gpu(self, index: int) -> FakeGpu:
        """The GPU at ``index`` is gone; NVML numbers the rest again, and its old handle is lost."""
        return self.gpus.pop(index)

    def unload_driver(self, error: int = NVML_ERROR_DRIVER_NOT_LOADED) -> None:
        """The driver goes away (unloaded, or upgraded under the library): calls fail with ``error``."""
        self.driver_error = error
        self.stale_session = True
        for event_set in self._event_sets:
            event_set.freed = True  # the session's event sets go with it

    def load_driver(self, version: str | None = None) -> None:
        """The driver is back (``version``, if upgraded); calls need a new nvmlInit first."""
        self.driver_error = None
        if version is not None:
            self.driver_version = version

    def _code(self, name: str) -> int:
        return int(getattr(self, name))

    def _gpu(self, handle: Any) -> FakeGpu:
        """The GPU a handle points at; a handle of a GPU no longer listed is a lost GPU."""
        if isinstance(handle, FakeGpu):
            return handle
        address = ctypes.cast(handle, ctypes.c_void_p).value
        for gpu in self.gpus:
            if gpu.address == address:
                return gpu
        raise NVMLError(self._code("NVML_ERROR_GPU_IS_LOST"))

    def _value(self, handle: Any, key: str) -> Any:
        gpu = self._gpu(handle)
        if gpu.lost:
            raise NVMLError(self._code("NVML_ERROR_GPU_IS_LOST"))
        if gpu.error is not None:
            raise NVMLError(gpu.error)
        value = gpu.table[key]
        if value is NOT_SUPPORTED:
            raise NVMLError(self._code("NVML_ERROR_NOT_SUPPORTED"))
        return value

    def _choose(self, handle: Any, kind: int, keys: dict[str, str]) -> Any:
        """The table entry for an enum argument (a clock, a sensor) named by the binding's constants."""
        for constant, key in keys.items():
            if kind == self._code(constant):
                return self._value(handle, key)
        self._gpu(handle)
        raise NVMLError(self._code("NVML_ERROR_INVALID_ARGUMENT"))

    # -- the pynvml API the agent uses -----------------------------------------
    @_api
    def nvmlInit(self) -> None:  # noqa: N802
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        if self.driver_error is not None:
            raise NVMLError(self.driver_error)
        self.stale_session = False

    @_api
    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    @_api
    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    @_api
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:  # noqa: N802
        if not 0 <= index < len(self.gpus):
            raise NVMLError(self._code("NVML_ERROR_INVALID_ARGUMENT"))
        gpu = self.gpus[index]
        if gpu.lost:
            raise NVMLError(self._code("NVML_ERROR_GPU_IS_LOST"))
        if gpu.error is not None:
            raise NVMLError(gpu.error)
        return gpu.handle

    @_api
    def nvmlDeviceGetIndex(self, handle: Any) -> int:  # noqa: N802
        gpu = self._gpu(handle)
        return next(i for i, listed in enumerate(self.gpus) if listed is gpu)

    @_api
    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return self.driver_version

    @_api
    def nvmlSystemGetCudaDriverVersion(self) -> int:  # noqa: N802
        return 12070

    @_api
    def nvmlSystemGetNVMLVersion(self) -> str:  # noqa: N802
        return f"12.{self.driver_version}"

    @_api
    def nvmlDeviceGetUUID(self, h: Any) -> str:  # noqa: N802
        self._value(h, "name")
        return self._gpu(h).uuid

    @_api
    def nvmlDeviceGetSerial(self, h: Any) -> bytes:  # noqa: N802
        return str(self._value(h, "serial")).encode()  # older bindings return bytes

    @_api
    def nvmlDeviceGetName(self, h: Any) -> str:  # noqa: N802
        return str(self._value(h, "name"))

    @_api
    def nvmlDeviceGetVbiosVersion(self, h: Any) -> str:  # noqa: N802
        return str(self._value(h, "vbios"))

    @_api
    def nvmlDeviceGetArchitecture(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "arch"))

    @_api
    def nvmlDeviceGetCudaComputeCapability(self, h: Any) -> tuple[int, int]:  # noqa: N802
        major, minor = self._value(h, "cc")
        return int(major), int(minor)

    @_api
    def nvmlDeviceGetPciInfo(self, h: Any) -> Any:  # noqa: N802
        self._value(h, "name")
        bus_id = self._gpu(h).bus_id
        domain, bus, device_function = bus_id.split(":")
        info = pynvml.nvmlPciInfo_t()
        info.busId = bus_id
        info.busIdLegacy = bus_id
        info.domain = int(domain, 16)
        info.bus = int(bus, 16)
        info.device = int(device_function.split(".")[0], 16)
        return info

    @_api
    def nvmlDeviceGetMemoryInfo(self, h: Any, version: int | None = None) -> Any:  # noqa: N802
        total, reserved, used = (
            self._value(h, k) for k in ("memory_total", "memory_reserved", "memory_used")
        )
        free = total - reserved - used
        if not version:  # nvmlMemory_t: "used" includes what the driver reserves
            return pynvml.c_nvmlMemory_t(total=total, free=free, used=used + reserved)
        if version != self._code("nvmlMemory_v2"):
            raise NVMLError(self._code("NVML_ERROR_ARGUMENT_VERSION_MISMATCH"))
        return pynvml.c_nvmlMemory_v2_t(version=version, total=total, reserved=reserved, free=free, used=used)

    @_api
    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "power_default"))

    @_api
    def nvmlDeviceGetEnforcedPowerLimit(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "power_enforced"))

    @_api
    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: Any) -> list[int]:  # noqa: N802
        return list(self._value(h, "power_constraints"))

    @_api
    def nvmlDeviceGetMaxClockInfo(self, h: Any, clock: int) -> int:  # noqa: N802
        return int(self._choose(h, clock, {"NVML_CLOCK_SM": "max_sm", "NVML_CLOCK_MEM": "max_mem"}))

    @_api
    def nvmlDeviceGetMigMode(self, h: Any) -> list[int]:  # noqa: N802
        return list(self._value(h, "mig"))

    @_api
    def nvmlDeviceGetEccMode(self, h: Any) -> list[int]:  # noqa: N802
        return list(self._value(h, "ecc"))

    @_api
    def nvmlDeviceGetPersistenceMode(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "persistence"))

    @_api
    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:  # noqa: N802
        gpu, memory = self._value(h, "utilization")
        return pynvml.c_nvmlUtilization_t(gpu=gpu, memory=memory)

    @_api
    def nvmlDeviceGetEncoderUtilization(self, h: Any) -> list[int]:  # noqa: N802
        return list(self._value(h, "encoder"))

    @_api
    def nvmlDeviceGetDecoderUtilization(self, h: Any) -> list[int]:  # noqa: N802
        return list(self._value(h, "decoder"))

    @_api
    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:  # noqa: N802
        return int(self._choose(h, sensor, {"NVML_TEMPERATURE_GPU": "temperature"}))

    @_api
    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "power"))

    @_api
    def nvmlDeviceGetClockInfo(self, h: Any, clock: int) -> int:  # noqa: N802
        return int(self._choose(h, clock, {"NVML_CLOCK_SM": "sm_clock", "NVML_CLOCK_MEM": "mem_clock"}))

    @_api
    def nvmlDeviceGetFanSpeed(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "fan"))

    @_api
    def nvmlDeviceGetPerformanceState(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "pstate"))

    @_api
    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "clock_reasons"))

    @_api
    def nvmlDeviceGetPcieThroughput(self, h: Any, counter: int) -> int:  # noqa: N802
        keys = {"NVML_PCIE_UTIL_TX_BYTES": "pcie_tx_kb", "NVML_PCIE_UTIL_RX_BYTES": "pcie_rx_kb"}
        return int(self._choose(h, counter, keys))

    @_api
    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[Any]:  # noqa: N802
        """As the binding does: each process a friendly object made from c_nvmlProcessInfo_t."""
        not_available = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
        processes = []
        for process in self._value(h, "processes"):
            used = process.usedGpuMemory
            info = pynvml.c_nvmlProcessInfo_t(
                pid=process.pid, usedGpuMemory=not_available if used is None else used
            )
            friendly = pynvml.nvmlStructToFriendlyObject(info)
            if friendly.usedGpuMemory == not_available:
                friendly.usedGpuMemory = None
            processes.append(friendly)
        return processes

    @_api
    def nvmlDeviceGetFieldValues(self, h: Any, field_ids: list[int]) -> Any:  # noqa: N802
        """An array of c_nvmlFieldValue_t, each value with its own return code, as NVML fills it."""
        fields = self._value(h, "fields")
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        now_us = time.time_ns() // 1000
        for entry, field_id in zip(values, field_ids, strict=True):
            entry.fieldId = field_id
            entry.timestamp = now_us
            value = fields.get(field_id, NOT_SUPPORTED)
            if value is NOT_SUPPORTED:
                entry.nvmlReturn = self._code("NVML_ERROR_NOT_SUPPORTED")
            elif isinstance(value, float):
                entry.nvmlReturn = self._code("NVML_SUCCESS")
                entry.valueType = self._code("NVML_VALUE_TYPE_DOUBLE")
                entry.value.dVal = value
            elif value < 0:
                entry.nvmlReturn = self._code("NVML_SUCCESS")
                entry.valueType = self._code("NVML_VALUE_TYPE_SIGNED_LONG_LONG")
                entry.value.sllVal = value
            else:
                entry.nvmlReturn = self._code("NVML_SUCCESS")
                entry.valueType = self._code("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG")
                entry.value.ullVal = int(value)
        return values

    @_api
    def nvmlEventSetCreate(self) -> _EventSet:  # noqa: N802
        event_set = _EventSet()
        self._event_sets.append(event_set)
        return event_set

    @_api
    def nvmlDeviceRegisterEvents(self, h: Any, event_types: int, event_set: _EventSet) -> None:  # noqa: N802
        gpu = self._gpu(h)
        if gpu.lost:
            raise NVMLError(self._code("NVML_ERROR_GPU_IS_LOST"))
        event_set.registered[gpu.address] = event_set.registered.get(gpu.address, 0) | event_types

    @_api
    def nvmlEventSetWait_v2(self, event_set: _EventSet, timeout_ms: int) -> Any:  # noqa: N802
        """The next XID of a GPU registered in ``event_set``; others are lost, as NVML loses them."""
        if event_set.freed:
            raise NVMLError(self._code("NVML_ERROR_INVALID_ARGUMENT"))
        xid = self._code("nvmlEventTypeXidCriticalError")
        deadline = time.monotonic() + timeout_ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            try:
                index, code = self.events.get(timeout=left)
            except queue.Empty:
                break
            if self.driver_error is not None:
                raise NVMLError(self.driver_error)
            if not 0 <= index < len(self.gpus):
                continue
            gpu = self.gpus[index]
            if event_set.registered.get(gpu.address, 0) & xid:
                data = pynvml.c_nvmlEventData_t()
                data.device = gpu.handle
                data.eventType = xid
                data.eventData = code
                return data
        raise NVMLError(self._code("NVML_ERROR_TIMEOUT"))

    @_api
    def nvmlEventSetFree(self, event_set: _EventSet) -> None:  # noqa: N802
        event_set.freed = True

    def event_sets_in_use(self) -> list[_EventSet]:
        """The event sets created and not yet freed."""
        return [event_set for event_set in self._event_sets if not event_set.freed]

    def watched(self, index: int) -> bool:
        """True if an event set in use has the GPU at ``index`` registered for XIDs."""
        address = self.gpus[index].address
        xid = self._code("nvmlEventTypeXidCriticalError")
        return any(s.registered.get(address, 0) & xid for s in self.event_sets_in_use())


def fake_node(*tables: dict[str, Any]) -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(
                table,
                uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
                bus_id=f"00000000:{0x18 + i:02X}:00.0",
            )
            for i, table in enumerate(tables)
        ]
    )
