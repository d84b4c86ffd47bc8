"""A dcgm-exporter compatible view of the fleet, served on /metrics/dcgm.

The names, units and labels of dcgm-exporter up to 4.8 (dcgm-exporter-compat.md),
for the fields NVML provides, so that Grafana dashboard 12239 and alerts written
for dcgm-exporter work unchanged. The node is in ``Hostname``: behind one central
collector, ``instance`` is the collector for every GPU.

Profiling fields (``DCGM_FI_PROF_*``) come from NVML's GPM (Hopper and later) where the
agent reads it, in dcgm-exporter's units; a MIG instance has its own series of them (and
of its framebuffer), labelled ``GPU_I_PROFILE`` and ``GPU_I_ID``. A GPU someone holds gets
dcgm-exporter's ``pod``, ``namespace`` and ``container`` labels (Kubernetes) or ``hpc_job``
(Slurm), one copy of each series per workload when several share it. Like the main
exposition, nothing stale is served: a node that
stopped reporting has no series here (dcgm-exporter on a dead host has none
either), and a GPU that does not read has only its last XID. Each node's lines
are rendered when it changed and kept; a scrape joins them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from gpufleet.collector import health
from gpufleet.collector.exposition.textformat import escape_label_value, format_value
from gpufleet.collector.exposition.views import Body, ShardViews
from gpufleet.collector.sinks import Sink
from gpufleet.collector.state import UP, FleetState, GpuRecord, NodeRecord
from gpufleet.v1 import allocation_pb2, inventory_pb2, telemetry_pb2

MIB = 1024 * 1024

Value = Callable[[telemetry_pb2.GpuSample], "float | int | None"]


@dataclass(frozen=True)
class DcgmFamily:
    name: str
    type: str
    help: str
    # The value in dcgm-exporter's unit, or None when the GPU did not report it.
    value: Value
    # Also served per MIG instance (its sample has the same field).
    per_mig: bool = False

    def header(self) -> str:
        return f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.type}\n"


def _field(name: str, divisor: int | None = None) -> Value:
    """A sample field as it is, or divided by ``divisor`` (a float result)."""

    def value(sample: telemetry_pb2.GpuSample) -> float | int | None:
        if not sample.HasField(name):
            return None
        raw = int(getattr(sample, name))  # bools become 0/1
        return raw if divisor is None else raw / divisor

    return value


def _mib(name: str) -> Value:
    def value(sample: telemetry_pb2.GpuSample) -> int | None:
        return getattr(sample, name) // MIB if sample.HasField(name) else None

    return value


def _ppm(name: str) -> Value:
    def value(sample: telemetry_pb2.GpuSample) -> float | None:
        return getattr(sample, name) / 1_000_000 if sample.HasField(name) else None

    return value


def _sum(*names: str) -> Value:
    def value(sample: telemetry_pb2.GpuSample) -> int | None:
        present = [int(getattr(sample, name)) for name in names if sample.HasField(name)]
        return sum(present) if present else None

    return value


# In the order of dcgm-exporter's counters file (the XID family comes last); its help texts.
FAMILIES: list[DcgmFamily] = [
    DcgmFamily("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", _field("sm_clock_mhz")),
    DcgmFamily(
        "DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", _field("memory_clock_mhz")
    ),
    DcgmFamily(
        "DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", _field("memory_temperature_celsius")
    ),
    DcgmFamily("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", _field("gpu_temperature_celsius")),
    DcgmFamily(
        "DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", _field("power_draw_milliwatts", 1000)
    ),
    DcgmFamily(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        _field("energy_millijoules"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "counter",
        "Total number of PCIe retries.",
        _field("pcie_replay_count"),
    ),
    DcgmFamily("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", _field("gpu_utilization_percent")),
    DcgmFamily(
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "gauge",
        "Memory utilization (in %).",
        _field("memory_copy_utilization_percent"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %).", _field("encoder_utilization_percent")
    ),
    DcgmFamily(
        "DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %).", _field("decoder_utilization_percent")
    ),
    DcgmFamily(
        "DCGM_FI_DEV_POWER_VIOLATION",
        "counter",
        "Throttling duration due to power constraints (in ns).",
        _field("throttle_power_cap_nanoseconds"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_THERMAL_VIOLATION",
        "counter",
        "Throttling duration due to thermal constraints (in ns).",
        _sum("throttle_sw_thermal_nanoseconds", "throttle_hw_thermal_nanoseconds"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        "Framebuffer memory free (in MiB).",
        _mib("memory_free_bytes"),
        per_mig=True,
    ),
    DcgmFamily(
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "Framebuffer memory used (in MiB).",
        _mib("memory_used_bytes"),
        per_mig=True,
    ),
    DcgmFamily(
        "DCGM_FI_DEV_FB_RESERVED",
        "gauge",
        "Framebuffer memory reserved (in MiB).",
        _mib("memory_reserved_bytes"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "counter",
        "Total number of single-bit volatile ECC errors.",
        _field("ecc_corrected_volatile"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "counter",
        "Total number of double-bit volatile ECC errors.",
        _field("ecc_uncorrected_volatile"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
        "counter",
        "Total number of single-bit persistent ECC errors.",
        _field("ecc_corrected_aggregate"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        "counter",
        "Total number of double-bit persistent ECC errors.",
        _field("ecc_uncorrected_aggregate"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
        "counter",
        "Total number of NVLink flow-control CRC errors.",
        _field("nvlink_crc_flit_errors"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
        "counter",
        "Total number of NVLink data CRC errors.",
        _field("nvlink_crc_data_errors"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
        "counter",
        "Total number of NVLink retries.",
        _field("nvlink_replay_errors"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
        "counter",
        "Total number of NVLink recovery errors.",
        _field("nvlink_recovery_errors"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for uncorrectable errors",
        _field("remapped_rows_uncorrectable"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for correctable errors",
        _field("remapped_rows_correctable"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "gauge",
        "Whether remapping of rows has failed",
        _field("row_remap_failure"),
    ),
    DcgmFamily(
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "gauge",
        "Whether remapping of rows is pending",
        _field("row_remap_pending"),
    ),
    *(
        DcgmFamily(name, "gauge", help_, _ppm(field_name), per_mig=True)
        for name, help_, field_name in (
            (
                "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
                "Ratio of time the graphics engine is active.",
                "graphics_active_ppm",
            ),
            (
                "DCGM_FI_PROF_SM_ACTIVE",
                "The ratio of cycles an SM has at least 1 warp assigned.",
                "sm_active_ppm",
            ),
            (
                "DCGM_FI_PROF_SM_OCCUPANCY",
                "The ratio of number of warps resident on an SM.",
                "sm_occupancy_ppm",
            ),
            (
                "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
                "Ratio of cycles the tensor (HMMA) pipe is active.",
                "tensor_active_ppm",
            ),
            (
                "DCGM_FI_PROF_DRAM_ACTIVE",
                "Ratio of cycles the device memory interface is active sending or receiving data.",
                "dram_active_ppm",
            ),
            (
                "DCGM_FI_PROF_PIPE_FP64_ACTIVE",
                "Ratio of cycles the fp64 pipes are active.",
                "fp64_active_ppm",
            ),
            (
                "DCGM_FI_PROF_PIPE_FP32_ACTIVE",
                "Ratio of cycles the fp32 pipes are active.",
                "fp32_active_ppm",
            ),
            (
                "DCGM_FI_PROF_PIPE_FP16_ACTIVE",
                "Ratio of cycles the fp16 pipes are active.",
                "fp16_active_ppm",
            ),
        )
    ),
    *(
        DcgmFamily(name, "gauge", help_, _field(field_name))
        for name, help_, field_name in (
            (
                "DCGM_FI_PROF_PCIE_TX_BYTES",
                "The rate of data transmitted over the PCIe bus, headers included, in bytes per second.",
                "pcie_tx_bytes_per_second",
            ),
            (
                "DCGM_FI_PROF_PCIE_RX_BYTES",
                "The rate of data received over the PCIe bus, headers included, in bytes per second.",
                "pcie_rx_bytes_per_second",
            ),
            (
                "DCGM_FI_PROF_NVLINK_TX_BYTES",
                "The rate of data transmitted over NVLink, headers excluded, in bytes per second.",
                "nvlink_tx_bytes_per_second",
            ),
            (
                "DCGM_FI_PROF_NVLINK_RX_BYTES",
                "The rate of data received over NVLink, headers excluded, in bytes per second.",
                "nvlink_rx_bytes_per_second",
            ),
        )
    ),
]
MIG_FAMILIES = [index for index, family in enumerate(FAMILIES) if family.per_mig]
# The last XID, with its code and meaning as labels (dcgm-exporter 3.3.6 and later): served for
# every GPU of a reporting node, lost ones too, and 0 until the first XID, as DCGM reports it.
XID_HEADER = (
    "# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered.\n"
    "# TYPE DCGM_FI_DEV_XID_ERRORS gauge\n"
)
XID = len(FAMILIES)
HEADERS = [family.header().encode() for family in FAMILIES] + [XID_HEADER.encode()]
NAMES = [family.name for family in FAMILIES] + ["DCGM_FI_DEV_XID_ERRORS"]


def gpu_labels(node: NodeRecord, gpu: GpuRecord, mig: inventory_pb2.MigInventory | None = None) -> str:
    """dcgm-exporter's labels, in its order; the node's name in ``Hostname``."""
    inv = gpu.inventory
    instance = (
        f',GPU_I_PROFILE="{escape_label_value(mig.profile)}",GPU_I_ID="{mig.gpu_instance_id}"' if mig else ""
    )
    return (
        f'gpu="{inv.index}",UUID="{escape_label_value(inv.uuid)}",'
        f'pci_bus_id="{escape_label_value(inv.pci_bus_id)}",device="nvidia{inv.index}",'
        f'modelName="{escape_label_value(inv.name)}"{instance},Hostname="{escape_label_value(node.name)}",'
        f'DCGM_FI_DRIVER_VERSION="{escape_label_value(node.inventory.driver_version)}"'
    )


def holder_labels(allocations: list[allocation_pb2.Allocation]) -> list[str]:
    """dcgm-exporter's labels for who holds a GPU: one variant per workload ("" for none)."""
    variants = []
    for a in allocations:
        labels = ""
        if a.pod or a.namespace:
            labels += (
                f',pod="{escape_label_value(a.pod)}",namespace="{escape_label_value(a.namespace)}",'
                f'container="{escape_label_value(a.container)}"'
            )
        if a.job:
            labels += f',hpc_job="{escape_label_value(a.job)}"'
        variants.append(labels)
    return list(dict.fromkeys(variants)) or [""]


def _held(allocations: list[allocation_pb2.Allocation], gpu_instance_id: int | None) -> list[str]:
    return holder_labels(
        [
            a
            for a in allocations
            if (a.gpu_instance_id if a.HasField("gpu_instance_id") else None) == gpu_instance_id
        ]
    )


def _xid_labels(code: int) -> str:
    if not code:
        return 'err_code="0"'
    rule = health.XID_RULES.get(code)
    meaning = f',err_msg="{escape_label_value(rule.meaning)}"' if rule else ""
    return f'err_code="{code}"{meaning}'


def render_node(node: NodeRecord, last_xids: dict[int, int]) -> list[bytes]:
    """The node's lines, one chunk per family (empty for a node that is not up)."""
    if node.state != UP:
        return [b""] * len(HEADERS)
    lines: list[list[str]] = [[] for _ in HEADERS]
    for index in sorted(node.gpus):
        gpu = node.gpus[index]
        allocations = node.allocations_of(index)
        variants = [gpu_labels(node, gpu) + held for held in _held(allocations, None)]
        code = last_xids.get(index, 0)
        for labels in variants:
            lines[XID].append(f"DCGM_FI_DEV_XID_ERRORS{{{labels},{_xid_labels(code)}}} {code}\n")
        sample = gpu.sample
        # A GPU that does not read, is lost or is gone from the node's inventory: its last XID only.
        if (
            sample is None
            or sample.read_status != telemetry_pb2.GPU_READ_STATUS_OK
            or node.gpu_verdict(gpu).health == health.LOST
        ):
            continue
        for family_index, family in enumerate(FAMILIES):
            value = family.value(sample)
            if value is not None:
                text = format_value(value)
                for labels in variants:
                    lines[family_index].append(f"{family.name}{{{labels}}} {text}\n")
        if sample.mig_instances:
            _render_mig(node, gpu, sample, allocations, lines)
    return ["".join(family_lines).encode() for family_lines in lines]


def _render_mig(
    node: NodeRecord,
    gpu: GpuRecord,
    sample: telemetry_pb2.GpuSample,
    allocations: list[allocation_pb2.Allocation],
    lines: list[list[str]],
) -> None:
    """A MIG instance's framebuffer and profiling series, as dcgm-exporter serves them."""
    instances = {mig.gpu_instance_id: mig for mig in gpu.inventory.mig_instances}
    for mig_sample in sample.mig_instances:
        mig = instances.get(mig_sample.gpu_instance_id)
        if mig is None:
            continue
        base = gpu_labels(node, gpu, mig)
        variants = [base + held for held in _held(allocations, mig.gpu_instance_id)]
        for family_index in MIG_FAMILIES:
            family = FAMILIES[family_index]
            value = family.value(mig_sample)  # type: ignore[arg-type]  # the same field names
            if value is not None:
                text = format_value(value)
                for labels in variants:
                    lines[family_index].append(f"{family.name}{{{labels}}} {text}\n")


class _DcgmLines:
    """One node's dcgm-style lines, one chunk per family (kept and changed in place)."""

    __slots__ = ("chunks", "crc")

    def __init__(self, node_id: str) -> None:
        self.crc = zlib.crc32(node_id.encode())
        self.chunks: list[bytes] = [b""] * len(HEADERS)


class DcgmExposition(Sink):
    """Keeps every node's dcgm-style lines, re-rendered only when the node changed, and serves
    them through the same shard views (cached gzip members per block) as the gpufleet exposition."""

    name = "dcgm-view"

    def __init__(self, state: FleetState) -> None:
        self._state = state
        self._lines: dict[str, _DcgmLines] = {}
        # The last XID per node and GPU index: DCGM's XID field keeps the latest code.
        self._last_xids: dict[str, dict[int, int]] = {}
        self._dirty: set[str] = set()
        self._views = ShardViews(HEADERS)
        self._rendered: tuple[Body, bytes] | None = None
        for node in state.nodes():
            # XIDs that came before this view: only the order codes were first seen in is known.
            self._last_xids[node.node_id] = {
                index: list(gpu.xid_totals)[-1] for index, gpu in node.gpus.items() if gpu.xid_totals
            }
            self._dirty.add(node.node_id)

    def node_removed(self, node: NodeRecord) -> None:
        self._dirty.add(node.node_id)

    def node_changed(self, node: NodeRecord) -> None:
        self._dirty.add(node.node_id)
        last = self._last_xids.setdefault(node.node_id, {})
        for index, gpu in node.gpus.items():
            if gpu.sample is not None and gpu.sample.xid_events:
                last[index] = gpu.sample.xid_events[-1].code

    def _refresh(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        for node_id in dirty:
            node = self._state.get(node_id)
            if node is None:
                self._lines.pop(node_id, None)
                self._last_xids.pop(node_id, None)
                self._views.removed(node_id)
                continue
            lines = self._lines.get(node_id)
            if lines is None:
                lines = self._lines[node_id] = _DcgmLines(node_id)
            chunks = render_node(node, self._last_xids.get(node_id, {}))
            changed = [family for family, chunk in enumerate(chunks) if chunk != lines.chunks[family]]
            lines.chunks = chunks
            self._views.changed(node_id, lines, changed)

    def body(self, shard: int = 0, shards: int = 1) -> Body:
        """The dcgm-exporter compatible exposition, or one shard of it; only changed nodes render again."""
        self._refresh()
        return self._views.body(shard, shards)

    def render(self) -> bytes:
        """The whole view as bytes (the same bytes while nothing changed)."""
        body = self.body()
        if self._rendered is None or self._rendered[0] is not body:
            self._rendered = (body, bytes(body))
        return self._rendered[1]
