"""Real GPUs through NVML (the official nvidia-ml-py binding, module ``pynvml``).

Every NVML call goes through ``NvmlSource._call``: NOT_SUPPORTED becomes "absent"
(None), a missing function is logged once, GPU_IS_LOST marks only that GPU lost, and
other errors, NVMLError or any other exception, are counted and logged once per call
and kind. Error codes and constants are the binding's names (NVML's numbers for
bindings too old to have a name). The GPUs are enumerated again at every inventory
read, so GPUs added, removed or replaced are seen. When NVML itself goes away (driver
unloaded or upgraded), every GPU is reported with read_status ERROR saying so while
nvmlInit is retried with a capped backoff; the GPUs and the inventory are read again
when it is back. Counters that NVML exposes as fields are read in one
``nvmlDeviceGetFieldValues`` call per GPU. XID events arrive on their own thread
through NVML's event API.

Where NVML's GPU Performance Monitoring (GPM, Hopper and later) is supported, each
sample also carries how busy the SMs, tensor cores, memory and links were over the
interval since the previous sample: GPM computes that from two samples of its
counters, so the source keeps each GPU's previous GPM sample (and each MIG GPU
instance's) and makes one ``nvmlGpmMetricsGet`` call per GPU and per GPU instance.
The first sample after the GPUs are enumerated has none of it, and neither has a GPU
without GPM (absent, never 0). A GPU in MIG mode lists its MIG devices in the
inventory, and each sample has one entry per MIG device.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.agent.sources.base import SourceUnavailable
from gpufleet.v1 import inventory_pb2, telemetry_pb2

log = logging.getLogger(__name__)

# NVML field (the binding's name, and NVML's number for bindings without it) -> our GpuSample
# field (gpu-fleet-facts.md section 6). All are read in one batch per GPU.
FIELDS: dict[tuple[str, int], str] = {
    ("NVML_FI_DEV_ECC_SBE_VOL_TOTAL", 3): "ecc_corrected_volatile",
    ("NVML_FI_DEV_ECC_DBE_VOL_TOTAL", 4): "ecc_uncorrected_volatile",
    ("NVML_FI_DEV_ECC_SBE_AGG_TOTAL", 5): "ecc_corrected_aggregate",
    ("NVML_FI_DEV_ECC_DBE_AGG_TOTAL", 6): "ecc_uncorrected_aggregate",
    ("NVML_FI_DEV_MEMORY_TEMP", 82): "memory_temperature_celsius",
    ("NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 83): "energy_millijoules",
    ("NVML_FI_DEV_PCIE_REPLAY_COUNTER", 94): "pcie_replay_count",
    ("NVML_FI_DEV_REMAPPED_COR", 142): "remapped_rows_correctable",
    ("NVML_FI_DEV_REMAPPED_UNC", 143): "remapped_rows_uncorrectable",
    ("NVML_FI_DEV_REMAPPED_PENDING", 144): "row_remap_pending",
    ("NVML_FI_DEV_REMAPPED_FAILURE", 145): "row_remap_failure",
    ("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", 230): "recovery_action",
    ("NVML_FI_DEV_PERF_POLICY_POWER", 74): "throttle_power_cap_nanoseconds",
    ("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN", 269): "throttle_sw_thermal_nanoseconds",
    ("NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN", 270): "throttle_hw_thermal_nanoseconds",
    ("NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN", 271): "throttle_hw_power_brake_nanoseconds",
    ("NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", 38): "nvlink_crc_flit_errors",
    ("NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", 45): "nvlink_crc_data_errors",
    ("NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", 52): "nvlink_replay_errors",
    ("NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", 59): "nvlink_recovery_errors",
}
FIELD_NVLINK_LINK_COUNT = ("NVML_FI_DEV_NVLINK_LINK_COUNT", 91)

# nvmlValueType_t -> the member of the value union that holds it.
VALUE_MEMBERS: dict[tuple[str, int], str] = {
    ("NVML_VALUE_TYPE_DOUBLE", 0): "dVal",
    ("NVML_VALUE_TYPE_UNSIGNED_INT", 1): "uiVal",
    ("NVML_VALUE_TYPE_UNSIGNED_LONG", 2): "ulVal",
    ("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3): "ullVal",
    ("NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4): "sllVal",
    ("NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
    ("NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
}

ARCHITECTURES: dict[tuple[str, int], str] = {
    ("NVML_DEVICE_ARCH_KEPLER", 2): "Kepler",
    ("NVML_DEVICE_ARCH_MAXWELL", 3): "Maxwell",
    ("NVML_DEVICE_ARCH_PASCAL", 4): "Pascal",
    ("NVML_DEVICE_ARCH_VOLTA", 5): "Volta",
    ("NVML_DEVICE_ARCH_TURING", 6): "Turing",
    ("NVML_DEVICE_ARCH_AMPERE", 7): "Ampere",
    ("NVML_DEVICE_ARCH_ADA", 8): "Ada",
    ("NVML_DEVICE_ARCH_HOPPER", 9): "Hopper",
    ("NVML_DEVICE_ARCH_BLACKWELL", 10): "Blackwell",
}

# Codes that mean NVML itself is unavailable, not one GPU: what the reports say about it.
NVML_GONE: dict[tuple[str, int], str] = {
    ("NVML_ERROR_UNINITIALIZED", 1): "NVML not initialized",
    ("NVML_ERROR_DRIVER_NOT_LOADED", 9): "driver not loaded",
    ("NVML_ERROR_LIBRARY_NOT_FOUND", 12): "NVML library not found",
    ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", 18): "driver and NVML library versions differ (driver upgraded?)",
}

# GPM metrics (the binding's name, NVML's number) -> our field. These are percentages
# (0.0-100.0 of the interval, nvml.h and the binding's comments), sent in parts per million.
GPM_ACTIVITY: dict[tuple[str, int], str] = {
    ("NVML_GPM_METRIC_GRAPHICS_UTIL", 1): "graphics_active_ppm",
    ("NVML_GPM_METRIC_SM_UTIL", 2): "sm_active_ppm",
    ("NVML_GPM_METRIC_SM_OCCUPANCY", 3): "sm_occupancy_ppm",
    ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", 5): "tensor_active_ppm",
    ("NVML_GPM_METRIC_DRAM_BW_UTIL", 10): "dram_active_ppm",
    ("NVML_GPM_METRIC_FP64_UTIL", 11): "fp64_active_ppm",
    ("NVML_GPM_METRIC_FP32_UTIL", 12): "fp32_active_ppm",
    ("NVML_GPM_METRIC_FP16_UTIL", 13): "fp16_active_ppm",
}
# GPM throughputs, in MiB/s (nvml.h and the binding: "PCIe traffic from this GPU in MiB/sec",
# "NvLink write bandwidth for all links in MiB/sec"; write is transmit, read is receive),
# sent in bytes/s. Only whole GPUs have these fields, MIG instances do not.
GPM_THROUGHPUT: dict[tuple[str, int], str] = {
    ("NVML_GPM_METRIC_PCIE_TX_PER_SEC", 20): "pcie_tx_bytes_per_second",
    ("NVML_GPM_METRIC_PCIE_RX_PER_SEC", 21): "pcie_rx_bytes_per_second",
    ("NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", 61): "nvlink_tx_bytes_per_second",
    ("NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", 60): "nvlink_rx_bytes_per_second",
}
# What GPM needs of the binding besides nvmlGpmQueryDeviceSupport (nvidia-ml-py 12.535 and later).
GPM_BINDING = (
    "nvmlGpmSampleAlloc",
    "nvmlGpmSampleGet",
    "nvmlGpmMetricsGet",
    "nvmlGpmSampleFree",
    "c_nvmlGpmMetricsGet_t",
)
# GPM's counters refresh every 100 ms: samples taken closer together give no metrics.
GPM_MIN_INTERVAL_S = 0.1
PPM_PER_PERCENT = 10_000
PPM_MAX = 1_000_000
MIB_BYTES = 2**20
UINT64_MAX = 2**64 - 1
# A MIG device's name ends in its profile: "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "... MIG 1c.3g.40gb"
# (a compute instance of part of a GPU instance), "... MIG 1g.10gb+me" (with the media engines).
MIG_PROFILE_IN_NAME = re.compile(r"\bMIG\s+((?:\d+c\.)?\d+g\.\d+gb\S*)\s*$")

PCIE_THROUGHPUT_UNIT_BYTES = 1024  # NVML reports PCIe throughput in KB/s
XID_WAIT_MS = 500
# After NVML goes away, nvmlInit is tried again after 1 s, then 2, 4 ... up to a minute apart.
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class NvmlNames:
    """The NVML constants the source uses, by the binding's names (NVML's numbers where it lacks one)."""

    success: int
    not_supported: int
    not_found: int
    function_not_found: int
    timeout: int
    gpu_is_lost: int
    gone: dict[int, str]
    fields: dict[int, str]
    nvlink_link_count: int
    value_members: dict[int, str]
    architectures: dict[int, str]
    xid_event: int
    memory_v2: int
    temperature_gpu: int
    clock_sm: int
    clock_mem: int
    pcie_tx_bytes: int
    pcie_rx_bytes: int
    mig_enable: int
    gpm_metrics_get_version: int
    gpm_activity: dict[int, str]
    gpm_throughput: dict[int, str]

    @classmethod
    def of(cls, binding: Any) -> NvmlNames:
        def name(pair: tuple[str, int]) -> int:
            return int(getattr(binding, pair[0], pair[1]))

        def table(pairs: dict[tuple[str, int], str]) -> dict[int, str]:
            return {name(pair): ours for pair, ours in pairs.items()}

        return cls(
            success=name(("NVML_SUCCESS", 0)),
            not_supported=name(("NVML_ERROR_NOT_SUPPORTED", 3)),
            not_found=name(("NVML_ERROR_NOT_FOUND", 6)),
            function_not_found=name(("NVML_ERROR_FUNCTION_NOT_FOUND", 13)),
            timeout=name(("NVML_ERROR_TIMEOUT", 10)),
            gpu_is_lost=name(("NVML_ERROR_GPU_IS_LOST", 15)),
            gone=table(NVML_GONE),
            fields=table(FIELDS),
            nvlink_link_count=name(FIELD_NVLINK_LINK_COUNT),
            value_members=table(VALUE_MEMBERS),
            architectures=table(ARCHITECTURES),
            xid_event=name(("nvmlEventTypeXidCriticalError", 0x8)),
            memory_v2=name(("nvmlMemory_v2", 0x02000028)),  # adds the reserved size
            temperature_gpu=name(("NVML_TEMPERATURE_GPU", 0)),
            clock_sm=name(("NVML_CLOCK_SM", 1)),
            clock_mem=name(("NVML_CLOCK_MEM", 2)),
            pcie_tx_bytes=name(("NVML_PCIE_UTIL_TX_BYTES", 0)),
            pcie_rx_bytes=name(("NVML_PCIE_UTIL_RX_BYTES", 1)),
            mig_enable=name(("NVML_DEVICE_MIG_ENABLE", 1)),
            gpm_metrics_get_version=name(("NVML_GPM_METRICS_GET_VERSION", 1)),
            gpm_activity=table(GPM_ACTIVITY),
            gpm_throughput=table(GPM_THROUGHPUT),
        )


class GpuLost(Exception):
    """NVML returned GPU_IS_LOST: the GPU fell off the bus."""


class NvmlGone(Exception):
    """NVML itself stopped answering (driver unloaded or upgraded): no GPU can be read."""


class _NeverRaised(Exception):
    """Stands in for NVMLError with a binding that has none."""


@dataclass(frozen=True)
class _Mig:
    """One MIG device of a GPU in MIG mode, as enumerated."""

    index: int  # the MIG device index on its GPU
    handle: Any
    gpu_instance_id: int
    compute_instance_id: int


@dataclass(frozen=True)
class _Gpu:
    """One GPU as enumerated: its handle, or why there is none."""

    index: int
    handle: Any = None
    lost: str = ""  # GPU_IS_LOST when its handle was asked for
    error: str = ""  # any other failure to get its handle
    gpm: bool = False  # nvmlGpmQueryDeviceSupport said so at this enumeration
    mig_enabled: bool | None = None  # the current MIG mode; None where NVML has none
    migs: tuple[_Mig, ...] = ()


@dataclass
class _GpmSamples:
    """The GPM sample buffers of one GPU or MIG GPU instance."""

    previous: Any = None  # taken at the previous sample; None before the first, or after a failure
    taken_at: float = 0.0  # when (the source's clock)
    free: list[Any] = field(default_factory=list)  # allocated, holding nothing needed

    def buffers(self) -> list[Any]:
        return [*self.free, *([self.previous] if self.previous is not None else [])]


@dataclass
class _Reads:
    """What the calls for one GPU gave: values (absent ones included) and failures."""

    values: int = 0
    failures: list[str] = field(default_factory=list)

    def failure(self) -> str:
        more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        return (self.failures[0] if self.failures else "no answer") + more


def _decode(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _handle_key(handle: Any) -> object:
    """What a handle points at: the binding hands out a new pointer object for the same GPU."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class NvmlSource:
    """A node's GPUs as NVML sees them."""

    def __init__(
        self,
        nvml: Any = None,
        *,
        watch_xids: bool = True,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
        self._names = NvmlNames.of(nvml)
        error = getattr(nvml, "NVMLError", None)
        self._nvml_error: type[BaseException] = (
            error if isinstance(error, type) and issubclass(error, BaseException) else _NeverRaised
        )
        self._lock = threading.Lock()  # the counter, the log-once set, the GPU list
        self._logged: set[tuple[str, object]] = set()
        self._errors_total = 0
        self._local = threading.local()  # the _Reads of the GPU this thread is reading
        self._clock = clock
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._retry_s = retry_initial_s
        self._next_init_at = 0.0
        self._gone: str | None = None  # why NVML is unavailable; None while it works
        self._gone_since = 0.0
        self._initialized = False
        self._inventory_stale = False
        self._last_inventory = inventory_pb2.NodeInventory()
        self._gpus: list[_Gpu] = []
        self._gpu_keys: list[tuple[int, object]] = []
        # GPM samples by (GPU index, MIG GPU instance id or None for the whole GPU); only the
        # sampling thread (the caller of inventory, sample and close) uses them.
        self._gpm: dict[tuple[int, int | None], _GpmSamples] = {}
        self._gpm_requests: dict[tuple[int, ...], Any] = {}  # metric ids -> a c_nvmlGpmMetricsGet_t
        # Bumped when the GPUs or the NVML session change: the XID thread registers again.
        self._generation = 0
        self._wake = threading.Event()
        self._xids_released = threading.Event()  # the XID thread holds no event set
        self._xids_released.set()
        self._xid_lock = threading.Lock()
        self._xids: list[tuple[int, int, int]] = []  # (gpu index, xid, time ns)
        self._stop = threading.Event()
        try:
            self._init()
            self._set_gpus(self._enumerate())
        except NvmlGone as exc:
            self._shutdown()
            raise SourceUnavailable(
                f"NVML could not start ({exc}): is the NVIDIA driver installed and loaded? "
                "Use --source sim to run without GPUs"
            ) from exc
        self._xid_thread: threading.Thread | None = None
        if watch_xids:
            self._xids_released.clear()
            self._xid_thread = threading.Thread(target=self._watch_xids, name="nvml-xid-events", daemon=True)
            self._xid_thread.start()

    @property
    def errors_total(self) -> int:
        """NVML calls that failed (not NOT_SUPPORTED, not a missing function), and NVML outages."""
        return self._errors_total

    @property
    def inventory_stale(self) -> bool:
        """True after NVML came back: the GPUs may differ, read the inventory again."""
        return self._inventory_stale

    # -- the choke point -------------------------------------------------------------

    def _call(self, name: str, *args: Any, absent: int | None = None, reads_gpu: bool = True) -> Any:
        """Call NVML's ``name``; None means absent or failed. Raises GpuLost and NvmlGone.

        ``absent``: a code that, for this call, means "nothing there" as NOT_SUPPORTED does
        (NOT_FOUND for an empty MIG device slot). ``reads_gpu=False``: the call reads no GPU
        (GPM's buffers and arithmetic), so it neither makes a GPU's sample nor fails it.
        """
        reads: _Reads | None = getattr(self._local, "reads", None) if reads_gpu else None
        fn: Callable[..., Any] | None = getattr(self._nvml, name, None)
        if fn is None:
            self._log_once(name, self._names.function_not_found, "not in this nvidia-ml-py")
            return None
        try:
            value = _decode(fn(*args))
        except self._nvml_error as exc:
            code = getattr(exc, "value", None)
            names = self._names
            if code == names.not_supported or (absent is not None and code == absent):
                if reads is not None:
                    reads.values += 1
                return None
            if code == names.gpu_is_lost:
                raise GpuLost(str(exc)) from exc
            if code in names.gone:
                raise NvmlGone(names.gone[code]) from exc
            if code != names.function_not_found:
                self._count_error()
                if reads is not None:
                    reads.failures.append(f"{name}: {exc}")
            self._log_once(name, code, str(exc))
            return None
        except Exception as exc:  # an odd binding or library: OSError, AttributeError, ctypes errors
            self._count_error()
            if reads is not None:
                reads.failures.append(f"{name}: {_describe(exc)}")
            self._log_once(name, type(exc).__name__, _describe(exc), exc=exc)
            return None
        if reads is not None:
            reads.values += 1
        return value

    @contextlib.contextmanager
    def _reading(self) -> Iterator[_Reads]:
        """Tally what this thread's calls give while reading one GPU."""
        reads = _Reads()
        self._local.reads = reads
        try:
            yield reads
        finally:
            self._local.reads = None

    def _count_error(self) -> None:
        with self._lock:
            self._errors_total += 1

    def _log_once(self, name: str, kind: object, message: str, *, exc: BaseException | None = None) -> None:
        """Log the first failure of NVML's ``name`` of each kind (an NVML code, an exception type)."""
        self._warn_once((name, kind), f"NVML {name} failed: {message} (logged once)", exc)

    def _warn_once(self, key: tuple[str, object], message: str, exc: BaseException | None = None) -> None:
        with self._lock:
            if key in self._logged:
                return
            self._logged.add(key)
        log.warning("%s", message, exc_info=exc)

    # -- NVML's lifecycle ------------------------------------------------------------

    def _init(self) -> None:
        """nvmlInit; raises NvmlGone with what went wrong."""
        try:
            self._nvml.nvmlInit()
        except self._nvml_error as exc:
            code = getattr(exc, "value", None)
            reason = self._names.gone.get(code, str(exc)) if isinstance(code, int) else str(exc)
            raise NvmlGone(reason) from exc
        except Exception as exc:
            raise NvmlGone(_describe(exc)) from exc
        self._initialized = True

    def _shutdown(self) -> None:
        if self._initialized:
            self._initialized = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def _enumerate(self) -> list[_Gpu]:
        """The GPUs NVML lists now, each with its handle or why it has none. Raises NvmlGone."""
        with self._reading() as reads:
            try:
                count = self._call("nvmlDeviceGetCount")
            except GpuLost as exc:
                raise NvmlGone(f"cannot count the GPUs ({exc})") from exc
            if not isinstance(count, int):
                raise NvmlGone(f"cannot count the GPUs ({reads.failure()})")
        gpus = []
        for index in range(count):
            with self._reading() as reads:
                try:
                    handle = self._call("nvmlDeviceGetHandleByIndex", index)
                except GpuLost as exc:
                    gpus.append(_Gpu(index, lost=str(exc)))
                    continue
            if handle is None:
                gpus.append(_Gpu(index, error=f"no handle for the GPU: {reads.failure()}"))
            else:
                gpus.append(self._described(index, handle))
        return gpus

    def _described(self, index: int, handle: Any) -> _Gpu:
        """A GPU with what enumeration learns of it: GPM support, MIG mode and MIG devices."""
        try:
            mode = self._call("nvmlDeviceGetMigMode", handle)
            mig_enabled = None if mode is None else mode[0] == self._names.mig_enable
            migs = self._mig_devices(handle) if mig_enabled else ()
            gpm = self._gpm_supported(handle)
        except GpuLost as exc:
            return _Gpu(index, lost=str(exc))
        except NvmlGone:
            raise
        except Exception as exc:  # a value of an unexpected shape
            self._count_error()
            self._log_once("enumeration", type(exc).__name__, _describe(exc), exc=exc)
            return _Gpu(index, handle)
        return _Gpu(index, handle, gpm=gpm, mig_enabled=mig_enabled, migs=migs)

    def _mig_devices(self, handle: Any) -> tuple[_Mig, ...]:
        """The MIG devices of a GPU in MIG mode; empty slots (NOT_FOUND) are skipped."""
        migs = []
        for slot in range(self._call("nvmlDeviceGetMaxMigDeviceCount", handle) or 0):
            mig = self._call(
                "nvmlDeviceGetMigDeviceHandleByIndex", handle, slot, absent=self._names.not_found
            )
            if mig is None:
                continue
            gpu_instance = self._call("nvmlDeviceGetGpuInstanceId", mig)
            compute_instance = self._call("nvmlDeviceGetComputeInstanceId", mig)
            if gpu_instance is not None and compute_instance is not None:
                migs.append(_Mig(slot, mig, int(gpu_instance), int(compute_instance)))
        return tuple(migs)

    def _gpm_supported(self, handle: Any) -> bool:
        """nvmlGpmQueryDeviceSupport's answer, where the binding has the rest of GPM too."""
        missing = [name for name in GPM_BINDING if getattr(self._nvml, name, None) is None]
        for name in missing:
            self._log_once(name, self._names.function_not_found, "not in this nvidia-ml-py: no GPM activity")
        if missing:
            return False
        support = self._call("nvmlGpmQueryDeviceSupport", handle)
        return support is not None and bool(support.isSupportedDevice)

    def _set_gpus(self, gpus: list[_Gpu], *, new_session: bool = False) -> None:
        keys = [(gpu.index, _handle_key(gpu.handle)) for gpu in gpus]
        with self._lock:
            changed = new_session or keys != self._gpu_keys
            kept = set() if new_session else set(self._gpu_keys) & set(keys)
            self._gpus, self._gpu_keys = gpus, keys
            if changed:
                self._generation += 1
        if changed:
            self._wake.set()
        # GPM samples stay for the GPUs (and GPU instances) still there, with GPM still supported.
        live: set[tuple[int, int | None]] = set()
        for gpu, key in zip(gpus, keys, strict=True):
            if gpu.gpm and key in kept:
                live.add((gpu.index, None))
                live.update((gpu.index, mig.gpu_instance_id) for mig in gpu.migs)
        self._free_gpm([key for key in self._gpm if key not in live], quiet=new_session)

    def _lose_nvml(self, reason: str) -> None:
        """NVML stopped answering: report it on every GPU and retry nvmlInit now and then."""
        self._count_error()
        self._warn_once(
            ("unavailable", reason),
            f"NVML unavailable: {reason}; every GPU is reported as ERROR while nvmlInit is retried "
            "(logged once per reason)",
        )
        self._gone = reason
        self._gone_since = self._clock()
        self._free_gpm(list(self._gpm), quiet=True)  # they belong to the session that is gone
        self._schedule_retry()
        with self._lock:
            self._generation += 1
        self._wake.set()

    def _schedule_retry(self) -> None:
        self._next_init_at = self._clock() + self._retry_s
        self._retry_s = min(self._retry_s * 2, self._retry_max_s)

    def _recover_if_due(self) -> None:
        """While NVML is gone: start it again when the backoff allows, and enumerate the GPUs anew."""
        if self._gone is None or self._clock() < self._next_init_at:
            return
        # The event set belongs to the old session: let the XID thread free it first.
        self._xids_released.wait(timeout=2 * XID_WAIT_MS / 1000)
        self._shutdown()
        try:
            self._init()
            gpus = self._enumerate()
        except NvmlGone as exc:
            self._shutdown()
            self._count_error()
            self._gone = str(exc)
            self._warn_once(("nvmlInit", str(exc)), f"NVML still unavailable: {exc}; retrying (logged once)")
            self._schedule_retry()
            return
        log.warning(
            "NVML is back after %.0f s with %d GPUs; reading the inventory again",
            self._clock() - self._gone_since,
            len(gpus),
        )
        self._gone = None
        self._set_gpus(gpus, new_session=True)
        self._inventory_stale = True

    # -- inventory -------------------------------------------------------------------

    def inventory(self) -> inventory_pb2.NodeInventory:
        """Enumerate the GPUs again and read them; while NVML is gone, the last inventory."""
        self._recover_if_due()
        if self._gone is None:
            try:
                gpus = self._enumerate()
                self._set_gpus(gpus)
                node = self._node_inventory(gpus)
            except NvmlGone as exc:
                self._lose_nvml(str(exc))
            else:
                self._last_inventory = node
                self._inventory_stale = False
                return node
        node = inventory_pb2.NodeInventory()
        node.CopyFrom(self._last_inventory)
        return node

    def _system(self, name: str) -> Any:
        try:
            return self._call(name)
        except GpuLost:
            return None

    def _node_inventory(self, gpus: list[_Gpu]) -> inventory_pb2.NodeInventory:
        cuda = self._system("nvmlSystemGetCudaDriverVersion")
        node = inventory_pb2.NodeInventory(
            driver_version=self._system("nvmlSystemGetDriverVersion") or "",
            cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else "",
            nvml_version=self._system("nvmlSystemGetNVMLVersion") or "",
        )
        for gpu in gpus:
            if gpu.handle is None:
                node.gpus.append(inventory_pb2.GpuInventory(index=gpu.index))
                continue
            try:
                node.gpus.append(self._gpu_inventory(gpu))
            except GpuLost:
                node.gpus.append(inventory_pb2.GpuInventory(index=gpu.index))
            except NvmlGone:
                raise
            except Exception as exc:  # a value of an unexpected shape
                self._count_error()
                self._log_once("inventory", type(exc).__name__, _describe(exc), exc=exc)
                node.gpus.append(inventory_pb2.GpuInventory(index=gpu.index))
        return node

    def _gpu_inventory(self, enumerated: _Gpu) -> inventory_pb2.GpuInventory:
        names = self._names
        handle = enumerated.handle
        gpu = inventory_pb2.GpuInventory(
            index=enumerated.index,
            uuid=self._call("nvmlDeviceGetUUID", handle) or "",
            serial=self._call("nvmlDeviceGetSerial", handle) or "",
            name=self._call("nvmlDeviceGetName", handle) or "",
            vbios_version=self._call("nvmlDeviceGetVbiosVersion", handle) or "",
        )
        arch = self._call("nvmlDeviceGetArchitecture", handle)
        if arch is not None:
            gpu.architecture = names.architectures.get(arch, f"unknown ({arch})")
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
        _set(gpu, "max_sm_clock_mhz", self._call("nvmlDeviceGetMaxClockInfo", handle, names.clock_sm))
        _set(gpu, "max_memory_clock_mhz", self._call("nvmlDeviceGetMaxClockInfo", handle, names.clock_mem))
        _set(gpu, "mig_enabled", enumerated.mig_enabled)  # asked when it was enumerated
        ecc = self._call("nvmlDeviceGetEccMode", handle)  # current and pending
        if ecc is not None:
            gpu.ecc_enabled = bool(ecc[0])
        persistence = self._call("nvmlDeviceGetPersistenceMode", handle)
        if persistence is not None:
            gpu.persistence_enabled = bool(persistence)
        links = self._field_values(handle, [names.nvlink_link_count]).get(names.nvlink_link_count)
        if links is not None:
            gpu.nvlink_link_count = int(links)
        gpu.mig_instances.extend(self._mig_inventory(mig) for mig in enumerated.migs)
        return gpu

    def _mig_inventory(self, mig: _Mig) -> inventory_pb2.MigInventory:
        entry = inventory_pb2.MigInventory(
            index=mig.index,
            uuid=self._call("nvmlDeviceGetUUID", mig.handle) or "",
            gpu_instance_id=mig.gpu_instance_id,
            compute_instance_id=mig.compute_instance_id,
        )
        profile = _profile_in_name(self._call("nvmlDeviceGetName", mig.handle) or "")
        if profile is None:
            attributes = self._call("nvmlDeviceGetAttributes", mig.handle)
            profile = _profile_of(attributes) if attributes is not None else ""
        entry.profile = profile
        memory = self._call("nvmlDeviceGetMemoryInfo", mig.handle)
        if memory is not None:
            entry.memory_total_bytes = memory.total
        return entry

    # -- telemetry -------------------------------------------------------------------

    def sample(self, *, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        """One sample per GPU; while NVML is gone, an ERROR sample per GPU that says so."""
        xids = self._take_xids()
        self._recover_if_due()
        with self._lock:
            gpus = self._gpus
        samples: list[telemetry_pb2.GpuSample] = []
        if self._gone is None:
            try:
                samples = [self._sample_gpu(gpu, with_processes) for gpu in gpus]
            except NvmlGone as exc:
                self._lose_nvml(str(exc))
            else:
                if samples and all(s.read_status == telemetry_pb2.GPU_READ_STATUS_ERROR for s in samples):
                    self._lose_nvml(f"every GPU failed ({samples[0].read_error})")
                else:
                    self._retry_s = self._retry_initial_s
        if self._gone is not None:
            samples = [
                telemetry_pb2.GpuSample(
                    index=gpu.index,
                    read_status=telemetry_pb2.GPU_READ_STATUS_ERROR,
                    read_error=f"NVML unavailable: {self._gone}; retrying",
                )
                for gpu in gpus
            ]
        for sample in samples:
            for gpu_index, code, at_ns in xids:
                if gpu_index == sample.index:
                    sample.xid_events.add(code=code, time_unix_nano=at_ns)
        return samples

    def _sample_gpu(self, gpu: _Gpu, with_processes: bool) -> telemetry_pb2.GpuSample:
        """One GPU's sample: LOST, ERROR (no read worked), or OK with what could be read."""
        if gpu.lost:
            return _failed(gpu.index, telemetry_pb2.GPU_READ_STATUS_LOST, gpu.lost)
        if gpu.handle is None:
            return _failed(gpu.index, telemetry_pb2.GPU_READ_STATUS_ERROR, gpu.error)
        with self._reading() as reads:
            try:
                sample = self._gpu_sample(gpu, with_processes)
            except GpuLost as exc:
                return _failed(gpu.index, telemetry_pb2.GPU_READ_STATUS_LOST, str(exc))
            except NvmlGone:
                raise
            except Exception as exc:  # a value of an unexpected shape
                self._count_error()
                self._log_once("sample", type(exc).__name__, _describe(exc), exc=exc)
                return _failed(gpu.index, telemetry_pb2.GPU_READ_STATUS_ERROR, _describe(exc))
        if reads.failures and not reads.values:
            return _failed(gpu.index, telemetry_pb2.GPU_READ_STATUS_ERROR, reads.failure())
        return sample

    def _gpu_sample(self, gpu: _Gpu, with_processes: bool) -> telemetry_pb2.GpuSample:
        names = self._names
        handle = gpu.handle
        s = telemetry_pb2.GpuSample(index=gpu.index, read_status=telemetry_pb2.GPU_READ_STATUS_OK)
        if gpu.gpm:
            metrics = self._gpm_metrics(
                (gpu.index, None),
                functools.partial(self._call, "nvmlGpmSampleGet", handle),
                (*names.gpm_activity, *names.gpm_throughput),
            )
            self._set_gpm(s, metrics)
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
        memory = self._call("nvmlDeviceGetMemoryInfo", handle, names.memory_v2)
        if memory is not None:
            s.memory_used_bytes = memory.used
            s.memory_free_bytes = memory.free
            s.memory_reserved_bytes = memory.reserved
        _set(
            s,
            "gpu_temperature_celsius",
            self._call("nvmlDeviceGetTemperature", handle, names.temperature_gpu),
        )
        _set(s, "power_draw_milliwatts", self._call("nvmlDeviceGetPowerUsage", handle))
        _set(s, "sm_clock_mhz", self._call("nvmlDeviceGetClockInfo", handle, names.clock_sm))
        _set(s, "memory_clock_mhz", self._call("nvmlDeviceGetClockInfo", handle, names.clock_mem))
        _set(s, "fan_speed_percent", self._call("nvmlDeviceGetFanSpeed", handle))
        _set(s, "performance_state", self._call("nvmlDeviceGetPerformanceState", handle))
        _set(s, "clock_event_reasons", self._call("nvmlDeviceGetCurrentClocksEventReasons", handle))
        for field_name, counter in (
            ("pcie_tx_bytes_per_second", names.pcie_tx_bytes),
            ("pcie_rx_bytes_per_second", names.pcie_rx_bytes),
        ):
            if s.HasField(field_name):  # GPM's, over the interval (NVML's counts only 20 ms)
                continue
            kilobytes = self._call("nvmlDeviceGetPcieThroughput", handle, counter)
            if kilobytes is not None:
                setattr(s, field_name, kilobytes * PCIE_THROUGHPUT_UNIT_BYTES)
        for field_id, value in self._field_values(handle, list(names.fields)).items():
            field_name = names.fields[field_id]
            setattr(s, field_name, bool(value) if field_name.startswith("row_remap_") else int(value))
        if with_processes:
            self._read_processes(s.processes, handle)
        if gpu.migs:
            self._mig_samples(s, gpu, with_processes)
        return s

    def _read_processes(self, processes: telemetry_pb2.ProcessList, handle: Any) -> None:
        """The compute processes on a GPU or MIG device; ``processes`` stays unset if unknown."""
        listed = self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        if listed is None:
            return
        processes.SetInParent()
        for process in listed:
            entry = processes.processes.add(pid=process.pid, name=_process_name(process.pid))
            if process.usedGpuMemory is not None:
                entry.used_memory_bytes = process.usedGpuMemory

    def _mig_samples(self, s: telemetry_pb2.GpuSample, gpu: _Gpu, with_processes: bool) -> None:
        """One MigSample per MIG device; GPM once per GPU instance (its compute instances share it)."""
        by_instance: dict[int, dict[int, float]] = {}
        for mig in gpu.migs:
            entry = s.mig_instances.add(
                gpu_instance_id=mig.gpu_instance_id, compute_instance_id=mig.compute_instance_id
            )
            memory = self._call("nvmlDeviceGetMemoryInfo", mig.handle)
            if memory is not None:
                entry.memory_used_bytes = memory.used
                entry.memory_free_bytes = memory.free
            if with_processes:
                self._read_processes(entry.processes, mig.handle)
            if not gpu.gpm:
                continue
            instance = mig.gpu_instance_id
            if instance not in by_instance:
                by_instance[instance] = self._gpm_metrics(
                    (gpu.index, instance),
                    functools.partial(self._call, "nvmlGpmMigSampleGet", gpu.handle, instance),
                    tuple(self._names.gpm_activity),
                )
            self._set_gpm(entry, by_instance[instance])

    # -- GPM -------------------------------------------------------------------------

    def _gpm_metrics(
        self, key: tuple[int, int | None], take: Callable[[Any], Any], metric_ids: tuple[int, ...]
    ) -> dict[int, float]:
        """Take a GPM sample with ``take``; with the previous one, the metrics over the interval.

        Nothing the first time, nor after a failed sample (the interval would span two), nor
        within GPM_MIN_INTERVAL_S of the previous one (which is kept for the next). Two buffers
        per GPU (or GPU instance) are allocated once and then reused.
        """
        samples = self._gpm.setdefault(key, _GpmSamples())
        now = self._clock()
        if samples.previous is not None and now - samples.taken_at < GPM_MIN_INTERVAL_S:
            return {}
        current = samples.free.pop() if samples.free else self._call("nvmlGpmSampleAlloc", reads_gpu=False)
        if current is None:
            return {}
        try:
            taken = take(current) is not None
        except BaseException:
            samples.free.append(current)
            raise
        previous = samples.previous
        if not taken:
            samples.free.append(current)
            if previous is not None:
                samples.free.append(previous)
                samples.previous = None
            return {}
        samples.previous, samples.taken_at = current, now
        if previous is None:
            return {}
        samples.free.append(previous)
        return self._gpm_between(previous, current, metric_ids)

    def _gpm_between(self, sample1: Any, sample2: Any, metric_ids: tuple[int, ...]) -> dict[int, float]:
        """One nvmlGpmMetricsGet call; each metric checked on its own return code.

        The request (19 KB: room for every metric NVML knows) is made once per list of metrics
        and reused: NVML writes each metric's result over the last one.
        """
        request = self._gpm_requests.get(metric_ids)
        if request is None:
            request_type = getattr(self._nvml, "c_nvmlGpmMetricsGet_t", None)
            if request_type is None:
                return {}
            request = request_type()
            request.version = self._names.gpm_metrics_get_version
            request.numMetrics = len(metric_ids)
            for slot, metric_id in enumerate(metric_ids):
                request.metrics[slot].metricId = metric_id
            self._gpm_requests[metric_ids] = request
        request.sample1 = sample1
        request.sample2 = sample2
        answer = self._call("nvmlGpmMetricsGet", request, reads_gpu=False)
        if answer is None:
            return {}
        success = self._names.success
        metrics = answer.metrics
        values: dict[int, float] = {}
        for slot, metric_id in enumerate(metric_ids):
            metric = metrics[slot]
            if metric.nvmlReturn == success:
                values[metric_id] = float(metric.value)
        return values

    def _set_gpm(self, message: Any, metrics: dict[int, float]) -> None:
        """GPM's percentages as parts per million, its MiB/s as bytes/s; odd values (NaN) absent."""
        names = self._names
        for metric_id, value in metrics.items():
            if not math.isfinite(value):
                continue
            if metric_id in names.gpm_activity:
                ppm = round(value * PPM_PER_PERCENT)
                setattr(message, names.gpm_activity[metric_id], min(max(ppm, 0), PPM_MAX))
            elif metric_id in names.gpm_throughput:
                rate = round(value * MIB_BYTES)
                setattr(message, names.gpm_throughput[metric_id], min(max(rate, 0), UINT64_MAX))

    def _free_gpm(self, keys: list[tuple[int, int | None]], *, quiet: bool = False) -> None:
        """Free the GPM samples of ``keys``; ``quiet`` where NVML went away (they went with it)."""
        for key in keys:
            for sample in self._gpm.pop(key).buffers():
                if quiet:
                    with contextlib.suppress(Exception):
                        self._nvml.nvmlGpmSampleFree(sample)
                    continue
                with contextlib.suppress(GpuLost, NvmlGone):
                    self._call("nvmlGpmSampleFree", sample, reads_gpu=False)

    def _field_values(self, handle: Any, field_ids: list[int]) -> dict[int, float | int]:
        """One nvmlDeviceGetFieldValues call; each value checked on its own return code."""
        values = self._call("nvmlDeviceGetFieldValues", handle, field_ids)
        if values is None:
            return {}
        names = self._names
        result: dict[int, float | int] = {}
        for value in values:
            if value.nvmlReturn == names.gpu_is_lost:
                raise GpuLost("GPU is lost")
            member = names.value_members.get(value.valueType)
            if value.nvmlReturn != names.success or member is None:
                continue
            result[value.fieldId] = getattr(value.value, member)
        return result

    # -- XID events ------------------------------------------------------------------

    def _watch_xids(self) -> None:
        """Wait for XIDs on this thread; register the GPUs again whenever they or the session change."""
        event_set: Any = None
        watching = -1  # the generation event_set was made for
        try:
            while not self._stop.is_set():
                if watching != self._generation:
                    self._free_event_set(event_set)
                    event_set, watching = None, self._generation
                    if self._gone is None:
                        self._xids_released.clear()
                        event_set = self._register_xids()
                if event_set is None:
                    self._xids_released.set()
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                self._wait_for_xid(event_set)
        finally:
            self._free_event_set(event_set)
            self._xids_released.set()

    def _register_xids(self) -> Any:
        """A new event set with every GPU registered for XIDs; None if there is nothing to watch."""
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except Exception as exc:  # NVMLError or not
            self._log_once("nvmlEventSetCreate", _kind(exc), f"XIDs will not be reported: {exc}")
            return None
        registered = 0
        for gpu in self._gpus:
            if gpu.handle is None:
                continue
            try:
                nvml.nvmlDeviceRegisterEvents(gpu.handle, self._names.xid_event, event_set)
                registered += 1
            except Exception as exc:
                self._log_once("nvmlDeviceRegisterEvents", _kind(exc), f"cannot watch XIDs on a GPU: {exc}")
        if not registered:
            self._free_event_set(event_set)
            return None
        return event_set

    def _wait_for_xid(self, event_set: Any) -> None:
        try:
            data = self._nvml.nvmlEventSetWait_v2(event_set, XID_WAIT_MS)
        except Exception as exc:
            if isinstance(exc, self._nvml_error) and _kind(exc) == self._names.timeout:
                return
            self._log_once("nvmlEventSetWait_v2", _kind(exc), str(exc))
            self._stop.wait(1.0)
            return
        if data.eventType & self._names.xid_event:
            try:
                index = self._call("nvmlDeviceGetIndex", data.device)
            except (GpuLost, NvmlGone):
                index = None
            with self._xid_lock:
                self._xids.append((index if index is not None else -1, int(data.eventData), time.time_ns()))

    def _free_event_set(self, event_set: Any) -> None:
        if event_set is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlEventSetFree(event_set)

    def _take_xids(self) -> list[tuple[int, int, int]]:
        with self._xid_lock:
            xids, self._xids = self._xids, []
        return xids

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._xid_thread is not None:
            self._xid_thread.join(timeout=2.0)
        self._free_gpm(list(self._gpm), quiet=self._gone is not None)
        self._shutdown()


def _kind(exc: BaseException) -> object:
    """An NVMLError's code, or the exception's type name: what 'logged once' is keyed on."""
    code = getattr(exc, "value", None)
    return code if isinstance(code, int) else type(exc).__name__


def _failed(index: int, status: telemetry_pb2.GpuReadStatus, reason: str) -> telemetry_pb2.GpuSample:
    return telemetry_pb2.GpuSample(index=index, read_status=status, read_error=reason)


def _set(message: Any, field_name: str, value: Any) -> None:
    if value is not None:
        setattr(message, field_name, value)


def _profile_in_name(name: str) -> str | None:
    """The profile a MIG device's name ends in ("NVIDIA H100 80GB HBM3 MIG 1g.10gb": "1g.10gb")."""
    match = MIG_PROFILE_IN_NAME.search(name)
    return match.group(1) if match else None


def _profile_of(attributes: Any) -> str:
    """A MIG device's profile from its nvmlDeviceAttributes_t, named as NVIDIA names profiles.

    NVIDIA rounds the memory up: the H100's 7g.80gb has 81152 MiB (79.25 GiB), its 1g.10gb 9.75 GiB.
    """
    slices = attributes.gpuInstanceSliceCount
    gigabytes = math.ceil(attributes.memorySizeMB / 1024)
    profile = f"{slices}g.{gigabytes}gb"
    compute_slices = attributes.computeInstanceSliceCount
    return f"{compute_slices}c.{profile}" if 0 < compute_slices < slices else profile


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
