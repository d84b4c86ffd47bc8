"""A fake ``pynvml`` module: tables of what real GPUs return, NOT_SUPPORTED and lost GPUs included.

Values come from real `nvidia-smi -q` captures summarised in gpu-fleet-facts.md
(H100 on driver 565, A100 on driver 555). Any entry set to NOT_SUPPORTED raises
NVMLError(NOT_SUPPORTED) the way the real binding does; a GPU marked lost raises
GPU_IS_LOST from every call.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NOT_SUPPORTED = object()

ERROR_NAMES = {
    3: "Not Supported",
    4: "Insufficient Permissions",
    10: "Timeout",
    12: "NVML Shared Library Not Found",
    15: "GPU is lost",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return ERROR_NAMES.get(self.value, f"NVML error {self.value}")


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


@dataclass
class FakeNvml:
    """Pass an instance where the code expects the ``pynvml`` module."""

    gpus: list[FakeGpu]
    init_error: int | None = None
    events: queue.Queue[tuple[int, int]] = field(default_factory=queue.Queue)
    NVMLError = NVMLError

    # -- helpers for tests ---------------------------------------------------
    def emit_xid(self, index: int, code: int) -> None:
        self.events.put((index, code))

    def _value(self, handle: FakeGpu, key: str) -> Any:
        if handle.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        value = handle.table[key]
        if value is NOT_SUPPORTED:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return value

    # -- the pynvml API the agent uses -----------------------------------------
    def nvmlInit(self) -> None:  # noqa: N802
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:  # noqa: N802
        return self.gpus[index]

    def nvmlDeviceGetIndex(self, handle: FakeGpu) -> int:  # noqa: N802
        return self.gpus.index(handle)

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return "565.57.01"

    def nvmlSystemGetCudaDriverVersion(self) -> int:  # noqa: N802
        return 12070

    def nvmlSystemGetNVMLVersion(self) -> str:  # noqa: N802
        return "12.565.57.01"

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:  # noqa: N802
        self._value(h, "name")
        return h.uuid

    def nvmlDeviceGetSerial(self, h: FakeGpu) -> bytes:  # noqa: N802
        return str(self._value(h, "serial")).encode()  # older bindings return bytes

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:  # noqa: N802
        return str(self._value(h, "name"))

    def nvmlDeviceGetVbiosVersion(self, h: FakeGpu) -> str:  # noqa: N802
        return str(self._value(h, "vbios"))

    def nvmlDeviceGetArchitecture(self, h: FakeGpu) -> int:  # noqa: N802
        return int(self._value(h, "arch"))

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGpu) -> tuple[int, int]:  # noqa: N802
        return self._value(h, "cc")  # type: ignore[no-any-return]

    def nvmlDeviceGetPciInfo(self, h: FakeGpu) -> SimpleNamespace:  # noqa: N802
        self._value(h, "name")
        return SimpleNamespace(busId=h.bus_id.encode())

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu, version: int | None = None) -> SimpleNamespace:  # noqa: N802
        total, reserved, used = (
            self._value(h, k) for k in ("memory_total", "memory_reserved", "memory_used")
        )
        return SimpleNamespace(total=total, reserved=reserved, used=used, free=total - reserved - used)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: FakeGpu) -> int:  # noqa: N802
        return int(self._value(h, "power_default"))

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGpu) -> int:  # noqa: N802
        return int(self._value(h, "power_enforced"))

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: FakeGpu) -> list[int]:  # noqa: N802
        return self._value(h, "power_constraints")  # type: ignore[no-any-return]

    def nvmlDeviceGetMaxClockInfo(self, h: FakeGpu, clock: int) -> int:  # noqa: N802
        return int(self._value(h, "max_sm" if clock == 1 else "max_mem"))

    def nvmlDeviceGetMigMode(self, h: FakeGpu) -> list[int]:  # noqa: N802
        return self._value(h, "mig")  # type: ignore[no-any-return]

    def nvmlDeviceGetEccMode(self, h: FakeGpu) -> list[int]:  # noqa: N802
        return self._value(h, "ecc")  # type: ignore[no-any-return]

    def nvmlDeviceGetPersistenceMode(self, h: FakeGpu) -> int:  # noqa: N802
        return int(self._value(h, "persistence"))

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:  # noqa: N802
        gpu, memory = self._value(h, "utilization")
        return SimpleNamespace(gpu=gpu, memory=memory)

    def nvmlDeviceGetEncoderUtilization(self, h: FakeGpu) -> list[int]:  # noqa: N802
        return self._value(h, "encoder")  # type: ignore[no-any-return]

    def nvmlDeviceGetDecoderUtilization(self, h: FakeGpu) -> list[int]:  # noqa: N802
        return self._value(h, "decoder")  # type: ignore[no-any-return]

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:  # noqa: N802
        return int(self._value(h, "temperature"))

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:  # noqa: N802
        return int(self._value(h, "power"))

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, clock: int) -> int:  # noqa: N802
        return int(self._value(h, "sm_clock" if clock == 1 else "mem_clock"))

    def nvmlDeviceGetFanSpeed(self, h: FakeGpu) -> int:  # noqa: N802
        return int(self._value(h, "fan"))

    def nvmlDeviceGetPerformanceState(self, h: FakeGpu) -> int:  # noqa: N802
        return int(self._value(h, "pstate"))

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeGpu) -> int:  # noqa: N802
        return int(self._value(h, "clock_reasons"))

    def nvmlDeviceGetPcieThroughput(self, h: FakeGpu, counter: int) -> int:  # noqa: N802
        return int(self._value(h, "pcie_tx_kb" if counter == 0 else "pcie_rx_kb"))

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[SimpleNamespace]:  # noqa: N802
        return self._value(h, "processes")  # type: ignore[no-any-return]

    def nvmlDeviceGetFieldValues(self, h: FakeGpu, field_ids: list[int]) -> list[SimpleNamespace]:  # noqa: N802
        fields = self._value(h, "fields")
        values = []
        for field_id in field_ids:
            value = fields.get(field_id, NOT_SUPPORTED)
            if value is NOT_SUPPORTED:
                values.append(
                    SimpleNamespace(
                        fieldId=field_id,
                        nvmlReturn=NVML_ERROR_NOT_SUPPORTED,
                        valueType=3,
                        value=SimpleNamespace(ullVal=0),
                    )
                )
            else:
                values.append(
                    SimpleNamespace(
                        fieldId=field_id, nvmlReturn=0, valueType=3, value=SimpleNamespace(ullVal=value)
                    )
                )
        return values

    def nvmlEventSetCreate(self) -> object:  # noqa: N802
        return object()

    def nvmlDeviceRegisterEvents(self, h: FakeGpu, event_types: int, event_set: object) -> None:  # noqa: N802
        pass

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> SimpleNamespace:  # noqa: N802
        try:
            index, code = self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise NVMLError(NVML_ERROR_TIMEOUT) from None
        return SimpleNamespace(device=self.gpus[index], eventType=0x8, eventData=code)

    def nvmlEventSetFree(self, event_set: object) -> None:  # noqa: N802
        pass


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
