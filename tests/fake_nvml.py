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
and reload the driver, make one GPU fail every call, make any function raise any
exception, and take functions out of the binding (``remove``: an older nvidia-ml-py).

GPM (Hopper and later): the H100 supports it, the A100 does not. Each GPU's (and each MIG
device's) ``gpm`` entry holds the activity NVML reports for the interval that ends when a
GPM sample is taken, by the binding's metric names less ``NVML_GPM_METRIC_`` (percentages,
MiB/s); a metric set to NOT_SUPPORTED, or to an NVMLError, has that return code of its own.
Samples are the binding's ``c_nvmlGpmSample_t`` handles and ``nvmlGpmMetricsGet`` fills the
``c_nvmlGpmMetricsGet_t`` it is given, in place. ``set_mig`` puts a GPU in MIG mode with MIG
devices of the given profiles; their handles are ``c_nvmlDevice_t`` pointers too. As on real
GPUs, utilization and the row-remapping fields are NOT_SUPPORTED while MIG mode is on.
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


def h100_gpm() -> dict[str, Any]:
    """A busy H100's GPM metrics over an interval; PCIe as the NVML counters of the table say."""
    return {
        "GRAPHICS_UTIL": 97.0,
        "SM_UTIL": 62.5,
        "SM_OCCUPANCY": 31.25,
        "ANY_TENSOR_UTIL": 45.5,
        "DRAM_BW_UTIL": 38.0,
        "FP64_UTIL": 0.0,
        "FP32_UTIL": 12.0625,
        "FP16_UTIL": 3.5,
        "PCIE_TX_PER_SEC": 1200 / 1024,  # MiB/s: the table's 1200 KB/s
        "PCIE_RX_PER_SEC": 3400 / 1024,
        "NVLINK_TOTAL_TX_PER_SEC": 180_000.0,
        "NVLINK_TOTAL_RX_PER_SEC": 175_000.5,
    }


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
        "max_mig_devices": 7,
        "gpm_supported": True,
        "gpm": h100_gpm(),
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
            "gpm_supported": False,  # GPM is Hopper and later
            "gpm": {},
        }
    )
    # Driver 555 knows no recovery-action field; the A100 has 12 NVLinks.
    table["fields"] = {**table["fields"], 230: NOT_SUPPORTED, 91: 12, 82: 43}
    return table


# MIG profiles of the H100 80GB (`nvidia-smi mig -lgip`): GPU slices, memory in MiB.
MIG_PROFILES: dict[str, tuple[int, int]] = {
    "1g.10gb": (1, 9_984),
    "1g.20gb": (1, 20_096),
    "2g.20gb": (2, 20_096),
    "3g.40gb": (3, 40_448),
    "4g.40gb": (4, 40_448),
    "7g.80gb": (7, 81_152),
}
# The GPU instance ids NVML gives each size, first free first (placements simplified).
GPU_INSTANCE_IDS: dict[int, tuple[int, ...]] = {
    7: (0,),
    4: (1,),
    3: (1, 2),
    2: (3, 4, 5),
    1: (7, 8, 9, 10, 11, 12, 13),
}


class _Device:
    """What a handle points at: a cell of its own, as a real handle points at the driver's device."""

    _cell: ctypes.c_uint64
    address: int  # the cell's

    def __post_init__(self) -> None:
        self.address = ctypes.addressof(self._cell)

    @property
    def handle(self) -> Any:
        """A real ``c_nvmlDevice_t``: a new pointer object each time, to the same address."""
        return ctypes.cast(ctypes.pointer(self._cell), pynvml.c_nvmlDevice_t)


@dataclass
class FakeGpu(_Device):
    table: dict[str, Any]
    uuid: str
    bus_id: str
    lost: bool = False
    # When set, every call on this GPU raises NVMLError(error), e.g. NVML_ERROR_UNKNOWN.
    error: int | None = None
    # MIG device slots (index: the MIG device index), filled by FakeNvml.set_mig.
    migs: list[FakeMig | None] = field(default_factory=list)
    _cell: ctypes.c_uint64 = field(default_factory=ctypes.c_uint64, init=False, repr=False, compare=False)


@dataclass
class FakeMig(_Device):
    """A MIG device: what NVML answers on its handle, a compute instance of a GPU instance."""

    parent: FakeGpu = field(repr=False, compare=False)
    table: dict[str, Any]
    uuid: str
    gpu_instance_id: int
    compute_instance_id: int = 0
    _cell: ctypes.c_uint64 = field(default_factory=ctypes.c_uint64, init=False, repr=False, compare=False)


@dataclass
class _GpmSample:
    """What the fake keeps for one GPM sample buffer."""

    taken_of: tuple[int, int | None] | None = None  # (GPU address, GPU instance id or None)
    sequence: int = 0  # when it was taken, in the order of every sample the fake took
    activity: dict[str, Any] = field(default_factory=dict)
    freed: bool = False
    # What the sample handle points at.
    cell: ctypes.c_uint64 = field(default_factory=ctypes.c_uint64, repr=False)


class _Removed:
    """A binding function taken out (``FakeNvml.remove``): reading it raises AttributeError."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        raise AttributeError(self.name)


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
    # Names that are not in this binding (see remove).
    removed: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)
    _event_sets: list[_EventSet] = field(default_factory=list, init=False, repr=False)
    _made: int = field(default=0, init=False, repr=False)  # GPUs made so far, for unique ids
    _migs_made: int = field(default=0, init=False, repr=False)
    _gpm_samples: dict[int, _GpmSample] = field(default_factory=dict, init=False, repr=False)
    _gpm_taken: int = field(default=0, init=False, repr=False)

    NVMLError = NVMLError

    def __post_init__(self) -> None:
        self._made = len(self.gpus)

    def __getattr__(self, name: str) -> Any:
        # Only constants and structures: a function the fake lacks is one "not in this nvidia-ml-py".
        if name in self.__dict__.get("removed", ()):
            raise AttributeError(name)
        if name.startswith(("NVML_", "nvmlEventType", "c_nvml")) or name in ("nvmlMemory_v2",):
            renumbered = self.__dict__.get("renumbered", {})
            return renumbered[name] if name in renumbered else getattr(pynvml, name)
        raise AttributeError(name)

    def remove(self, *names: str) -> None:
        """An older binding: ``names`` (functions, constants, structures) are not in it."""
        self.removed.update(names)
        functions = {name: _Removed() for name in names if hasattr(type(self), name)}
        if functions:
            # A class of this instance's own, so that other fakes keep every function.
            self.__class__ = type(type(self).__name__, (type(self),), functions)

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

    def set_mig(self, index: int, profiles: list[str]) -> list[FakeMig]:
        """MIG mode on for the GPU at ``index``, with a GPU instance and compute instance per profile.

        Each MIG device is idle until a test sets its ``table["gpm"]`` (and memory, processes).
        """
        gpu = self.gpus[index]
        gpu.table["mig"] = [self._code("NVML_DEVICE_MIG_ENABLE")] * 2
        gpu.migs = []
        taken: set[int] = set()
        for profile in profiles:
            slices, mebibytes = MIG_PROFILES[profile]
            instance = next(i for i in GPU_INSTANCE_IDS[slices] if i not in taken)
            taken.add(instance)
            table = {
                "name": f"{gpu.table['name']} MIG {profile}",
                "memory_total": mebibytes * 2**20,
                "memory_reserved": 0,
                "memory_used": 0,
                "processes": [],
                "attributes": (slices, slices, mebibytes),  # GPU and compute slices, memory MiB
                "gpm": {key: 0.0 for key in h100_gpm() if key.endswith("_UTIL") or key == "SM_OCCUPANCY"},
            }
            gpu.migs.append(
                FakeMig(
                    parent=gpu,
                    table=table,
                    uuid=f"MIG-{self._migs_made:08d}-eeee-ffff-0000-111111111111",
                    gpu_instance_id=instance,
                )
            )
            self._migs_made += 1
        return [mig for mig in gpu.migs if mig is not None]

    def mig_off(self, index: int) -> None:
        gpu = self.gpus[index]
        gpu.table["mig"] = [self._code("NVML_DEVICE_MIG_DISABLE")] * 2
        gpu.migs = []

    def gpm_samples_in_use(self) -> int:
        """GPM sample buffers allocated and not yet freed."""
        return sum(not sample.freed for sample in self._gpm_samples.values())

    def unload_driver(self, error: int = NVML_ERROR_DRIVER_NOT_LOADED) -> None:
        """The driver goes away (unloaded, or upgraded under the library): calls fail with ``error``."""
        self.driver_error = error
        self.stale_session = True
        for event_set in self._event_sets:
            event_set.freed = True  # the session's event sets go with it
        for sample in self._gpm_samples.values():
            sample.freed = True  # and its GPM samples

    def load_driver(self, version: str | None = None) -> None:
        """The driver is back (``version``, if upgraded); calls need a new nvmlInit first."""
        self.driver_error = None
        if version is not None:
            self.driver_version = version

    def _code(self, name: str) -> int:
        return int(getattr(self, name))

    def _device(self, handle: Any) -> FakeGpu | FakeMig:
        """The GPU or MIG device a handle points at; a handle no longer listed is a lost GPU's."""
        if isinstance(handle, (FakeGpu, FakeMig)):
            return handle
        address = ctypes.cast(handle, ctypes.c_void_p).value
        for gpu in self.gpus:
            if gpu.address == address:
                return gpu
            for mig in gpu.migs:
                if mig is not None and mig.address == address:
                    return mig
        raise NVMLError(self._code("NVML_ERROR_GPU_IS_LOST"))

    def _gpu(self, handle: Any) -> FakeGpu:
        """The GPU a handle points at, for the functions that take no MIG device handle."""
        device = self._device(handle)
        if isinstance(device, FakeMig):
            raise NVMLError(self._code("NVML_ERROR_INVALID_ARGUMENT"))
        return device

    def _value(self, handle: Any, key: str) -> Any:
        device = self._device(handle)
        gpu = device.parent if isinstance(device, FakeMig) else device
        if gpu.lost:
            raise NVMLError(self._code("NVML_ERROR_GPU_IS_LOST"))
        if gpu.error is not None:
            raise NVMLError(gpu.error)
        if isinstance(device, FakeMig) and key not in device.table:
            raise NVMLError(self._code("NVML_ERROR_NOT_SUPPORTED"))  # what only whole GPUs answer
        value = device.table[key]
        if value is NOT_SUPPORTED:
            raise NVMLError(self._code("NVML_ERROR_NOT_SUPPORTED"))
        return value

    def _in_mig_mode(self, gpu: FakeGpu) -> bool:
        mode = gpu.table["mig"]
        return mode is not NOT_SUPPORTED and mode[0] == self._code("NVML_DEVICE_MIG_ENABLE")

    def _mig(self, handle: Any) -> FakeMig:
        """The MIG device a handle points at; NOT_SUPPORTED where it is a whole GPU's."""
        self._value(handle, "name")
        device = self._device(handle)
        if not isinstance(device, FakeMig):
            raise NVMLError(self._code("NVML_ERROR_NOT_SUPPORTED"))
        return device

    def _gpm_sample(self, sample: Any) -> _GpmSample:
        """The buffer a GPM sample handle points at; INVALID_ARGUMENT if unknown or freed."""
        record = self._gpm_samples.get(ctypes.cast(sample, ctypes.c_void_p).value or 0)
        if record is None or record.freed:
            raise NVMLError(self._code("NVML_ERROR_INVALID_ARGUMENT"))
        return record

    def _gpm_metric_names(self) -> dict[int, str]:
        """GPM metric id -> its name less NVML_GPM_METRIC_, with this fake's numbers."""
        renumbered = tuple(sorted(self.renumbered.items()))
        cached = self.__dict__.get("_metric_names")
        if cached is None or cached[0] != renumbered:
            prefix = "NVML_GPM_METRIC_"
            names = {
                self._code(name): name.removeprefix(prefix)
                for name in vars(pynvml)
                if name.startswith(prefix)
            }
            cached = self.__dict__["_metric_names"] = (renumbered, names)
        return cached[1]

    def _take(self, sample: Any, of: tuple[int, int | None], activity: dict[str, Any]) -> Any:
        record = self._gpm_sample(sample)
        self._gpm_taken += 1
        record.taken_of, record.sequence, record.activity = of, self._gpm_taken, dict(activity)
        return sample

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
        return self._device(h).uuid

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
        if self._in_mig_mode(self._gpu(h)):
            raise NVMLError(self._code("NVML_ERROR_NOT_SUPPORTED"))
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
        if self._in_mig_mode(self._gpu(h)):  # no row-remapping queries while MIG is on
            fields = {**fields, **dict.fromkeys((142, 143, 144, 145), NOT_SUPPORTED)}
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

    # -- MIG -------------------------------------------------------------------
    @_api
    def nvmlDeviceGetMaxMigDeviceCount(self, h: Any) -> int:  # noqa: N802
        return int(self._value(h, "max_mig_devices"))

    @_api
    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Any, index: int) -> Any:  # noqa: N802
        count = int(self._value(h, "max_mig_devices"))
        gpu = self._gpu(h)
        if not self._in_mig_mode(gpu):
            raise NVMLError(self._code("NVML_ERROR_NOT_SUPPORTED"))
        if not 0 <= index < count:
            raise NVMLError(self._code("NVML_ERROR_INVALID_ARGUMENT"))
        mig = gpu.migs[index] if index < len(gpu.migs) else None
        if mig is None:
            raise NVMLError(self._code("NVML_ERROR_NOT_FOUND"))  # an empty slot
        return mig.handle

    @_api
    def nvmlDeviceGetGpuInstanceId(self, h: Any) -> int:  # noqa: N802
        return self._mig(h).gpu_instance_id

    @_api
    def nvmlDeviceGetComputeInstanceId(self, h: Any) -> int:  # noqa: N802
        return self._mig(h).compute_instance_id

    @_api
    def nvmlDeviceGetAttributes(self, h: Any) -> Any:  # noqa: N802
        """nvmlDeviceGetAttributes_v2, as the binding calls it: on MIG device handles only."""
        self._mig(h)
        slices, compute_slices, mebibytes = self._value(h, "attributes")
        return pynvml.c_nvmlDeviceAttributes(
            gpuInstanceSliceCount=slices, computeInstanceSliceCount=compute_slices, memorySizeMB=mebibytes
        )

    # -- GPM -------------------------------------------------------------------
    @_api
    def nvmlGpmQueryDeviceSupport(self, h: Any) -> Any:  # noqa: N802
        supported = self._value(h, "gpm_supported")
        return pynvml.c_nvmlGpmSupport_t(
            version=self._code("NVML_GPM_SUPPORT_VERSION"), isSupportedDevice=int(bool(supported))
        )

    @_api
    def nvmlGpmSampleAlloc(self) -> Any:  # noqa: N802
        record = _GpmSample()
        self._gpm_samples[ctypes.addressof(record.cell)] = record
        return ctypes.cast(ctypes.pointer(record.cell), pynvml.c_nvmlGpmSample_t)

    @_api
    def nvmlGpmSampleFree(self, sample: Any) -> None:  # noqa: N802
        self._gpm_sample(sample).freed = True

    @_api
    def nvmlGpmSampleGet(self, h: Any, sample: Any) -> Any:  # noqa: N802
        if not self._value(h, "gpm_supported"):
            raise NVMLError(self._code("NVML_ERROR_NOT_SUPPORTED"))
        gpu = self._gpu(h)
        return self._take(sample, (gpu.address, None), self._value(h, "gpm"))

    @_api
    def nvmlGpmMigSampleGet(self, h: Any, gpu_instance_id: int, sample: Any) -> Any:  # noqa: N802
        if not self._value(h, "gpm_supported"):
            raise NVMLError(self._code("NVML_ERROR_NOT_SUPPORTED"))
        gpu = self._gpu(h)
        if not self._in_mig_mode(gpu):
            raise NVMLError(self._code("NVML_ERROR_INVALID_ARGUMENT"))
        for mig in gpu.migs:
            if mig is not None and mig.gpu_instance_id == gpu_instance_id:
                return self._take(sample, (gpu.address, gpu_instance_id), mig.table["gpm"])
        raise NVMLError(self._code("NVML_ERROR_NOT_FOUND"))

    @_api
    def nvmlGpmMetricsGet(self, metrics_get: Any) -> Any:  # noqa: N802
        """Fills ``metrics_get`` (a c_nvmlGpmMetricsGet_t) in place and returns it, as the binding does.

        The metrics are the activity of the interval that sample2 closes; sample1 must be an
        earlier sample of the same GPU (or GPU instance).
        """
        if not isinstance(metrics_get, pynvml.c_nvmlGpmMetricsGet_t):
            raise TypeError("byref() argument must be a ctypes instance, not " + type(metrics_get).__name__)
        if metrics_get.version != self._code("NVML_GPM_METRICS_GET_VERSION"):
            raise NVMLError(self._code("NVML_ERROR_ARGUMENT_VERSION_MISMATCH"))
        first, second = self._gpm_sample(metrics_get.sample1), self._gpm_sample(metrics_get.sample2)
        if (
            first.taken_of is None
            or first.taken_of != second.taken_of
            or first.sequence >= second.sequence
            or not 0 < metrics_get.numMetrics <= len(metrics_get.metrics)
        ):
            raise NVMLError(self._code("NVML_ERROR_INVALID_ARGUMENT"))
        names = self._gpm_metric_names()
        metrics = metrics_get.metrics
        for slot in range(metrics_get.numMetrics):
            metric = metrics[slot]
            value = second.activity.get(names.get(metric.metricId, ""), NOT_SUPPORTED)
            if value is NOT_SUPPORTED:
                metric.nvmlReturn, metric.value = self._code("NVML_ERROR_NOT_SUPPORTED"), 0.0
            elif isinstance(value, NVMLError):
                metric.nvmlReturn, metric.value = value.value, 0.0
            else:
                metric.nvmlReturn, metric.value = self._code("NVML_SUCCESS"), float(value)
        return metrics_get

    # -- events ----------------------------------------------------------------
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
