"""Simulated GPUs: realistic values for the models in models.py, deterministic for a seed.

Each node runs one workload at a time on all its GPUs (a synchronous job: training,
inference, or nothing) and switches now and then. Values follow from the workload
and the model's figures (gpu-fleet-facts.md section 1), with a little noise. The
same seed and node index give the same inventory and the same sequence of samples.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field

from gpufleet.agent.sources.faults import FAULT_KINDS, FaultModel, FaultState
from gpufleet.agent.sources.models import MIB, MODELS, GpuModel
from gpufleet.v1 import inventory_pb2, telemetry_pb2

# Clock event reason bits (gpu-fleet-facts.md section 5).
REASON_GPU_IDLE = 0x001
REASON_SW_POWER_CAP = 0x004
REASON_HW_THERMAL_SLOWDOWN = 0x040

# PCI bus ids of the eight GPUs on an HGX H100 board.
HGX_BUS_IDS = ("18", "2A", "3A", "5D", "9A", "AB", "BA", "DB")

WORKLOAD_WEIGHTS = {"training": 0.6, "inference": 0.25, "idle": 0.15}
# Chance per sample that a node switches workload: about once every 60 samples.
WORKLOAD_SWITCH_PROBABILITY = 1 / 60

DRIVER_VERSION = "565.57.01"
CUDA_VERSION = "12.7"
NVML_VERSION = "12.565.57.01"


@dataclass
class SimulatedGpu:
    """One GPU's identity and cumulative counters."""

    model: GpuModel
    index: int
    uuid: str
    serial: str
    energy_mj: int = 0
    throttle_power_cap_ns: int = 0
    pcie_replays: int = 0
    pending_xids: list[tuple[int, int]] = field(default_factory=list)
    faults: FaultState = field(default_factory=FaultState)
    throttle_hw_thermal_ns: int = 0

    def inventory(self) -> inventory_pb2.GpuInventory:
        m = self.model
        return inventory_pb2.GpuInventory(
            index=self.index,
            uuid=self.uuid,
            serial=self.serial,
            name=m.nvml_name,
            architecture=m.architecture,
            compute_capability=m.compute_capability,
            pci_bus_id=f"00000000:{HGX_BUS_IDS[self.index % len(HGX_BUS_IDS)]}:00.0",
            memory_total_bytes=m.memory_total_mib * MIB,
            power_limit_default_milliwatts=m.power_limit_default_w * 1000,
            power_limit_enforced_milliwatts=m.power_limit_default_w * 1000,
            power_limit_min_milliwatts=m.power_limit_min_w * 1000,
            power_limit_max_milliwatts=m.power_limit_max_w * 1000,
            max_sm_clock_mhz=m.sm_clock_max_mhz,
            max_memory_clock_mhz=m.memory_clock_mhz,
            vbios_version=m.vbios_version,
            mig_enabled=False,
            ecc_enabled=True,
            persistence_enabled=True,
            nvlink_link_count=m.nvlink_links,
        )

    def sample(
        self, workload: str, rng: random.Random, interval_s: float, with_processes: bool
    ) -> telemetry_pb2.GpuSample:
        if self.faults.lost:
            lost = telemetry_pb2.GpuSample(
                index=self.index, read_status=telemetry_pb2.GPU_READ_STATUS_LOST, read_error="GPU is lost"
            )
            self._deliver_xids(lost)
            return lost
        m = self.model
        usable_mib = m.memory_total_mib - m.memory_reserved_mib
        reasons = 0
        if workload == "training":
            util = rng.randint(92, 100)
            copy_util = rng.randint(20, 45)
            power_w = m.power_limit_default_w * rng.uniform(0.80, 0.99)
            used_mib = int(usable_mib * rng.uniform(0.85, 0.97))
            temp = rng.uniform(58, 74)
            sm_clock = m.sm_clock_max_mhz - rng.choice((0, 0, 15, 30, 45))
            if power_w > m.power_limit_default_w * 0.97:
                reasons |= REASON_SW_POWER_CAP
                self.throttle_power_cap_ns += int(interval_s * 1e9 * rng.uniform(0.05, 0.3))
            process = ("python", used_mib - 512)
        elif workload == "inference":
            util = rng.randint(25, 75)
            copy_util = rng.randint(5, 25)
            power_w = m.power_limit_default_w * rng.uniform(0.35, 0.6)
            used_mib = int(usable_mib * rng.uniform(0.4, 0.7))
            temp = rng.uniform(45, 60)
            sm_clock = m.sm_clock_max_mhz - rng.choice((0, 60, 120))
            process = ("tritonserver", used_mib - 512)
        else:
            util = 0
            copy_util = 0
            power_w = rng.uniform(*m.idle_power_w)
            used_mib = 0
            temp = rng.uniform(*m.idle_temperature_c)
            sm_clock = m.sm_clock_idle_mhz
            reasons |= REASON_GPU_IDLE
            process = None
        used_mib = max(used_mib, 0)
        if self.faults.thermal and workload != "idle":
            # A failing thermal interface: at the slowdown point, clocks cut by a third or more.
            temp = m.slowdown_temperature_c + rng.uniform(-1, 2)
            sm_clock = int(sm_clock * rng.uniform(0.5, 0.7))
            reasons |= REASON_HW_THERMAL_SLOWDOWN
            self.throttle_hw_thermal_ns += int(interval_s * 1e9 * rng.uniform(0.6, 1.0))
        self.energy_mj += int(power_w * interval_s * 1000)
        memory_temp = max(temp + rng.uniform(4, 9), m.idle_memory_temperature_c)
        sample = telemetry_pb2.GpuSample(
            index=self.index,
            read_status=telemetry_pb2.GPU_READ_STATUS_OK,
            gpu_utilization_percent=util,
            memory_copy_utilization_percent=copy_util,
            encoder_utilization_percent=0,
            decoder_utilization_percent=0,
            memory_used_bytes=used_mib * MIB,
            memory_free_bytes=(usable_mib - used_mib) * MIB,
            memory_reserved_bytes=m.memory_reserved_mib * MIB,
            gpu_temperature_celsius=round(temp),
            memory_temperature_celsius=round(memory_temp),
            power_draw_milliwatts=int(power_w * 1000),
            energy_millijoules=self.energy_mj,
            sm_clock_mhz=sm_clock,
            memory_clock_mhz=m.memory_clock_mhz,
            performance_state=0,
            clock_event_reasons=reasons,
            throttle_power_cap_nanoseconds=self.throttle_power_cap_ns,
            throttle_sw_thermal_nanoseconds=0,
            throttle_hw_thermal_nanoseconds=self.throttle_hw_thermal_ns,
            throttle_hw_power_brake_nanoseconds=0,
            pcie_tx_bytes_per_second=int(util * rng.uniform(0.5, 1.5) * 100_000_000),
            pcie_rx_bytes_per_second=int(util * rng.uniform(0.5, 1.5) * 100_000_000),
            pcie_replay_count=m.pcie_replays_baseline + self.pcie_replays,
            ecc_corrected_volatile=0,
            ecc_uncorrected_volatile=self.faults.dbe_volatile,
            ecc_corrected_aggregate=0,
            ecc_uncorrected_aggregate=self.faults.dbe_aggregate,
            remapped_rows_correctable=0,
            remapped_rows_uncorrectable=self.faults.remapped_uncorrectable,
            row_remap_pending=self.faults.remap_pending,
            row_remap_failure=self.faults.remap_failure,
            # A pending remap takes effect only after a GPU reset (facts section 4).
            recovery_action=1 if self.faults.remap_pending else 0,
            nvlink_crc_flit_errors=self.faults.nvlink_errors,
            nvlink_crc_data_errors=0,
            nvlink_replay_errors=0,
            nvlink_recovery_errors=0,
        )
        # SXM boards have no fans: fan_speed_percent stays absent, as NVML reports it.
        self._deliver_xids(sample)
        if with_processes:
            sample.processes.SetInParent()
            if process is not None:
                name, memory_mib = process
                sample.processes.processes.add(
                    pid=10_000 + self.index, name=name, used_memory_bytes=max(memory_mib, 0) * MIB
                )
        return sample

    def _deliver_xids(self, sample: telemetry_pb2.GpuSample) -> None:
        for code, at_ns in self.pending_xids:
            sample.xid_events.add(code=code, time_unix_nano=at_ns)
        self.pending_xids.clear()

    def fail(self, kind: str, rng: random.Random) -> None:
        """Suffer a fault: its XIDs go out with the next sample, its marks stay."""
        now = time.time_ns()
        self.pending_xids.extend((code, now) for code in self.faults.apply(kind, rng))


class SimulatedSource:
    """A node of simulated GPUs of one model."""

    # Simulated reads never fail, and the GPUs change only at the next inventory read.
    errors_total = 0
    inventory_stale = False

    def __init__(
        self,
        model: str = "H100",
        gpu_count: int = 8,
        *,
        seed: int = 0,
        node_index: int = 0,
        interval_s: float = 10.0,
        faults: FaultModel | None = None,
        workload: str | None = None,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown GPU model {model!r}; choose one of {', '.join(MODELS)}")
        self.interval_s = interval_s
        # Faults draw from their own generator, so telemetry is the same with or without them.
        self.faults = faults or FaultModel()
        self._rng = random.Random(seed * 1_000_003 + node_index)
        names, weights = zip(*WORKLOAD_WEIGHTS.items(), strict=True)
        self._workload_names = names
        self._workload_weights = weights
        self.workload: str = self._rng.choices(names, weights)[0]
        if workload is not None and workload not in WORKLOAD_WEIGHTS:
            raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOAD_WEIGHTS)}")
        # A pinned workload never changes (for tests and demos).
        self._pinned = workload
        self.workload = workload or self.workload
        self.gpus = [
            SimulatedGpu(
                model=MODELS[model],
                index=i,
                uuid=f"GPU-{uuid.UUID(int=self._rng.getrandbits(128))}",
                serial=str(self._rng.randrange(10**12, 10**13)),
            )
            for i in range(gpu_count)
        ]

    def inventory(self) -> inventory_pb2.NodeInventory:
        return inventory_pb2.NodeInventory(
            driver_version=DRIVER_VERSION,
            cuda_version=CUDA_VERSION,
            nvml_version=NVML_VERSION,
            gpus=[gpu.inventory() for gpu in self.gpus],
        )

    def sample(self, *, with_processes: bool) -> list[telemetry_pb2.GpuSample]:
        if self._rng.random() < WORKLOAD_SWITCH_PROBABILITY and self._pinned is None:
            self.workload = self._rng.choices(self._workload_names, self._workload_weights)[0]
        if self.faults.enabled:
            for gpu in self.gpus:
                for kind in self.faults.draw(self.interval_s):
                    gpu.fail(kind, self.faults.rng)
        return [gpu.sample(self.workload, self._rng, self.interval_s, with_processes) for gpu in self.gpus]

    def inject(self, gpu_index: int, kind: str) -> None:
        """Make one GPU suffer a fault now (see faults.FAULT_KINDS)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; choose one of {', '.join(FAULT_KINDS)}")
        self._gpu(gpu_index).fail(kind, self.faults.rng)

    def _gpu(self, gpu_index: int) -> SimulatedGpu:
        return next(gpu for gpu in self.gpus if gpu.index == gpu_index)

    def replace_gpu(self, gpu_index: int) -> None:
        """A technician swapped the GPU in this slot: new UUID and serial, clean counters."""
        old = self._gpu(gpu_index)
        self.gpus[self.gpus.index(old)] = SimulatedGpu(
            model=old.model,
            index=gpu_index,
            uuid=f"GPU-{uuid.UUID(int=self._rng.getrandbits(128))}",
            serial=str(self._rng.randrange(10**12, 10**13)),
        )

    def remove_gpu(self, gpu_index: int) -> None:
        """The GPU is gone from the node (NVML no longer lists it)."""
        self.gpus = [gpu for gpu in self.gpus if gpu.index != gpu_index]

    def inject_xid(self, gpu_index: int, code: int) -> None:
        """Queue an XID for the next sample of one GPU."""
        self._gpu(gpu_index).pending_xids.append((code, time.time_ns()))

    def close(self) -> None:
        pass
