"""Compare what `gpufleet-agent --once` reports with what `nvidia-smi -q -x` reports, GPU by GPU.

Run it on a GPU host from the repository root: ``python tools/gpu_check.py``. With
``--agent-json FILE`` and ``--smi-xml FILE`` (and ``--smi-list FILE``) it compares recorded
outputs instead.

Both sides are normalized to nvidia-smi's units (MiB, W, MHz, C, %, KB/s, ms). Identity
fields must match exactly, to the resolution nvidia-smi prints; live values (power draw,
utilization, temperatures, clocks, memory in use) may differ by the tolerance in
GPU_FIELDS, since the two reads are seconds apart. GPUs are paired by PCI bus id, MIG
devices by their GPU and compute instance ids. ``nvidia-smi -q -x`` names no MIG profile
and no MIG UUID: those come from ``nvidia-smi -L``.

GPM activity is not in nvidia-smi's document, and ``--once`` takes one sample, which has
none (GPM needs an earlier sample). On a live host the check takes its own NVML samples
through the agent's NvmlSource: a first one, a second one GPM_INTERVAL_S later whose GPM
values it shows (informational, never a mismatch), and more to time a sample with GPM
against the first one without.

Exit status: 0 every compared value matches, 1 a mismatch, 2 the check could not run,
3 no NVIDIA GPU here (nothing to check).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_ERROR = 2
EXIT_NO_GPU = 3

MATCH = "match"
MISMATCH = "mismatch"
ONLY_AGENT = "only agent"
ONLY_SMI = "only nvidia-smi"
VERDICTS = (MATCH, MISMATCH, ONLY_AGENT, ONLY_SMI)

NODE = "node"  # the snapshot key of node-wide values; GPUs are keyed by PCI bus id
MIB = 2**20
COMMAND_TIMEOUT_S = 120.0

Value = str | bool | int | float
Snapshot = dict[str, dict[str, Value]]


class NoGpu(Exception):
    """There is no NVIDIA GPU to check on this host."""


class CheckError(Exception):
    """The check could not run: an unreadable input, a failed command."""


@dataclass(frozen=True)
class Field:
    """One compared value, in nvidia-smi's unit."""

    name: str
    unit: str = ""
    # nvidia-smi prints values to this resolution: a smaller difference is its rounding.
    resolution: float = 0.0
    # Live values are read seconds apart: they may differ by this much, or this share.
    live_abs: float | None = None
    live_rel: float = 0.0

    @property
    def live(self) -> bool:
        return self.live_abs is not None

    def allowed(self, a: float, b: float) -> float:
        return max(self.resolution, self.live_abs or 0.0, self.live_rel * max(abs(a), abs(b)))


NODE_FIELDS = (Field("driver_version"), Field("cuda_version"))

GPU_FIELDS = (
    Field("product_name"),
    Field("architecture"),
    Field("uuid"),
    Field("serial"),
    Field("pci_bus_id"),
    Field("vbios_version"),
    Field("memory_total", "MiB", resolution=1),
    Field("memory_reserved", "MiB", resolution=1),
    Field("memory_used", "MiB", resolution=1, live_abs=256, live_rel=0.02),
    Field("memory_free", "MiB", resolution=1, live_abs=256, live_rel=0.02),
    Field("power_limit_default", "W", resolution=0.01),
    Field("power_limit_enforced", "W", resolution=0.01),
    Field("power_limit_min", "W", resolution=0.01),
    Field("power_limit_max", "W", resolution=0.01),
    Field("power_draw", "W", resolution=0.01, live_abs=30, live_rel=0.15),
    Field("sm_clock", "MHz", live_abs=100, live_rel=0.1),
    Field("memory_clock", "MHz", live_abs=100, live_rel=0.1),
    Field("max_sm_clock", "MHz"),
    Field("max_memory_clock", "MHz"),
    Field("gpu_temperature", "C", live_abs=3),
    Field("memory_temperature", "C", live_abs=3),
    Field("gpu_utilization", "%", live_abs=15),
    Field("memory_utilization", "%", live_abs=15),
    Field("encoder_utilization", "%", live_abs=15),
    Field("decoder_utilization", "%", live_abs=15),
    Field("fan_speed", "%", live_abs=10),
    Field("performance_state", "P", live_abs=0),
    Field("clock_event_reasons", "mask", live_abs=0),
    # Cumulative time throttled: grows by at most the wall time between the two reads.
    Field("throttle_power_cap", "ms", resolution=0.001, live_abs=10_000),
    Field("throttle_sw_thermal", "ms", resolution=0.001, live_abs=10_000),
    Field("throttle_hw_thermal", "ms", resolution=0.001, live_abs=10_000),
    Field("throttle_hw_power_brake", "ms", resolution=0.001, live_abs=10_000),
    Field("pcie_tx", "KB/s", resolution=1, live_abs=50_000, live_rel=0.5),
    Field("pcie_rx", "KB/s", resolution=1, live_abs=50_000, live_rel=0.5),
    Field("pcie_replay_count"),
    Field("ecc_enabled"),
    Field("ecc_corrected_volatile"),
    Field("ecc_uncorrected_volatile"),
    Field("ecc_corrected_aggregate"),
    Field("ecc_uncorrected_aggregate"),
    Field("remapped_rows_correctable"),
    Field("remapped_rows_uncorrectable"),
    Field("row_remap_pending"),
    Field("row_remap_failure"),
    Field("recovery_action"),
    Field("mig_enabled"),
    Field("persistence_enabled"),
)

# A GPU's MIG devices, by their (GPU instance, compute instance) ids: "1/0 3/0 7/0", or "none".
MIG_INSTANCES = Field("mig_instances")
# Each MIG device's values, compared as "mig[<GPU instance>/<compute instance>].<name>".
MIG_FIELDS = (
    Field("index"),  # the MIG device index on its GPU
    Field("uuid"),
    Field("profile"),
    Field("memory_total", "MiB", resolution=1),
)
MIG_KEY = re.compile(r"^mig\[(\d+)/(\d+)\]\.")

# -- nvidia-smi -q -x ---------------------------------------------------------------------

# Texts nvidia-smi writes for a value it cannot give, with or without brackets.
ABSENT_TEXTS = frozenset(
    {
        "",
        "n/a",
        "not supported",
        "not available",
        "unknown error",
        "insufficient permissions",
        "requested functionality has been deprecated",
    }
)
TRUE_TEXTS = frozenset({"enabled", "yes", "active", "on"})
FALSE_TEXTS = frozenset({"disabled", "no", "not active", "off"})

# nvmlClocksEventReasons bits, by the suffix of nvidia-smi's element names.
REASON_BITS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clocks_setting": 0x100,
}
# Newer drivers name them "event" reasons, older ones "throttle" reasons.
REASON_BLOCKS = (
    ("clocks_event_reasons", "clocks_event_reason_"),
    ("clocks_throttle_reasons", "clocks_throttle_reason_"),
)
THROTTLE_COUNTERS = {
    "throttle_power_cap": "sw_power_cap",
    "throttle_sw_thermal": "sw_therm_slowdown",
    "throttle_hw_thermal": "hw_therm_slowdown",
    "throttle_hw_power_brake": "hw_power_brake",
}
CORRECTED_TAGS = ("sram_correctable", "dram_correctable")
UNCORRECTED_TAGS = (
    "sram_uncorrectable",
    "sram_uncorrectable_parity",
    "sram_uncorrectable_secded",
    "dram_uncorrectable",
)
# NVML recovery action (field 230) and nvidia-smi's words for it, squashed to letters.
RECOVERY_ACTIONS = ("none", "gpu reset", "node reboot", "drain p2p", "drain and reset")
RECOVERY_TEXTS = {
    "none": "none",
    "reset": "gpu reset",
    "gpureset": "gpu reset",
    "reboot": "node reboot",
    "nodereboot": "node reboot",
    "drainp2p": "drain p2p",
    "drainandreset": "drain and reset",
}
BUS_ID = re.compile(r"^([0-9a-f]+):([0-9a-f]+):([0-9a-f]+)\.([0-7])$", re.IGNORECASE)
# `nvidia-smi -L`: "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)", then each of its MIG devices,
# "  MIG 1g.10gb     Device  0: (UUID: MIG-...)" (older drivers: "MIG-GPU-<uuid>/<gi>/<ci>").
LISTED_GPU = re.compile(r"^GPU\s+\d+:.*\(UUID:\s*(GPU-[^)\s]+)\)")
LISTED_MIG = re.compile(r"^MIG\s+(\S+)\s+Device\s+(\d+):\s*\(UUID:\s*([^)\s]+)\)")


class ListedMig(NamedTuple):
    """A MIG device as `nvidia-smi -L` lists it."""

    profile: str
    uuid: str


def _clean(text: str | None) -> str | None:
    """An element's text, or None for "N/A", "[Not Supported]" and the like."""
    if text is None:
        return None
    value = " ".join(text.split())
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1].strip()
    return None if value.lower() in ABSENT_TEXTS else value


def _text(parent: ET.Element | None, *paths: str) -> str | None:
    """The first of ``paths`` under ``parent`` that holds a value."""
    if parent is None:
        return None
    for path in paths:
        element = parent.find(path)
        value = _clean(element.text) if element is not None else None
        if value is not None:
            return value
    return None


def _number(parent: ET.Element | None, *paths: str) -> float | None:
    """The number that leads "81559 MiB", "700.00 W", "64 C"."""
    text = _text(parent, *paths)
    if text is None:
        return None
    try:
        return float(text.split()[0])
    except ValueError:
        return None


def _count(parent: ET.Element | None, *paths: str) -> int | None:
    number = _number(parent, *paths)
    return None if number is None else int(number)


def _truth(text: str | None) -> bool | None:
    value = _clean(text)
    if value is None:
        return None
    if value.lower() in TRUE_TEXTS:
        return True
    if value.lower() in FALSE_TEXTS:
        return False
    return None


def _flag(parent: ET.Element | None, path: str) -> bool | None:
    element = parent.find(path) if parent is not None else None
    return _truth(element.text) if element is not None else None


def _bus_id(text: str | None) -> str | None:
    """``0000:18:00.0`` and ``00000000:18:00.0`` -> ``00000000:18:00.0``."""
    if not text:
        return None
    match = BUS_ID.match(text.strip())
    if match is None:
        return text.strip().upper()
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):08X}:{int(bus, 16):02X}:{int(device, 16):02X}.{function}"


def _pstate(text: str | None) -> int | None:
    """``P0`` -> 0."""
    if text is None or not text.upper().startswith("P") or not text[1:].isdigit():
        return None
    return int(text[1:])


def _recovery(text: str | None) -> str | None:
    if text is None:
        return None
    squashed = re.sub(r"[^a-z0-9]", "", text.lower())
    return RECOVERY_TEXTS.get(squashed, text.lower())


def _ecc_count(ecc: ET.Element | None, scope: str, *, corrected: bool) -> int | None:
    """Total corrected or uncorrected ECC errors in ``scope`` (volatile, aggregate).

    Older drivers give single_bit/double_bit totals; newer ones SRAM and DRAM counts,
    which together make NVML's total.
    """
    block = ecc.find(scope) if ecc is not None else None
    if block is None:
        return None
    legacy = block.find("single_bit" if corrected else "double_bit")
    if legacy is not None:
        return _count(legacy, "total")
    counts = [_count(block, tag) for tag in (CORRECTED_TAGS if corrected else UNCORRECTED_TAGS)]
    present = [count for count in counts if count is not None]
    return sum(present) if present else None


def _clock_event_reasons(gpu: ET.Element) -> int | None:
    """The nvmlClocksEventReasons bitmask from nvidia-smi's Active / Not Active list."""
    for block_name, prefix in REASON_BLOCKS:
        block = gpu.find(block_name)
        if block is None:
            continue
        mask, known = 0, False
        for child in block:
            bit = REASON_BITS.get(child.tag.removeprefix(prefix))
            active = _truth(child.text)
            if bit is None or active is None:
                continue
            known = True
            mask |= bit if active else 0
        return mask if known else None
    return None


def _throttle_ms(gpu: ET.Element, counter: str) -> float | None:
    microseconds = _number(gpu, f"clocks_event_reasons_counters/clocks_event_reasons_counters_{counter}")
    return None if microseconds is None else microseconds / 1000


def _present(values: Mapping[str, Value | None]) -> dict[str, Value]:
    return {name: value for name, value in values.items() if value is not None}


def mig_name(gpu_instance: int, compute_instance: int, name: str) -> str:
    """``mig[1/0].memory_total``: a MIG device's value, named by its ids."""
    return f"mig[{gpu_instance}/{compute_instance}].{name}"


def _mig_values(
    enabled: bool | None, devices: Sequence[tuple[int, int, Mapping[str, Value | None]]]
) -> dict[str, Value]:
    """A GPU's MIG devices as values of the GPU: the set of their ids, and each one's values.

    The set is there when MIG mode is on or there are devices ("none" for MIG mode without any).
    """
    values: dict[str, Value | None] = {}
    if enabled or devices:
        ids = sorted((gpu_instance, compute_instance) for gpu_instance, compute_instance, _ in devices)
        values[MIG_INSTANCES.name] = " ".join(f"{gi}/{ci}" for gi, ci in ids) or "none"
    for gpu_instance, compute_instance, device in devices:
        values.update({mig_name(gpu_instance, compute_instance, k): v for k, v in device.items()})
    return _present(values)


def _smi_migs(gpu: ET.Element, listed: Mapping[int, ListedMig]) -> dict[str, Value]:
    """``<mig_devices>``; profile and UUID from the `nvidia-smi -L` entry of the same MIG device index."""
    devices = []
    for device in gpu.findall("mig_devices/mig_device"):
        gpu_instance, compute_instance = (
            _count(device, "gpu_instance_id"),
            _count(device, "compute_instance_id"),
        )
        if gpu_instance is None or compute_instance is None:
            continue
        index = _count(device, "index")
        entry = listed.get(index) if index is not None else None
        values: dict[str, Value | None] = {
            "index": index,
            "uuid": entry.uuid if entry else None,
            "profile": entry.profile if entry else None,
            "memory_total": _number(device, "fb_memory_usage/total"),
        }
        devices.append((gpu_instance, compute_instance, values))
    return _mig_values(_flag(gpu, "mig_mode/current_mig"), devices)


def parse_smi_list(text: str) -> dict[str, dict[int, ListedMig]]:
    """``nvidia-smi -L`` -> each GPU's MIG devices by MIG device index, the GPUs keyed by UUID."""
    listing: dict[str, dict[int, ListedMig]] = {}
    devices: dict[int, ListedMig] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if gpu := LISTED_GPU.match(line):
            devices = listing.setdefault(gpu.group(1), {})
        elif (mig := LISTED_MIG.match(line)) and devices is not None:
            devices[int(mig.group(2))] = ListedMig(profile=mig.group(1), uuid=mig.group(3))
    return listing


def _smi_gpu(gpu: ET.Element, listed: Mapping[int, ListedMig]) -> dict[str, Value]:
    # <power_readings> before driver 530, <gpu_power_readings> since.
    power = gpu.find("gpu_power_readings")
    if power is None:
        power = gpu.find("power_readings")
    ecc = gpu.find("ecc_errors")
    remap = gpu.find("remapped_rows")
    values: dict[str, Value | None] = {
        "product_name": _text(gpu, "product_name"),
        "architecture": _text(gpu, "product_architecture"),
        "uuid": _text(gpu, "uuid"),
        "serial": _text(gpu, "serial"),
        "pci_bus_id": _bus_id(_text(gpu, "pci/pci_bus_id") or gpu.get("id")),
        "vbios_version": _text(gpu, "vbios_version"),
        "memory_total": _number(gpu, "fb_memory_usage/total"),
        "memory_reserved": _number(gpu, "fb_memory_usage/reserved"),
        "memory_used": _number(gpu, "fb_memory_usage/used"),
        "memory_free": _number(gpu, "fb_memory_usage/free"),
        "power_limit_default": _number(power, "default_power_limit"),
        # "Current Power Limit" on newer drivers is the enforced one.
        "power_limit_enforced": _number(power, "enforced_power_limit", "current_power_limit"),
        "power_limit_min": _number(power, "min_power_limit"),
        "power_limit_max": _number(power, "max_power_limit"),
        # NVML's power usage is a 1 s average on Ampere and newer: the average first.
        "power_draw": _number(power, "power_draw", "average_power_draw", "instant_power_draw"),
        "sm_clock": _number(gpu, "clocks/sm_clock"),
        "memory_clock": _number(gpu, "clocks/mem_clock"),
        "max_sm_clock": _number(gpu, "max_clocks/sm_clock"),
        "max_memory_clock": _number(gpu, "max_clocks/mem_clock"),
        "gpu_temperature": _number(gpu, "temperature/gpu_temp"),
        "memory_temperature": _number(gpu, "temperature/memory_temp"),
        "gpu_utilization": _number(gpu, "utilization/gpu_util"),
        "memory_utilization": _number(gpu, "utilization/memory_util"),
        "encoder_utilization": _number(gpu, "utilization/encoder_util"),
        "decoder_utilization": _number(gpu, "utilization/decoder_util"),
        "fan_speed": _number(gpu, "fan_speed"),
        "performance_state": _pstate(_text(gpu, "performance_state") or _text(power, "power_state")),
        "clock_event_reasons": _clock_event_reasons(gpu),
        **{name: _throttle_ms(gpu, counter) for name, counter in THROTTLE_COUNTERS.items()},
        "pcie_tx": _number(gpu, "pci/tx_util"),
        "pcie_rx": _number(gpu, "pci/rx_util"),
        "pcie_replay_count": _count(gpu, "pci/replay_counter"),
        "ecc_enabled": _flag(gpu, "ecc_mode/current_ecc"),
        "ecc_corrected_volatile": _ecc_count(ecc, "volatile", corrected=True),
        "ecc_uncorrected_volatile": _ecc_count(ecc, "volatile", corrected=False),
        "ecc_corrected_aggregate": _ecc_count(ecc, "aggregate", corrected=True),
        "ecc_uncorrected_aggregate": _ecc_count(ecc, "aggregate", corrected=False),
        "remapped_rows_correctable": _count(remap, "remapped_row_corr"),
        "remapped_rows_uncorrectable": _count(remap, "remapped_row_unc"),
        "row_remap_pending": _flag(remap, "remapped_row_pending"),
        "row_remap_failure": _flag(remap, "remapped_row_failure"),
        "recovery_action": _recovery(_text(gpu, "gpu_recovery_action")),
        "mig_enabled": _flag(gpu, "mig_mode/current_mig"),
        "persistence_enabled": _flag(gpu, "persistence_mode"),
    }
    return {**_present(values), **_smi_migs(gpu, listed)}


def _gpu_key(values: Mapping[str, Value], index: int) -> str:
    bus_id = values.get("pci_bus_id")
    return bus_id if isinstance(bus_id, str) else f"#{index}"


def parse_smi(xml_text: str | bytes, listing: str | None = None) -> Snapshot:
    """``nvidia-smi -q -x`` output -> node values and each GPU's, keyed by PCI bus id.

    ``listing``: ``nvidia-smi -L`` output, for the profile and UUID of each MIG device.
    """
    data = xml_text.encode() if isinstance(xml_text, str) else xml_text
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise CheckError(f"not an nvidia-smi XML document: {exc}") from exc
    if root.tag != "nvidia_smi_log":
        raise CheckError(f"not an nvidia-smi XML document: the root is <{root.tag}>, not <nvidia_smi_log>")
    snapshot: Snapshot = {
        NODE: _present(
            {"driver_version": _text(root, "driver_version"), "cuda_version": _text(root, "cuda_version")}
        )
    }
    listed = parse_smi_list(listing) if listing is not None else {}
    # nvidia-smi lists GPUs in NVML's order, so the position is the GPU's index.
    for index, gpu in enumerate(root.findall("gpu")):
        values = _smi_gpu(gpu, listed.get(_text(gpu, "uuid") or "", {}))
        values["index"] = index
        snapshot[_gpu_key(values, index)] = values
    return snapshot


# -- gpufleet-agent --once ----------------------------------------------------------------


def _agent_text(message: Mapping[str, Any], key: str) -> str | None:
    value = message.get(key)
    return str(value) if value else None  # proto3 writes an unset string as ""


def _agent_number(message: Mapping[str, Any], key: str, divisor: float = 1) -> float | None:
    """A number (64-bit ones arrive as JSON strings) converted to nvidia-smi's unit."""
    value = message.get(key)
    return None if value is None else int(value) / divisor


def _agent_count(message: Mapping[str, Any], key: str) -> int | None:
    value = message.get(key)
    return None if value is None else int(value)


def _agent_flag(message: Mapping[str, Any], key: str) -> bool | None:
    value = message.get(key)
    return None if value is None else bool(value)


def _agent_recovery(message: Mapping[str, Any]) -> str | None:
    code = _agent_count(message, "recovery_action")
    if code is None:
        return None
    return RECOVERY_ACTIONS[code] if 0 <= code < len(RECOVERY_ACTIONS) else f"unknown ({code})"


def _agent_inventory(gpu: Mapping[str, Any]) -> dict[str, Value | None]:
    return {
        "product_name": _agent_text(gpu, "name"),
        "architecture": _agent_text(gpu, "architecture"),
        "uuid": _agent_text(gpu, "uuid"),
        "serial": _agent_text(gpu, "serial"),
        "pci_bus_id": _bus_id(_agent_text(gpu, "pci_bus_id")),
        "vbios_version": _agent_text(gpu, "vbios_version"),
        "memory_total": _agent_number(gpu, "memory_total_bytes", MIB),
        "power_limit_default": _agent_number(gpu, "power_limit_default_milliwatts", 1000),
        "power_limit_enforced": _agent_number(gpu, "power_limit_enforced_milliwatts", 1000),
        "power_limit_min": _agent_number(gpu, "power_limit_min_milliwatts", 1000),
        "power_limit_max": _agent_number(gpu, "power_limit_max_milliwatts", 1000),
        "max_sm_clock": _agent_number(gpu, "max_sm_clock_mhz"),
        "max_memory_clock": _agent_number(gpu, "max_memory_clock_mhz"),
        "ecc_enabled": _agent_flag(gpu, "ecc_enabled"),
        "mig_enabled": _agent_flag(gpu, "mig_enabled"),
        "persistence_enabled": _agent_flag(gpu, "persistence_enabled"),
    }


def _agent_migs(gpu: Mapping[str, Any]) -> dict[str, Value]:
    devices = []
    for mig in gpu.get("mig_instances", []):
        values: dict[str, Value | None] = {
            "index": _agent_count(mig, "index"),
            "uuid": _agent_text(mig, "uuid"),
            "profile": _agent_text(mig, "profile"),
            "memory_total": _agent_number(mig, "memory_total_bytes", MIB),
        }
        devices.append((int(mig.get("gpu_instance_id", 0)), int(mig.get("compute_instance_id", 0)), values))
    return _mig_values(_agent_flag(gpu, "mig_enabled"), devices)


def _agent_sample(sample: Mapping[str, Any]) -> dict[str, Value | None]:
    return {
        "memory_reserved": _agent_number(sample, "memory_reserved_bytes", MIB),
        "memory_used": _agent_number(sample, "memory_used_bytes", MIB),
        "memory_free": _agent_number(sample, "memory_free_bytes", MIB),
        "power_draw": _agent_number(sample, "power_draw_milliwatts", 1000),
        "sm_clock": _agent_number(sample, "sm_clock_mhz"),
        "memory_clock": _agent_number(sample, "memory_clock_mhz"),
        "gpu_temperature": _agent_number(sample, "gpu_temperature_celsius"),
        "memory_temperature": _agent_number(sample, "memory_temperature_celsius"),
        "gpu_utilization": _agent_number(sample, "gpu_utilization_percent"),
        "memory_utilization": _agent_number(sample, "memory_copy_utilization_percent"),
        "encoder_utilization": _agent_number(sample, "encoder_utilization_percent"),
        "decoder_utilization": _agent_number(sample, "decoder_utilization_percent"),
        "fan_speed": _agent_number(sample, "fan_speed_percent"),
        "performance_state": _agent_count(sample, "performance_state"),
        "clock_event_reasons": _agent_count(sample, "clock_event_reasons"),
        "throttle_power_cap": _agent_number(sample, "throttle_power_cap_nanoseconds", 1e6),
        "throttle_sw_thermal": _agent_number(sample, "throttle_sw_thermal_nanoseconds", 1e6),
        "throttle_hw_thermal": _agent_number(sample, "throttle_hw_thermal_nanoseconds", 1e6),
        "throttle_hw_power_brake": _agent_number(sample, "throttle_hw_power_brake_nanoseconds", 1e6),
        "pcie_tx": _agent_number(sample, "pcie_tx_bytes_per_second", 1024),
        "pcie_rx": _agent_number(sample, "pcie_rx_bytes_per_second", 1024),
        "pcie_replay_count": _agent_count(sample, "pcie_replay_count"),
        "ecc_corrected_volatile": _agent_count(sample, "ecc_corrected_volatile"),
        "ecc_uncorrected_volatile": _agent_count(sample, "ecc_uncorrected_volatile"),
        "ecc_corrected_aggregate": _agent_count(sample, "ecc_corrected_aggregate"),
        "ecc_uncorrected_aggregate": _agent_count(sample, "ecc_uncorrected_aggregate"),
        "remapped_rows_correctable": _agent_count(sample, "remapped_rows_correctable"),
        "remapped_rows_uncorrectable": _agent_count(sample, "remapped_rows_uncorrectable"),
        "row_remap_pending": _agent_flag(sample, "row_remap_pending"),
        "row_remap_failure": _agent_flag(sample, "row_remap_failure"),
        "recovery_action": _agent_recovery(sample),
    }


def load_agent_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckError(f"not the JSON of gpufleet-agent --once: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("inventory"), dict):
        raise CheckError("not the JSON of gpufleet-agent --once: no inventory")
    return data


def parse_agent(document: str | Mapping[str, Any]) -> Snapshot:
    """``gpufleet-agent --once`` output -> the same shape as parse_smi, in nvidia-smi's units."""
    data = load_agent_json(document) if isinstance(document, str) else document
    inventory = data["inventory"]
    snapshot: Snapshot = {
        NODE: _present(
            {
                "driver_version": _agent_text(inventory, "driver_version"),
                "cuda_version": _agent_text(inventory, "cuda_version"),
            }
        )
    }
    by_index: dict[int, dict[str, Value | None]] = {}
    for gpu in inventory.get("gpus", []):
        by_index[int(gpu.get("index", 0))] = {**_agent_inventory(gpu), **_agent_migs(gpu)}
    # A lost GPU's sample carries no values, so it adds nothing here.
    for sample in data.get("gpus", []):
        by_index.setdefault(int(sample.get("index", 0)), {}).update(_agent_sample(sample))
    for index, raw in sorted(by_index.items()):
        values = _present(raw)
        values["index"] = index
        snapshot[_gpu_key(values, index)] = values
    return snapshot


# -- comparison ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    field: str
    gpu: int | None  # None for node-wide values
    agent: Value | None
    smi: Value | None
    verdict: str
    unit: str = ""
    live: bool = False  # read at different moments: compared within a tolerance


def _index(values: Mapping[str, Value]) -> int:
    index = values.get("index", -1)
    return index if isinstance(index, int) else -1


def pair_gpus(agent: Snapshot, smi: Snapshot) -> list[tuple[int, dict[str, Value], dict[str, Value]]]:
    """The same GPU on both sides: by PCI bus id, else by index (a lost GPU has no bus id)."""
    agent_gpus = {key: values for key, values in agent.items() if key != NODE}
    smi_gpus = {key: values for key, values in smi.items() if key != NODE}
    pairs = [(agent_gpus.pop(key), smi_gpus.pop(key)) for key in sorted(set(agent_gpus) & set(smi_gpus))]
    smi_by_index = {_index(values): key for key, values in smi_gpus.items()}
    for key in sorted(agent_gpus):
        smi_key = smi_by_index.get(_index(agent_gpus[key]))
        if smi_key is not None and smi_key in smi_gpus:
            pairs.append((agent_gpus.pop(key), smi_gpus.pop(smi_key)))
    pairs += [(values, {}) for values in agent_gpus.values()]
    pairs += [({}, values) for values in smi_gpus.values()]
    indexed = [(_index(a) if a else _index(s), a, s) for a, s in pairs]
    return sorted(indexed, key=lambda pair: pair[0])


def _same(field: Field, a: Value, b: Value) -> bool:
    if isinstance(a, (bool, str)) or isinstance(b, (bool, str)):
        return a == b
    return abs(a - b) <= field.allowed(a, b) + 1e-9


def _verdict(field: Field, agent: Value | None, smi: Value | None) -> str:
    if smi is None:
        return ONLY_AGENT
    if agent is None:
        return ONLY_SMI
    return MATCH if _same(field, agent, smi) else MISMATCH


def _compare_values(
    fields: Sequence[Field], gpu: int | None, agent: Mapping[str, Value], smi: Mapping[str, Value]
) -> list[Row]:
    rows = []
    for field in fields:
        a, s = agent.get(field.name), smi.get(field.name)
        if a is not None or s is not None:  # neither side reports it: nothing to compare
            rows.append(Row(field.name, gpu, a, s, _verdict(field, a, s), field.unit, field.live))
    return rows


def mig_fields(agent: Mapping[str, Value], smi: Mapping[str, Value]) -> list[Field]:
    """One GPU's MIG rows: the set of MIG device ids, then each device's values, in id order."""
    ids = sorted({(int(m[1]), int(m[2])) for key in (*agent, *smi) if (m := MIG_KEY.match(key))})
    named = [
        dataclasses.replace(field, name=mig_name(gpu_instance, compute_instance, field.name))
        for gpu_instance, compute_instance in ids
        for field in MIG_FIELDS
    ]
    return [MIG_INSTANCES, *named]


def compare(agent: Snapshot, smi: Snapshot) -> list[Row]:
    """One row per value either side reports: node-wide first, then each GPU in index order."""
    rows = _compare_values(NODE_FIELDS, None, agent.get(NODE, {}), smi.get(NODE, {}))
    for index, agent_gpu, smi_gpu in pair_gpus(agent, smi):
        fields = [*GPU_FIELDS, *mig_fields(agent_gpu, smi_gpu)]
        rows += _compare_values(fields, index, agent_gpu, smi_gpu)
    return rows


def summary(rows: Sequence[Row]) -> dict[str, int]:
    counts = {verdict: 0 for verdict in VERDICTS}
    for row in rows:
        counts[row.verdict] += 1
    return counts


def not_reported(rows: Sequence[Row]) -> list[str]:
    """GPU fields that neither side reported for any GPU (so nothing checked them)."""
    seen = {row.field for row in rows}
    return [field.name for field in GPU_FIELDS if field.name not in seen]


# -- GPM, from the check's own samples -----------------------------------------------------

# GPM activity in a sample, in parts per million of the interval: shown as a 0-1 share.
GPM_SHARES = {
    "graphics": "graphics_active_ppm",
    "sm_active": "sm_active_ppm",
    "sm_occupancy": "sm_occupancy_ppm",
    "tensor": "tensor_active_ppm",
    "dram": "dram_active_ppm",
    "fp64": "fp64_active_ppm",
    "fp32": "fp32_active_ppm",
    "fp16": "fp16_active_ppm",
}
# GPM throughputs in a whole GPU's sample, in bytes/s: shown in MiB/s, GPM's own unit.
GPM_RATES = {"nvlink_tx": "nvlink_tx_bytes_per_second", "nvlink_rx": "nvlink_rx_bytes_per_second"}
PPM = 1_000_000
READ_OK = "GPU_READ_STATUS_OK"
# The sample whose GPM is shown comes this long after the first (GPM needs 100 ms at least).
GPM_INTERVAL_S = 1.0
# Later timed samples are this far apart: over GPM's 100 ms, so that each one computes GPM metrics.
TIMED_GAP_S = 0.2


@dataclass(frozen=True)
class GpmReading:
    """The GPM values of one GPU's sample, or of one of its MIG instances: shown, never compared."""

    gpu: int
    mig: str | None = None  # "1/0": the MIG instance's GPU and compute instance ids
    shares: Mapping[str, float] = dataclasses.field(default_factory=dict)  # 0-1
    rates: Mapping[str, float] = dataclasses.field(default_factory=dict)  # MiB/s
    not_read: str = ""  # why the GPU's sample has no values: LOST or ERROR, and NVML's reason

    @property
    def name(self) -> str:
        return "gpm" if self.mig is None else f"mig[{self.mig}].gpm"

    @property
    def present(self) -> bool:
        return bool(self.shares)

    @property
    def out_of_range(self) -> dict[str, float]:
        return {name: share for name, share in self.shares.items() if not 0 <= share <= 1}

    def describe(self) -> str:
        """``present (sm_active 0.53, tensor 0.12, ...); within 0-1``, ``absent``, ``not read (...)``."""
        if self.not_read:
            return f"not read ({self.not_read})"
        if not self.present:
            return "absent"
        values = [f"{name} {share:.2f}" for name, share in self.shares.items()]
        values += [f"{name} {rate:.1f} MiB/s" for name, rate in self.rates.items()]
        outside = self.out_of_range
        verdict = (
            "out of 0-1: " + ", ".join(f"{name} {share:.2f}" for name, share in outside.items())
            if outside
            else "within 0-1"
        )
        return f"present ({', '.join(values)}); {verdict}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "mig": self.mig,
            "present": self.present,
            "shares": dict(self.shares),
            "rates_mib_per_second": dict(self.rates),
            "within_0_1": not self.out_of_range if self.present else None,
            "not_read": self.not_read or None,
        }


def _shares(message: Mapping[str, Any]) -> dict[str, float]:
    return {name: int(message[key]) / PPM for name, key in GPM_SHARES.items() if key in message}


def gpm_readings(sample: Mapping[str, Any]) -> list[GpmReading]:
    """A GPU sample's GPM values (the JSON of a GpuSample): the GPU's, then each MIG instance's."""
    index = int(sample.get("index", 0))
    status = str(sample.get("read_status", READ_OK))
    if status != READ_OK:
        reason = str(sample.get("read_error") or "no reason given")
        return [GpmReading(index, not_read=f"{status.removeprefix('GPU_READ_STATUS_')}: {reason}")]
    rates = {name: int(sample[key]) / MIB for name, key in GPM_RATES.items() if key in sample}
    readings = [GpmReading(index, shares=_shares(sample), rates=rates)]
    for mig in sample.get("mig_instances", []):
        ids = f"{int(mig.get('gpu_instance_id', 0))}/{int(mig.get('compute_instance_id', 0))}"
        readings.append(GpmReading(index, ids, shares=_shares(mig)))
    return readings


@dataclass(frozen=True)
class Measurement:
    """The check's own NVML samples: the first, then later ones far enough apart for GPM."""

    gpus: int
    first_ms: float  # the first sample, per GPU: no GPM metrics, since GPM needs an earlier sample
    later_ms: float  # the mean of the later samples, per GPU: with GPM metrics where GPM works
    later_samples: int
    interval_s: float  # from the first sample to the second, whose GPM values are shown
    gpm: tuple[GpmReading, ...]
    messages: tuple[str, ...]  # what the NVML source logged meanwhile

    @property
    def gpus_with_gpm(self) -> int:
        return sum(1 for reading in self.gpm if reading.mig is None and reading.present)


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _kept_logs(name: str) -> Iterator[list[str]]:
    """What logger ``name`` logs meanwhile: kept for the check's output instead of printed."""
    logger = logging.getLogger(name)
    handler, propagate = _Kept(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _timed_sample(source: Any) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    samples = source.sample(with_processes=False)
    return time.perf_counter() - start, samples


def measure(
    nvml: Any = None,
    samples: int = 5,
    *,
    interval_s: float = GPM_INTERVAL_S,
    gap_s: float = TIMED_GAP_S,
) -> Measurement:
    """Time ``NvmlSource.sample(with_processes=False)`` and read GPM as the agent does.

    The first sample, then ``samples`` more: the first of them ``interval_s`` later (its GPM
    values are the ones shown), the others ``gap_s`` apart. Times are per GPU: a sample's time
    divided by the GPU count. ``nvml``: the pynvml module (imported when None) or a stand-in.
    """
    from gpufleet.agent.sources import nvml as nvml_source
    from gpufleet.wire import message_dict

    samples = max(samples, 1)
    with _kept_logs(nvml_source.__name__) as messages:
        source = nvml_source.NvmlSource(nvml, watch_xids=False)
        try:
            first_s, first = _timed_sample(source)
            time.sleep(interval_s)
            later_s, second = _timed_sample(source)
            for _ in range(samples - 1):
                time.sleep(gap_s)
                later_s += _timed_sample(source)[0]
        finally:
            source.close()
    ms_per_gpu = 1000 / max(len(first), 1)
    return Measurement(
        gpus=len(first),
        first_ms=first_s * ms_per_gpu,
        later_ms=later_s * ms_per_gpu / samples,
        later_samples=samples,
        interval_s=interval_s,
        gpm=tuple(reading for sample in second for reading in gpm_readings(message_dict(sample))),
        messages=tuple(messages),
    )


# -- output -------------------------------------------------------------------------------


def show(value: Value | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if unit == "P":
        return f"P{int(value)}"
    if unit == "mask":
        return f"{int(value):#x}"
    number = f"{value:.2f}" if unit == "W" or not float(value).is_integer() else str(int(value))
    return f"{number} {unit}".rstrip()


def summary_line(rows: Sequence[Row]) -> str:
    counts = summary(rows)
    gpus = len({row.gpu for row in rows if row.gpu is not None})
    return f"{gpus} GPUs, {len(rows)} values: " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS)


def _table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *cells]
    ]


def render_table(rows: Sequence[Row]) -> str:
    """field, GPU, agent value, nvidia-smi value, verdict; then the summary line."""
    header = ("field", "gpu", "agent", "nvidia-smi", "verdict")
    cells = [
        (
            row.field,
            "-" if row.gpu is None else str(row.gpu),
            show(row.agent, row.unit),
            show(row.smi, row.unit),
            row.verdict,
        )
        for row in rows
    ]
    lines = _table(header, cells)
    lines.append(summary_line(rows))
    missing = not_reported(rows)
    if missing:
        lines.append("reported by neither, not compared: " + ", ".join(missing))
    return "\n".join(lines)


def render_measurement(measurement: Measurement) -> str:
    """The GPM rows of the check's own samples, then what a sample costs with GPM and without."""
    m = measurement
    lines = [
        f"GPM from the check's own NVML samples, {m.interval_s:g} s apart (informational: "
        "nvidia-smi -q shows no GPM, and the agent's --once sample has none)",
        *_table(("field", "gpu", "agent"), [(r.name, str(r.gpu), r.describe()) for r in m.gpm]),
        f"first sample: {m.first_ms:.3f} ms per GPU (no GPM metrics yet: GPM needs an earlier sample)",
        f"later samples: {m.later_ms:.3f} ms per GPU (mean of {m.later_samples} samples of {m.gpus} GPUs, "
        f"with GPM metrics on {m.gpus_with_gpm})",
    ]
    lines += [f"nvml: {message}" for message in m.messages]
    return "\n".join(lines)


def measurement_dict(measurement: Measurement | None) -> dict[str, Any]:
    """The JSON result's keys for the check's own samples; None values where none were taken."""
    m = measurement
    return {
        "sample_ms_per_gpu": m.later_ms if m else None,
        "first_sample_ms_per_gpu": m.first_ms if m else None,
        "samples_timed": m.later_samples if m else None,
        "gpm_interval_s": m.interval_s if m else None,
        "gpm": [reading.as_dict() for reading in m.gpm] if m else None,
        "nvml_messages": list(m.messages) if m else [],
    }


def result_dict(rows: Sequence[Row], **extra: Any) -> dict[str, Any]:
    return {
        "rows": [
            {
                "field": row.field,
                "gpu": row.gpu,
                "agent": row.agent,
                "nvidia_smi": row.smi,
                "unit": row.unit,
                "live": row.live,
                "verdict": row.verdict,
            }
            for row in rows
        ],
        "summary": summary(rows),
        "not_reported": not_reported(rows),
        **extra,
    }


# -- the live reads -----------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _nvidia_smi(*args: str) -> str:
    """What ``nvidia-smi *args`` prints; NoGpu when it is missing, does not run or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise NoGpu("nvidia-smi not found")
    command = " ".join(["nvidia-smi", *args])
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoGpu(f"{command} did not run ({exc})") from exc
    if done.returncode != 0:  # e.g. "No devices were found", or no driver loaded
        raise NoGpu(f"{command} failed: {_last_line(done.stdout + done.stderr)}")
    return done.stdout


def run_smi() -> str:
    """``nvidia-smi -q -x``; NoGpu when it is missing or finds no GPU."""
    return _nvidia_smi("-q", "-x")


def run_smi_list() -> str:
    """``nvidia-smi -L``: the GPUs and their MIG devices, with profiles and UUIDs."""
    return _nvidia_smi("-L")


def agent_command() -> list[str]:
    """``gpufleet-agent --once`` from this interpreter's environment."""
    script = Path(sys.executable).with_name("gpufleet-agent")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "gpufleet.agent.main"]
    # The node id is not compared; a fixed one spares hosts without /etc/machine-id.
    return [*base, "--once", "--node-id", "gpu-check", "--log-level", "warning"]


def run_agent() -> tuple[str, list[str]]:
    """The agent's JSON and what it logged; CheckError if it fails."""
    try:
        done = subprocess.run(agent_command(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CheckError(f"gpufleet-agent --once did not run ({exc})") from exc
    if done.returncode != 0:
        raise CheckError(f"gpufleet-agent --once failed: {_last_line(done.stderr).removeprefix('error: ')}")
    return done.stdout, [line for line in done.stderr.splitlines() if line.strip()]


# -- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare gpufleet-agent --once with nvidia-smi -q -x on this host's GPUs."
    )
    parser.add_argument("--agent-json", type=Path, help="recorded `gpufleet-agent --once` output to use")
    parser.add_argument("--smi-xml", type=Path, help="recorded `nvidia-smi -q -x` output to use")
    parser.add_argument(
        "--smi-list", type=Path, help="recorded `nvidia-smi -L` output to use (MIG profiles and UUIDs)"
    )
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.add_argument(
        "--save",
        type=Path,
        help="write agent.json, nvidia-smi.xml, nvidia-smi-L.txt and result.json of this check here",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=5,
        help="NVML samples timed after the first one on a live host, with GPM (default: 5)",
    )
    return parser


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CheckError(f"cannot read {path}: {exc.strerror}") from exc


def _run_agent(args: argparse.Namespace) -> tuple[str, list[str]]:
    try:
        return run_agent()
    except CheckError as exc:
        # Against a recorded nvidia-smi document, an agent without NVML means no GPU here.
        if args.smi_xml and "NVML could not start" in str(exc):
            raise NoGpu(str(exc).removeprefix("gpufleet-agent --once failed: ")) from exc
        raise


def _listing(args: argparse.Namespace) -> tuple[str | None, str]:
    """The `nvidia-smi -L` output to use, and a note where there is none."""
    if args.smi_list:
        return _read(args.smi_list), ""
    if args.smi_xml:  # a recorded document: this host's listing would describe other GPUs
        return None, ""
    try:
        return run_smi_list(), ""
    except NoGpu as exc:  # -q -x worked: a listing that fails costs only the MIG profiles and UUIDs
        return None, f"MIG profiles and UUIDs not compared: {exc}"


def _measure(args: argparse.Namespace) -> tuple[Measurement | None, str]:
    """The check's own NVML samples, on a live host; a note where they could not be taken."""
    if args.agent_json:
        return None, ""
    try:
        return measure(samples=args.samples), ""
    except Exception as exc:  # a diagnostic line, not a reason to lose the comparison
        return None, f"no samples of the check's own (GPM, sample times): {exc}"


def _save(
    directory: Path, smi_xml: str, listing: str | None, agent_json: str, result: Mapping[str, Any]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nvidia-smi.xml").write_text(smi_xml)
    if listing is not None:
        (directory / "nvidia-smi-L.txt").write_text(listing)
    (directory / "agent.json").write_text(agent_json)
    (directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def check(args: argparse.Namespace) -> int:
    recorded_agent = _read(args.agent_json) if args.agent_json else None  # a wrong path fails first
    smi_xml = _read(args.smi_xml) if args.smi_xml else run_smi()
    listing, listing_note = _listing(args)
    smi = parse_smi(smi_xml, listing)
    if not args.smi_xml and len(smi) == 1:
        raise NoGpu("nvidia-smi lists no GPU")
    agent_json, messages = (recorded_agent, []) if recorded_agent is not None else _run_agent(args)
    agent_data = load_agent_json(agent_json)
    rows = compare(parse_agent(agent_data), smi)
    measurement, measure_note = _measure(args)
    dropped = int(agent_data.get("invalid_values_dropped", 0))
    notes = [note for note in (listing_note, measure_note) if note]
    result = result_dict(
        rows,
        agent=str(args.agent_json or " ".join(agent_command())),
        nvidia_smi=str(args.smi_xml or "nvidia-smi -q -x"),
        nvidia_smi_list=str(args.smi_list) if args.smi_list else ("nvidia-smi -L" if listing else None),
        **measurement_dict(measurement),
        invalid_values_dropped=dropped,
        agent_messages=messages,
        notes=notes,
    )
    if args.save:
        _save(args.save, smi_xml, listing, agent_json, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_table(rows))
        if measurement is not None:
            print(render_measurement(measurement))
        if dropped:
            print(f"values the agent dropped as implausible: {dropped}")
        for line in (*notes, *(f"agent: {message}" for message in messages)):
            print(line)
    return EXIT_MISMATCH if summary(rows)[MISMATCH] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return check(args)
    except NoGpu as exc:
        line = f"no NVIDIA GPU here: {exc}; nothing to check"
        print(json.dumps({"result": "no GPU", "reason": str(exc)}) if args.json else line)
        return EXIT_NO_GPU
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
