"""Simulated GPUs: realistic values for the models in models.py, deterministic for a seed.

By default each node runs one workload at a time on all its GPUs (a synchronous job:
training, inference, or nothing) and switches now and then. A scheduler (scheduler.py)
may instead say per GPU which job holds it and how the job behaves (set_workload,
clear_workload). Values follow from the behaviour (BEHAVIOURS) and the model's figures
(gpu-fleet-facts.md section 1), with a little noise. The same seed and node index give
the same inventory and the same sequence of samples.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
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

Range = tuple[float, float]


@dataclass(frozen=True)
class Behaviour:
    """What one kind of work looks like on a GPU: ranges each sample draws a value from.

    A range of None means the model's idle figure (power, temperatures, clock) or none at all
    (utilization, memory, process). The GPM shares build on one another, as the hardware counts:
    the graphics engine is active while kernels run (about NVML's utilization), the SMs are
    active for a share of that, and the pipes (tensor, FP64/32/16) for a share of SM activity.
    """

    utilization_percent: tuple[int, int] | None
    copy_utilization_percent: tuple[int, int] | None
    power_of_limit: Range | None  # share of the default power limit
    memory_of_usable: Range | None  # share of the memory left after the driver's reservation
    temperature_celsius: Range | None
    sm_clock_drops_mhz: tuple[int, ...] | None  # below the maximum SM clock, one picked per sample
    process: str | None  # the name of the job's process on the GPU
    # GPM (Hopper and later), drawn from the node's GPM generator.
    sm_of_engine: Range  # SM active / graphics engine active
    occupancy_of_sm: Range  # SM occupancy (resident warps of the maximum) / SM active
    tensor_of_sm: Range  # any tensor pipe active / SM active
    fp64_of_sm: Range
    fp32_of_sm: Range
    fp16_of_sm: Range
    dram_of_engine: Range  # memory bandwidth used, of the peak / graphics engine active
    nvlink_of_peak: Range  # NVLink throughput, each direction, of the links' bandwidth


NOTHING: Range = (0.0, 0.0)

BEHAVIOURS: dict[str, Behaviour] = {
    # A synchronous training job (data-parallel, NCCL all-reduce): near 100 % utilization at the
    # power cap, memory nearly full, tensor cores busy (SM active 0.75-0.95, tensor 0.4-0.7), NVLink
    # carrying gradients.
    "training": Behaviour(
        utilization_percent=(92, 100),
        copy_utilization_percent=(20, 45),
        power_of_limit=(0.80, 0.99),
        memory_of_usable=(0.85, 0.97),
        temperature_celsius=(58, 74),
        sm_clock_drops_mhz=(0, 0, 15, 30, 45),
        process="python",
        sm_of_engine=(0.82, 0.96),
        occupancy_of_sm=(0.35, 0.6),
        tensor_of_sm=(0.5, 0.75),
        fp64_of_sm=(0.0, 0.001),
        fp32_of_sm=(0.05, 0.2),
        fp16_of_sm=(0.05, 0.2),
        dram_of_engine=(0.3, 0.6),
        nvlink_of_peak=(0.2, 0.6),
    ),
    # An inference server: requests come in bursts, so utilization and SM activity jump from sample
    # to sample; decoding is bound by memory bandwidth more than by the tensor cores; little NVLink
    # (tensor-parallel activations only).
    "inference": Behaviour(
        utilization_percent=(25, 75),
        copy_utilization_percent=(5, 25),
        power_of_limit=(0.35, 0.6),
        memory_of_usable=(0.4, 0.7),
        temperature_celsius=(45, 60),
        sm_clock_drops_mhz=(0, 60, 120),
        process="tritonserver",
        sm_of_engine=(0.5, 0.85),
        occupancy_of_sm=(0.2, 0.5),
        tensor_of_sm=(0.2, 0.55),
        fp64_of_sm=(0.0, 0.001),
        fp32_of_sm=(0.05, 0.15),
        fp16_of_sm=(0.05, 0.2),
        dram_of_engine=(0.5, 0.9),
        nvlink_of_peak=(0.01, 0.1),
    ),
    # Allocated and doing nothing: the job opened the GPU (a CUDA context, a little memory) but runs
    # no kernels: a notebook between cells, a job busy on its CPUs or waiting on its input.
    "idle": Behaviour(
        utilization_percent=None,
        copy_utilization_percent=None,
        power_of_limit=None,
        memory_of_usable=(0.01, 0.05),
        temperature_celsius=None,
        sm_clock_drops_mhz=None,
        process="python",
        sm_of_engine=NOTHING,
        occupancy_of_sm=NOTHING,
        tensor_of_sm=NOTHING,
        fp64_of_sm=NOTHING,
        fp32_of_sm=NOTHING,
        fp16_of_sm=NOTHING,
        dram_of_engine=NOTHING,
        nvlink_of_peak=NOTHING,
    ),
    # A hung job (a NCCL collective waiting on a peer that died): one kernel spins on a flag, so
    # NVML reads ~100 % utilization while the SMs are ~0-2 % active, tensor cores and NVLink idle,
    # the clocks up and the power moderate; the job's memory stays allocated.
    "stuck": Behaviour(
        utilization_percent=(98, 100),
        copy_utilization_percent=None,
        power_of_limit=(0.22, 0.35),
        memory_of_usable=(0.85, 0.97),
        temperature_celsius=(38, 50),
        sm_clock_drops_mhz=(0,),
        process="python",
        sm_of_engine=(0.0, 0.02),
        occupancy_of_sm=(0.02, 0.05),
        tensor_of_sm=NOTHING,
        fp64_of_sm=NOTHING,
        fp32_of_sm=(0.0, 0.05),
        fp16_of_sm=NOTHING,
        dram_of_engine=(0.0, 0.005),
        nvlink_of_peak=NOTHING,
    ),
    # Nobody holds the GPU: no process, no memory used, idle clocks and power.
    "free": Behaviour(
        utilization_percent=None,
        copy_utilization_percent=None,
        power_of_limit=None,
        memory_of_usable=None,
        temperature_celsius=None,
        sm_clock_drops_mhz=None,
        process=None,
        sm_of_engine=NOTHING,
        occupancy_of_sm=NOTHING,
        tensor_of_sm=NOTHING,
        fp64_of_sm=NOTHING,
        fp32_of_sm=NOTHING,
        fp16_of_sm=NOTHING,
        dram_of_engine=NOTHING,
        nvlink_of_peak=NOTHING,
    ),
}
# What a job holding a GPU may do (set_workload); "free" is a GPU nobody holds (clear_workload).
JOB_BEHAVIOURS = ("training", "inference", "idle", "stuck")

# The node-wide workloads of a node no scheduler drives ("idle" there: nobody holds the node).
WORKLOAD_WEIGHTS = {"training": 0.6, "inference": 0.25, "idle": 0.15}
# Chance per sample that a node switches workload: about once every 60 samples.
WORKLOAD_SWITCH_PROBABILITY = 1 / 60
# The pid of the node-wide job's process on GPU i: 10_000 + i.
NODE_JOB_PID_BASE = 10_000

# NVML GPM (GPU Performance Monitoring) is supported from Hopper on: Ampere samples carry no GPM fields.
GPM_ARCHITECTURES = ("Hopper", "Blackwell")
# NVLink bandwidth per link and direction of each GPM architecture's NVLink generation
# (NVLink 4: 900 GB/s over 18 links, both directions together; NVLink 5: 1.8 TB/s).
NVLINK_LINK_BYTES_PER_SECOND = {"Hopper": 25_000_000_000, "Blackwell": 50_000_000_000}
PPM = 1_000_000  # GPM shares are sent in parts per million

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
        self,
        behaviour: Behaviour,
        pid: int | None,
        rng: random.Random,
        gpm_rng: random.Random,
        interval_s: float,
        with_processes: bool,
    ) -> telemetry_pb2.GpuSample:
        """One sample of the GPU doing ``behaviour``; its process (if it runs one) has ``pid``."""
        faults = self.faults
        if faults.lost:
            lost = telemetry_pb2.GpuSample(
                index=self.index, read_status=telemetry_pb2.GPU_READ_STATUS_LOST, read_error="GPU is lost"
            )
            self._deliver_xids(lost)
            return lost
        if faults.read_errors:
            faults.read_errors -= 1
            failed = telemetry_pb2.GpuSample(
                index=self.index, read_status=telemetry_pb2.GPU_READ_STATUS_ERROR, read_error="Unknown Error"
            )
            self._deliver_xids(failed)
            return failed
        m = self.model
        b = behaviour
        usable_mib = m.memory_total_mib - m.memory_reserved_mib
        reasons = 0
        # Draws happen in this order, and only for the ranges a behaviour has, so that a seed gives
        # the same values as before behaviours were a table.
        util = rng.randint(*b.utilization_percent) if b.utilization_percent else 0
        copy_util = rng.randint(*b.copy_utilization_percent) if b.copy_utilization_percent else 0
        if b.power_of_limit:
            power_w = m.power_limit_default_w * rng.uniform(*b.power_of_limit)
        else:
            power_w = rng.uniform(*m.idle_power_w)
        used_mib = int(usable_mib * rng.uniform(*b.memory_of_usable)) if b.memory_of_usable else 0
        temp = rng.uniform(*(b.temperature_celsius or m.idle_temperature_c))
        if b.sm_clock_drops_mhz:
            sm_clock = m.sm_clock_max_mhz - rng.choice(b.sm_clock_drops_mhz)
        else:
            sm_clock = m.sm_clock_idle_mhz
        if power_w > m.power_limit_default_w * 0.97:
            reasons |= REASON_SW_POWER_CAP
            self.throttle_power_cap_ns += int(interval_s * 1e9 * rng.uniform(0.05, 0.3))
        busy = b.utilization_percent is not None
        if not busy:
            reasons |= REASON_GPU_IDLE
        used_mib = max(used_mib, 0)
        if self.faults.thermal and busy:
            # A failing thermal interface: at the slowdown point, clocks cut by a third or more.
            temp = m.slowdown_temperature_c + rng.uniform(-1, 2)
            sm_clock = int(sm_clock * rng.uniform(0.5, 0.7))
            reasons |= REASON_HW_THERMAL_SLOWDOWN
            self.throttle_hw_thermal_ns += int(interval_s * 1e9 * rng.uniform(0.6, 1.0))
        if faults.clock_factor != 1.0 and busy:
            sm_clock = int(sm_clock * faults.clock_factor)
        reasons |= faults.reasons_once
        faults.reasons_once = 0
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
            ecc_corrected_volatile=faults.ce_volatile,
            ecc_uncorrected_volatile=faults.dbe_volatile,
            ecc_corrected_aggregate=faults.ce_aggregate,
            ecc_uncorrected_aggregate=faults.dbe_aggregate,
            remapped_rows_correctable=faults.remapped_correctable,
            remapped_rows_uncorrectable=faults.remapped_uncorrectable,
            row_remap_pending=faults.remap_pending or faults.remap_pending_correctable,
            row_remap_failure=faults.remap_failure,
            # A pending remap takes effect only after a GPU reset (facts section 4); after an
            # uncorrectable error the driver asks for that reset.
            recovery_action=1 if faults.remap_pending else 0,
            nvlink_crc_flit_errors=faults.nvlink_errors,
            nvlink_crc_data_errors=0,
            nvlink_replay_errors=0,
            nvlink_recovery_errors=0,
        )
        # SXM boards have no fans: fan_speed_percent stays absent, as NVML reports it.
        if m.architecture in GPM_ARCHITECTURES:
            self._add_gpm(sample, b, util, gpm_rng)
        self._deliver_xids(sample)
        if with_processes:
            sample.processes.SetInParent()
            if b.process is not None and pid is not None:
                sample.processes.processes.add(
                    pid=pid, name=b.process, used_memory_bytes=max(used_mib - 512, 0) * MIB
                )
        return sample

    def _add_gpm(self, sample: telemetry_pb2.GpuSample, b: Behaviour, util: int, rng: random.Random) -> None:
        """GPM's view of the interval, consistent with the utilization NVML reads."""
        engine = util / 100 * rng.uniform(0.97, 1.0)
        sm = engine * rng.uniform(*b.sm_of_engine)
        sample.graphics_active_ppm = ppm(engine)
        sample.sm_active_ppm = ppm(sm)
        sample.sm_occupancy_ppm = ppm(sm * rng.uniform(*b.occupancy_of_sm))
        sample.tensor_active_ppm = ppm(sm * rng.uniform(*b.tensor_of_sm))
        sample.dram_active_ppm = ppm(engine * rng.uniform(*b.dram_of_engine))
        sample.fp64_active_ppm = ppm(sm * rng.uniform(*b.fp64_of_sm))
        sample.fp32_active_ppm = ppm(sm * rng.uniform(*b.fp32_of_sm))
        sample.fp16_active_ppm = ppm(sm * rng.uniform(*b.fp16_of_sm))
        peak = self.model.nvlink_links * NVLINK_LINK_BYTES_PER_SECOND[self.model.architecture]
        tx = peak * rng.uniform(*b.nvlink_of_peak)
        sample.nvlink_tx_bytes_per_second = int(tx)
        # Collectives send about what they receive.
        sample.nvlink_rx_bytes_per_second = int(min(tx * rng.uniform(0.95, 1.05), peak))

    def _deliver_xids(self, sample: telemetry_pb2.GpuSample) -> None:
        for code, at_ns in self.pending_xids:
            sample.xid_events.add(code=code, time_unix_nano=at_ns)
        self.pending_xids.clear()

    def fail(self, kind: str, rng: random.Random, now_ns: int) -> None:
        """Suffer a fault: its XIDs go out with the next sample, its marks stay."""
        self.pending_xids.extend((code, now_ns) for code in self.faults.apply(kind, rng))


def ppm(share: float) -> int:
    """A share of the interval (0-1) in parts per million."""
    return round(min(max(share, 0.0), 1.0) * PPM)


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
        clock: Callable[[], int] = time.time_ns,
        scenario: Callable[[SimulatedSource], None] | None = None,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown GPU model {model!r}; choose one of {', '.join(MODELS)}")
        self.interval_s = interval_s
        # Simulated time (nanoseconds since the epoch): the wall clock unless a driver runs it faster.
        self.clock = clock
        # (node id, hostname): who this node is, for a scenario's truth.
        self.identity = ("", "")
        # Called before each sample: a scenario (scenario.py) plays what happens to the node.
        self.scenario = scenario
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
        # GPM values draw from their own generator, so the other values are the same as without them.
        self._gpm_rng = random.Random(f"gpm:{seed}:{node_index}")
        # GPU index -> (behaviour, pid of its process) where a scheduler says who holds the GPU.
        self._held: dict[int, tuple[str, int | None]] = {}
        # GPU index -> behaviour that a scenario imposes on whatever runs there (a hang, a stall).
        self._overrides: dict[int, str] = {}

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
        if self.scenario is not None:
            self.scenario(self)
        if self.faults.enabled:
            now = self.clock()
            for gpu in self.gpus:
                for kind in self.faults.draw(self.interval_s):
                    gpu.fail(kind, self.faults.rng, now)
        samples = []
        for gpu in self.gpus:
            behaviour, pid = self._job_on(gpu.index)
            samples.append(
                gpu.sample(
                    BEHAVIOURS[behaviour], pid, self._rng, self._gpm_rng, self.interval_s, with_processes
                )
            )
        return samples

    def _job_on(self, gpu_index: int) -> tuple[str, int | None]:
        """What runs on a GPU, and the pid of its process."""
        held = self._held.get(gpu_index)
        if held is None:
            # No scheduler drives this GPU: the node-wide job runs on it (or, "idle", none does).
            pid = NODE_JOB_PID_BASE + gpu_index
            held = ("free", None) if self.workload == "idle" else (self.workload, pid)
        override = self._overrides.get(gpu_index)
        return held if override is None or held[1] is None else (override, held[1])

    def has_processes(self, gpu_index: int) -> bool:
        """Whether the GPU's samples list its processes (a lost GPU, or one failing to read, does not)."""
        gpu = self.gpu_at(gpu_index)
        return gpu is not None and not gpu.faults.lost and not gpu.faults.read_errors

    def override_behaviour(self, gpu_index: int, behaviour: str | None) -> None:
        """The job on this GPU behaves so for now (a hang, a data stall); None: as it did before."""
        self._gpu(gpu_index)
        if behaviour is None:
            self._overrides.pop(gpu_index, None)
        else:
            self._overrides[gpu_index] = behaviour

    def behaviour_of(self, gpu_index: int) -> str:
        """The behaviour (BEHAVIOURS) of a GPU's samples now: "free" where nobody holds it."""
        self._gpu(gpu_index)
        return self._job_on(gpu_index)[0]

    def set_workload(self, gpu_index: int, behaviour: str, *, pid: int | None = None) -> None:
        """A job holds this GPU and behaves so (JOB_BEHAVIOURS), whatever the node-wide workload.

        Its process (where the behaviour runs one) reports ``pid``: by default the node-wide job's.
        """
        if behaviour not in JOB_BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; choose one of {', '.join(JOB_BEHAVIOURS)}")
        self._gpu(gpu_index)
        self._held[gpu_index] = (behaviour, NODE_JOB_PID_BASE + gpu_index if pid is None else pid)

    def clear_workload(self, gpu_index: int) -> None:
        """Nobody holds this GPU any more: it idles with no process until set_workload."""
        self._gpu(gpu_index)
        self._held[gpu_index] = ("free", None)

    def inject(self, gpu_index: int, kind: str) -> None:
        """Make one GPU suffer a fault now (see faults.FAULT_KINDS)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; choose one of {', '.join(FAULT_KINDS)}")
        self._gpu(gpu_index).fail(kind, self.faults.rng, self.clock())

    def gpu_at(self, gpu_index: int) -> SimulatedGpu | None:
        for gpu in self.gpus:
            if gpu.index == gpu_index:
                return gpu
        return None

    def gpu_indices(self) -> list[int]:
        return [gpu.index for gpu in self.gpus]

    def queue_xid(self, gpu: SimulatedGpu, code: int) -> None:
        """An XID on this GPU now: it goes out with the next sample."""
        gpu.pending_xids.append((code, self.clock()))

    def rebooted(self) -> None:
        """The node rebooted: every GPU is back, with only its lifetime counters and flags kept."""
        for gpu in self.gpus:
            gpu.faults = gpu.faults.after_reboot()
            gpu.pending_xids.clear()

    def swap_gpu(self, gpu_index: int, other: SimulatedSource, other_index: int) -> None:
        """A technician swapped this slot's GPU with one of another node: same serials, new slots."""
        mine, theirs = self._gpu(gpu_index), other._gpu(other_index)
        self.gpus[self.gpus.index(mine)], other.gpus[other.gpus.index(theirs)] = theirs, mine
        mine.index, theirs.index = other_index, gpu_index

    def _gpu(self, gpu_index: int) -> SimulatedGpu:
        gpu = self.gpu_at(gpu_index)
        if gpu is not None:
            return gpu
        indices = ", ".join(str(gpu.index) for gpu in self.gpus) or "none"
        raise ValueError(f"no simulated GPU {gpu_index} on this node (its GPUs: {indices})")

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
        self.queue_xid(self._gpu(gpu_index), code)

    def close(self) -> None:
        pass
