"""Limits on everything an agent sends, checked before anything reaches the fleet's state.

A message over a limit is refused with a precise reason (the ingest path turns it
into INVALID_ARGUMENT and counts it); values outside physical ranges are dropped
(absent, as the agent would have done) and timestamps from the future are clamped
to now, both counted. Nothing an agent sends reaches /metrics or MQTT unescaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.allocations import bound
from gpufleet.plausible import drop_implausible
from gpufleet.v1 import allocation_pb2, ingest_pb2, inventory_pb2, telemetry_pb2


@dataclass(frozen=True)
class Limits:
    max_gpus_per_node: int = 64
    max_labels_per_node: int = 32
    max_label_key_length: int = 64
    max_label_value_length: int = 256
    # Identity, version and other strings (hostname, UUID, serial, model name...).
    max_string_length: int = 256
    max_processes_per_gpu: int = 1024
    # NVML allows at most 7 MIG instances on a GPU.
    max_mig_instances_per_gpu: int = 8
    max_xids_per_gpu_report: int = 256
    # A report stamped further ahead than this is taken as stamped now.
    max_clock_skew_s: float = 300.0
    # Sustained reports per second per node, and the burst a reconnect's resend may use.
    reports_per_second: float = 10.0
    report_burst: int = 2000
    # Agent streams open at once, and how long a new one may take to say hello.
    max_streams: int = 50_000
    hello_timeout_s: float = 10.0
    # Nodes the collector keeps in all, and new ones one peer (an address, or a token) may
    # register per second and at once (one host is one node; a simulated fleet is many).
    max_nodes: int = 20_000
    registrations_per_peer_per_second: float = 20.0
    registration_burst_per_peer: int = 2_000
    # Agent streams one peer may hold open.
    max_streams_per_peer: int = 2_000
    # XID and health events one node may add to the event log per second, and at once.
    events_per_node_per_second: float = 10.0
    event_burst_per_node: int = 200
    # The report interval a node may announce (0 means the default, 10 s).
    min_report_interval_ms: int = 50
    max_report_interval_ms: int = 86_400_000


# Sequences and counters are kept as SQLite integers: signed 64-bit.
MAX_SEQUENCE = 2**63 - 1


class LimitExceeded(Exception):
    """A message over a limit; ``reason`` names the limit (a metric label)."""

    def __init__(self, reason: str, details: str) -> None:
        super().__init__(details)
        self.reason = reason


INVENTORY_STRINGS = (
    "node_id",
    "hostname",
    "boot_id",
    "datacenter",
    "cluster",
    "rack",
    "agent_version",
    "driver_version",
    "cuda_version",
    "nvml_version",
)
GPU_STRINGS = ("uuid", "serial", "name", "architecture", "compute_capability", "pci_bus_id", "vbios_version")
MIG_STRINGS = ("uuid", "profile")


def _check_strings(message: object, fields: tuple[str, ...], limit: int, where: str) -> None:
    for name in fields:
        value = getattr(message, name)
        if len(value) > limit:
            raise LimitExceeded(
                "string_length", f"{where}{name} is {len(value)} characters; the limit is {limit}"
            )


def check_inventory(inventory: inventory_pb2.NodeInventory, limits: Limits) -> None:
    _check_strings(inventory, INVENTORY_STRINGS, limits.max_string_length, "")
    if len(inventory.labels) > limits.max_labels_per_node:
        raise LimitExceeded(
            "labels", f"{len(inventory.labels)} labels; the limit is {limits.max_labels_per_node}"
        )
    for key, value in inventory.labels.items():
        if len(key) > limits.max_label_key_length or len(value) > limits.max_label_value_length:
            raise LimitExceeded(
                "label_length",
                f"label {key[:32]!r} is over the limit of {limits.max_label_key_length} "
                f"(key) or {limits.max_label_value_length} (value) characters",
            )
    if len(inventory.gpus) > limits.max_gpus_per_node:
        raise LimitExceeded("gpus", f"{len(inventory.gpus)} GPUs; the limit is {limits.max_gpus_per_node}")
    for gpu in inventory.gpus:
        if gpu.index >= limits.max_gpus_per_node:
            raise LimitExceeded(
                "gpu_index", f"GPU index {gpu.index}; the limit is {limits.max_gpus_per_node - 1}"
            )
        _check_strings(gpu, GPU_STRINGS, limits.max_string_length, f"GPU {gpu.index} ")
        _check_mig(gpu.mig_instances, gpu.index, limits)
        for mig in gpu.mig_instances:
            _check_strings(mig, MIG_STRINGS, limits.max_string_length, f"GPU {gpu.index} MIG {mig.index} ")


def _check_mig(
    instances: Sequence[inventory_pb2.MigInventory] | Sequence[telemetry_pb2.MigSample],
    index: int,
    limits: Limits,
) -> None:
    """At most the limit of MIG instances on a GPU, each GPU instance id once."""
    count = len(instances)
    if count > limits.max_mig_instances_per_gpu:
        raise LimitExceeded(
            "mig_instances",
            f"{count} MIG instances on GPU {index}; the limit is {limits.max_mig_instances_per_gpu}",
        )
    ids = {instance.gpu_instance_id for instance in instances}
    if len(ids) != count:
        raise LimitExceeded("mig_instances", f"GPU {index} names a MIG GPU instance id twice")


def _check_processes(processes: Sequence[telemetry_pb2.GpuProcess], where: str, limits: Limits) -> None:
    if len(processes) > limits.max_processes_per_gpu:
        raise LimitExceeded(
            "processes", f"{len(processes)} processes on {where}; the limit is {limits.max_processes_per_gpu}"
        )
    if any(len(p.name) > limits.max_string_length for p in processes):
        raise LimitExceeded(
            "string_length", f"a process name on {where} is over {limits.max_string_length} characters"
        )


def check_hello(hello: ingest_pb2.Hello, limits: Limits) -> None:
    interval = hello.report_interval_ms
    if interval and not limits.min_report_interval_ms <= interval <= limits.max_report_interval_ms:
        raise LimitExceeded(
            "report_interval",
            f"report interval {interval} ms is outside {limits.min_report_interval_ms} to "
            f"{limits.max_report_interval_ms} ms",
        )
    check_inventory(hello.inventory, limits)


def check_report(report: ingest_pb2.Report, limits: Limits) -> None:
    if report.sequence > MAX_SEQUENCE:
        raise LimitExceeded(
            "sequence", f"report sequence {report.sequence} is over the largest allowed, {MAX_SEQUENCE}"
        )
    if report.HasField("inventory"):
        check_inventory(report.inventory, limits)
    if len(report.gpus) > limits.max_gpus_per_node:
        raise LimitExceeded(
            "gpus", f"{len(report.gpus)} GPU samples; the limit is {limits.max_gpus_per_node}"
        )
    for gpu in report.gpus:
        if gpu.index >= limits.max_gpus_per_node:
            raise LimitExceeded(
                "gpu_index", f"GPU index {gpu.index}; the limit is {limits.max_gpus_per_node - 1}"
            )
        if len(gpu.xid_events) > limits.max_xids_per_gpu_report:
            raise LimitExceeded(
                "xids",
                f"{len(gpu.xid_events)} XIDs for GPU {gpu.index} in one report; "
                f"the limit is {limits.max_xids_per_gpu_report}",
            )
        _check_processes(gpu.processes.processes, f"GPU {gpu.index}", limits)
        if len(gpu.read_error) > limits.max_string_length:
            raise LimitExceeded(
                "string_length", f"a string of GPU {gpu.index} is over {limits.max_string_length} characters"
            )
        _check_mig(gpu.mig_instances, gpu.index, limits)
        for mig in gpu.mig_instances:
            _check_processes(mig.processes.processes, f"GPU {gpu.index} MIG {mig.gpu_instance_id}", limits)


def bound_allocations(allocations: allocation_pb2.Allocations, limits: Limits) -> int:
    """Cut what a node says about who holds its GPUs to the limits; return the values cut or dropped.

    Attribution comes from outside the agent (pod and job names): over-long values are cut and
    extra allocations dropped, never refused, so that the node's telemetry still counts.
    """
    cut = bound(allocations)
    kept = [a for a in allocations.allocations if a.gpu_index < limits.max_gpus_per_node]
    if len(kept) != len(allocations.allocations):
        cut += len(allocations.allocations) - len(kept)
        del allocations.allocations[:]
        allocations.allocations.extend(kept)
    return cut


def clamp_report(report: ingest_pb2.Report, now_ns: int, limits: Limits) -> int:
    """Drop implausible values and clamp future timestamps; return how many values were touched."""
    touched = sum(drop_implausible(gpu) for gpu in report.gpus)
    latest = now_ns + int(limits.max_clock_skew_s * 1e9)
    if report.time_unix_nano > latest:
        report.time_unix_nano = now_ns
        touched += 1
    for gpu in report.gpus:
        for event in gpu.xid_events:
            if event.time_unix_nano > latest:
                event.time_unix_nano = now_ns
                touched += 1
    return touched
