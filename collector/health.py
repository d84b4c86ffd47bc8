"""A verdict per GPU: healthy, degraded, unhealthy or lost, with reasons and an action.

Every rule cites gpu-fleet-facts.md (section numbers in the comments). A verdict
is computed from the GPU's latest sample and the XIDs seen since the node booted:
an XID that needs a reset or reboot keeps its verdict until the node reboots.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.v1 import query_pb2, telemetry_pb2

HEALTHY = query_pb2.GPU_HEALTH_HEALTHY
DEGRADED = query_pb2.GPU_HEALTH_DEGRADED
UNHEALTHY = query_pb2.GPU_HEALTH_UNHEALTHY
LOST = query_pb2.GPU_HEALTH_LOST
UNREACHABLE = query_pb2.GPU_HEALTH_UNREACHABLE

HEALTH_NAMES = {
    HEALTHY: "healthy",
    DEGRADED: "degraded",
    UNHEALTHY: "unhealthy",
    LOST: "lost",
    UNREACHABLE: "unreachable",
}
# Worse verdicts win when several rules apply.
SEVERITY_ORDER = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2, UNREACHABLE: 3, LOST: 4}


@dataclass(frozen=True)
class XidRule:
    meaning: str
    health: query_pb2.GpuHealth
    action: str


# Section 3 of the facts file: XID meaning and NVIDIA's immediate action.
# Application faults (13, 31, 43) and informational XIDs (45) leave the GPU healthy.
XID_RULES: dict[int, XidRule] = {
    13: XidRule("graphics engine exception", HEALTHY, "restart the application"),
    31: XidRule("GPU memory page fault", HEALTHY, "restart the application"),
    32: XidRule("corrupted push buffer", DEGRADED, "restart the application; check PCIe"),
    43: XidRule("GPU stopped processing (application)", HEALTHY, "none"),
    45: XidRule("preemptive cleanup", HEALTHY, "none"),
    46: XidRule("GPU stopped processing (driver)", UNHEALTHY, "reset GPU"),
    48: XidRule("double-bit ECC error", UNHEALTHY, "reset GPU"),
    62: XidRule("internal micro-controller halt", UNHEALTHY, "reset GPU"),
    63: XidRule("row remap recorded", DEGRADED, "reset GPU when convenient"),
    64: XidRule("row remap failed", UNHEALTHY, "reset GPU now; repeated: RMA path"),
    74: XidRule("NVLink error", UNHEALTHY, "reset GPU or reboot node"),
    79: XidRule("GPU fell off the bus", UNHEALTHY, "reboot node"),
    92: XidRule("high single-bit ECC rate", DEGRADED, "watch; run diagnostics"),
    94: XidRule(
        "contained uncorrectable ECC", DEGRADED, "restart the application; reset GPU when convenient"
    ),
    95: XidRule("uncontained uncorrectable ECC", UNHEALTHY, "reset GPU"),
    109: XidRule("context-switch timeout", UNHEALTHY, "reset GPU"),
    119: XidRule("GSP timeout", UNHEALTHY, "reset GPU; power-cycle if it persists"),
    120: XidRule("GSP error", UNHEALTHY, "reset GPU; power-cycle if it persists"),
    136: XidRule("NVLink link training failed", UNHEALTHY, "reset GPU"),
    140: XidRule("unrecovered ECC escape", UNHEALTHY, "reset GPU"),
    143: XidRule("GPU initialisation error", UNHEALTHY, "reset GPU"),
    # The recovery action itself arrives as a field and is judged below.
    154: XidRule("recovery action changed", HEALTHY, "follow the driver's recovery action"),
}
UNKNOWN_XID = XidRule("XID not in the catalog", DEGRADED, "look it up in NVIDIA's XID catalog")

# Section 4: NVML recovery action (field 230).
RECOVERY_ACTIONS = {
    1: (UNHEALTHY, "reset GPU"),
    2: (UNHEALTHY, "reboot node"),
    3: (DEGRADED, "drain peer-to-peer traffic"),
    4: (UNHEALTHY, "drain node and reset GPU"),
}

# Section 5: clock event reasons that mean the GPU is being slowed by its environment.
THERMAL_REASONS = 0x020 | 0x040  # SwThermalSlowdown, HwThermalSlowdown
HW_SLOWDOWN = 0x008
POWER_BRAKE = 0x080


@dataclass(frozen=True)
class Verdict:
    health: query_pb2.GpuHealth
    reasons: tuple[str, ...] = ()
    action: str = ""

    @property
    def name(self) -> str:
        return HEALTH_NAMES[self.health]


# A busy GPU whose SM clock is below this share of its busy peers' median is a
# straggler: in a synchronous job it holds every other GPU back (facts section 5).
STRAGGLER_CLOCK_RATIO = 0.85
BUSY_UTILIZATION_PERCENT = 80
MIN_BUSY_PEERS = 3


def _busy(sample: telemetry_pb2.GpuSample) -> bool:
    return (
        sample.read_status == telemetry_pb2.GPU_READ_STATUS_OK
        and sample.gpu_utilization_percent >= BUSY_UTILIZATION_PERCENT
        and sample.HasField("sm_clock_mhz")
    )


def peer_sm_clock_mhz(samples: list[telemetry_pb2.GpuSample]) -> float | None:
    """The median SM clock of a node's busy GPUs (the same job, the same load), if there are enough."""
    clocks = sorted(s.sm_clock_mhz for s in samples if _busy(s))
    if len(clocks) < MIN_BUSY_PEERS:
        return None
    middle = len(clocks) // 2
    return clocks[middle] if len(clocks) % 2 else (clocks[middle - 1] + clocks[middle]) / 2


HEALTHY_VERDICT = Verdict(HEALTHY)
UNREACHABLE_VERDICT = Verdict(UNREACHABLE, ("node stopped reporting",), "check the node and its agent")


def judge(
    sample: telemetry_pb2.GpuSample, xids_this_boot: dict[int, int], peer_clock_mhz: float | None = None
) -> Verdict:
    """The verdict for one GPU from its latest sample, its XID counts since boot and its peers' clocks."""
    if sample.read_status == telemetry_pb2.GPU_READ_STATUS_LOST:
        return Verdict(LOST, ("GPU lost: NVML reports GPU_IS_LOST (fell off the bus)",), "reboot node")
    findings: list[tuple[query_pb2.GpuHealth, str, str]] = []
    if sample.read_status == telemetry_pb2.GPU_READ_STATUS_ERROR:
        findings.append((DEGRADED, f"NVML cannot read the GPU: {sample.read_error}", "check the driver"))
    if sample.row_remap_failure:
        findings.append(
            (UNHEALTHY, "row remap failure flag set", "drain node; RMA path after field diagnostics")
        )
    if sample.ecc_uncorrected_volatile:
        findings.append(
            (
                UNHEALTHY,
                f"{sample.ecc_uncorrected_volatile} double-bit ECC errors since driver load",
                "reset GPU; results of the running job are suspect",
            )
        )
    if sample.row_remap_pending:
        findings.append((DEGRADED, "row remap pending", "reset GPU when drained"))
    if sample.recovery_action in RECOVERY_ACTIONS:
        health, action = RECOVERY_ACTIONS[sample.recovery_action]
        findings.append((health, f"driver asks for recovery action {sample.recovery_action}", action))
    reasons_mask = sample.clock_event_reasons
    if reasons_mask & THERMAL_REASONS:
        findings.append((DEGRADED, "thermal slowdown", "check cooling"))
    if reasons_mask & HW_SLOWDOWN:
        findings.append((DEGRADED, "hardware slowdown", "check cooling and power delivery"))
    if reasons_mask & POWER_BRAKE:
        findings.append((DEGRADED, "power brake slowdown", "check power delivery"))
    if peer_clock_mhz and _busy(sample) and sample.sm_clock_mhz < STRAGGLER_CLOCK_RATIO * peer_clock_mhz:
        findings.append(
            (
                DEGRADED,
                f"straggler: SM clock {sample.sm_clock_mhz} MHz, busy peers' median {peer_clock_mhz:.0f} MHz",
                "check cooling and power; drain if it slows the job",
            )
        )
    for code, count in sorted(xids_this_boot.items()):
        rule = XID_RULES.get(code, UNKNOWN_XID)
        if rule.health != HEALTHY:
            findings.append((rule.health, f"XID {code} ({rule.meaning}) x{count} since boot", rule.action))
    if not findings:
        return HEALTHY_VERDICT
    worst = max(findings, key=lambda finding: SEVERITY_ORDER[finding[0]])
    return Verdict(worst[0], tuple(reason for _, reason, _ in findings), worst[2])
