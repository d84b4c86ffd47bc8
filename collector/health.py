"""A verdict per GPU: healthy, at risk, degraded, unhealthy or lost, with reasons and an action.

Every rule cites its source in docs/health.md (gpu-fleet-facts.md section numbers in the
comments here). A verdict is computed from the GPU's latest sample, the XIDs seen since
the node booted (an XID that needs a reset or reboot keeps its verdict until the node
reboots) and the GPU's window (``GpuWindow``): what a single reading cannot tell, such as
a condition that persists for several reports or an error rate over the last hour. A
fault that comes back after resets and reboots is escalated by ``escalate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.v1 import query_pb2, telemetry_pb2

HEALTHY = query_pb2.GPU_HEALTH_HEALTHY
AT_RISK = query_pb2.GPU_HEALTH_AT_RISK
DEGRADED = query_pb2.GPU_HEALTH_DEGRADED
UNHEALTHY = query_pb2.GPU_HEALTH_UNHEALTHY
LOST = query_pb2.GPU_HEALTH_LOST
UNREACHABLE = query_pb2.GPU_HEALTH_UNREACHABLE

HEALTH_NAMES = {
    HEALTHY: "healthy",
    AT_RISK: "at_risk",
    DEGRADED: "degraded",
    UNHEALTHY: "unhealthy",
    LOST: "lost",
    UNREACHABLE: "unreachable",
}
# Worse verdicts win when several rules apply.
SEVERITY_ORDER = {HEALTHY: 0, AT_RISK: 1, DEGRADED: 2, UNHEALTHY: 3, UNREACHABLE: 4, LOST: 5}
# What an early warning asks for: the GPU still works, so move the work off it without losing any.
DRAIN_AT_CHECKPOINT = "drain at the next checkpoint"


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
    92: XidRule("high single-bit ECC rate", AT_RISK, f"{DRAIN_AT_CHECKPOINT}; run diagnostics"),
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

# A straggler's clock reads a little differently each report (the job's own clock changes), so
# near the threshold it is one in PERSISTENT_REPORTS of the last STRAGGLER_REPORTS reports.
STRAGGLER_REPORTS = 4
# A condition seen in this many reports in a row is a finding; fewer is noise (a brief NVML
# read error, a power excursion that trips a slowdown bit for one interval, a collective
# that waits one interval for a slow peer).
PERSISTENT_REPORTS = 3

# A hung collective (a NCCL all-reduce waiting on a rank that died): one kernel spins, so
# NVML reads ~100 % utilization while the SMs (GPM) are nearly idle and NVLink carries
# nothing. Every rank hangs, so at least two GPUs of the node show it together.
HUNG_UTILIZATION_PERCENT = 95
HUNG_SM_ACTIVE_PPM = 50_000  # 5 % of the interval
HUNG_NVLINK_BYTES_PER_SECOND = 1_000_000_000  # 1 GB/s: a working all-reduce moves far more
HUNG_MEMORY_COPY_PERCENT = 2  # without GPM: a working kernel moves memory
HUNG_POWER_OF_LIMIT = 0.45  # without GPM: a spinning kernel draws little
MIN_HUNG_PEERS = 2

# Error rates over the last hour, in quarter-hour buckets: a rate is sustained when it has
# errors in at least SUSTAINED_QUARTERS of the last four quarters (one burst is not).
QUARTER_NS = 15 * 60 * 10**9
QUARTERS = 4
SUSTAINED_QUARTERS = 3
# Corrected (single-bit) ECC errors in an hour that, sustained, come before HBM failures:
# the rising SBE rate behind XID 92 (facts section 4: rising SBE alone is "watch only").
CE_AT_RISK_PER_HOUR = 50
# NVLink CRC errors in an hour that, sustained, mean a bad link rather than the odd retry.
NVLINK_CRC_PER_HOUR = 100

# The same fault back after two resets or reboots: hardware inspection (gpud's escalation).
RMA_AFTER_OCCURRENCES = 3


class Rate:
    """A cumulative counter's growth per quarter hour, over the last hour.

    Most GPUs' error counters never move: their buckets are made only once one does, and
    dropped again once an hour has passed without growth.
    """

    __slots__ = ("_buckets", "_last", "_quarter")

    def __init__(self) -> None:
        self._last: int | None = None
        self._quarter = 0
        self._buckets: list[int] | None = None

    def add(self, value: int, time_unix_nano: int) -> None:
        last, self._last = self._last, value
        grew = last is not None and value > last
        if grew or self._buckets is not None:
            self._advance(time_unix_nano)
        if grew:
            assert last is not None
            if self._buckets is None:
                self._buckets = [0] * QUARTERS
            self._buckets[-1] += value - last

    def _advance(self, time_unix_nano: int) -> None:
        quarter = time_unix_nano // QUARTER_NS
        if quarter <= self._quarter:
            return
        if self._buckets is not None:
            shift = min(quarter - self._quarter, QUARTERS)
            self._buckets = self._buckets[shift:] + [0] * shift
            if not any(self._buckets):
                self._buckets = None
        self._quarter = quarter

    def sustained(self, per_hour: int) -> bool:
        buckets = self._buckets
        return (
            buckets is not None
            and sum(buckets) >= per_hour
            and sum(1 for count in buckets if count) >= SUSTAINED_QUARTERS
        )

    @property
    def last_hour(self) -> int:
        return sum(self._buckets) if self._buckets is not None else 0


class GpuWindow:
    """What one GPU's rules remember between reports: streaks of conditions and error rates."""

    __slots__ = (
        "ce",
        "hung",
        "hw_slowdown",
        "nvlink_crc",
        "power_brake",
        "read_errors",
        "straggler",
        "thermal",
    )

    def __init__(self) -> None:
        self.read_errors = 0
        self.thermal = 0
        self.hw_slowdown = 0
        self.power_brake = 0
        self.straggler = 0
        self.hung = 0
        self.ce = Rate()
        self.nvlink_crc = Rate()

    def observe(
        self,
        sample: telemetry_pb2.GpuSample,
        time_unix_nano: int,
        *,
        peer_clock_mhz: float | None,
        hung: bool,
    ) -> None:
        """Take in one report's sample; ``hung``: it and enough of its node's GPUs spin in a collective."""
        self.read_errors = (
            self.read_errors + 1 if sample.read_status == telemetry_pb2.GPU_READ_STATUS_ERROR else 0
        )
        reasons = sample.clock_event_reasons
        self.thermal = self.thermal + 1 if reasons & THERMAL_REASONS else 0
        self.hw_slowdown = self.hw_slowdown + 1 if reasons & HW_SLOWDOWN else 0
        self.power_brake = self.power_brake + 1 if reasons & POWER_BRAKE else 0
        # The last STRAGGLER_REPORTS reports, one bit each (1: slow).
        recent = (self.straggler << 1 | is_straggler(sample, peer_clock_mhz)) & ((1 << STRAGGLER_REPORTS) - 1)
        self.straggler = recent
        self.hung = self.hung + 1 if hung else 0
        if sample.HasField("ecc_corrected_aggregate"):
            self.ce.add(sample.ecc_corrected_aggregate, time_unix_nano)
        if sample.HasField("nvlink_crc_flit_errors"):
            self.nvlink_crc.add(sample.nvlink_crc_flit_errors + sample.nvlink_crc_data_errors, time_unix_nano)


def _busy(sample: telemetry_pb2.GpuSample) -> bool:
    return (
        sample.read_status == telemetry_pb2.GPU_READ_STATUS_OK
        and sample.gpu_utilization_percent >= BUSY_UTILIZATION_PERCENT
        and sample.HasField("sm_clock_mhz")
    )


def is_straggler(sample: telemetry_pb2.GpuSample, peer_clock_mhz: float | None) -> bool:
    if not peer_clock_mhz:
        return False
    return _busy(sample) and sample.sm_clock_mhz < STRAGGLER_CLOCK_RATIO * peer_clock_mhz


def looks_hung_alone(sample: telemetry_pb2.GpuSample, power_limit_milliwatts: int) -> bool:
    """Utilization near 100 % with nothing done: GPM's SM activity and NVLink where there is GPM."""
    if sample.read_status != telemetry_pb2.GPU_READ_STATUS_OK:
        return False
    if sample.gpu_utilization_percent < HUNG_UTILIZATION_PERCENT:
        return False
    if sample.HasField("sm_active_ppm"):
        nvlink = sample.nvlink_tx_bytes_per_second + sample.nvlink_rx_bytes_per_second
        return sample.sm_active_ppm < HUNG_SM_ACTIVE_PPM and nvlink < HUNG_NVLINK_BYTES_PER_SECOND
    # No GPM (Ampere and older): a spinning kernel moves no memory and draws little power.
    return (
        sample.memory_copy_utilization_percent <= HUNG_MEMORY_COPY_PERCENT
        and power_limit_milliwatts > 0
        and sample.power_draw_milliwatts < HUNG_POWER_OF_LIMIT * power_limit_milliwatts
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
# A window that has seen nothing: a verdict from the sample and XIDs alone.
NO_WINDOW = GpuWindow()


def judge(
    sample: telemetry_pb2.GpuSample,
    xids_this_boot: dict[int, int],
    window: GpuWindow = NO_WINDOW,
    peer_clock_mhz: float | None = None,
) -> Verdict:
    """The verdict for one GPU from its latest sample, its XID counts since boot and its window."""
    if sample.read_status == telemetry_pb2.GPU_READ_STATUS_LOST:
        return Verdict(LOST, ("GPU lost: NVML reports GPU_IS_LOST (fell off the bus)",), "reboot node")
    findings: list[tuple[query_pb2.GpuHealth, str, str]] = []
    if window.read_errors >= PERSISTENT_REPORTS:
        findings.append(
            (
                DEGRADED,
                f"NVML cannot read the GPU ({window.read_errors} reports in a row): {sample.read_error}",
                "check the driver",
            )
        )
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
        findings.append(
            (AT_RISK, "row remap pending", f"{DRAIN_AT_CHECKPOINT}, then reset the GPU to apply the remap")
        )
    if sample.recovery_action in RECOVERY_ACTIONS:
        health, action = RECOVERY_ACTIONS[sample.recovery_action]
        findings.append((health, f"driver asks for recovery action {sample.recovery_action}", action))
    if window.thermal >= PERSISTENT_REPORTS:
        findings.append((DEGRADED, f"thermal slowdown ({window.thermal} reports in a row)", "check cooling"))
    if window.hw_slowdown >= PERSISTENT_REPORTS:
        findings.append(
            (
                DEGRADED,
                f"hardware slowdown ({window.hw_slowdown} reports in a row)",
                "check cooling and power delivery",
            )
        )
    if window.power_brake >= PERSISTENT_REPORTS:
        findings.append(
            (
                DEGRADED,
                f"power brake slowdown ({window.power_brake} reports in a row)",
                "check power delivery",
            )
        )
    slow_reports = window.straggler.bit_count()
    if slow_reports >= PERSISTENT_REPORTS and window.straggler & 1 and peer_clock_mhz:
        findings.append(
            (
                DEGRADED,
                f"straggler: SM clock {sample.sm_clock_mhz} MHz, busy peers' median {peer_clock_mhz:.0f} MHz,"
                f" {slow_reports} of the last {STRAGGLER_REPORTS} reports",
                "drain the GPU if it slows the job; check cooling and power",
            )
        )
    if window.hung >= PERSISTENT_REPORTS:
        findings.append(
            (
                DEGRADED,
                f"hung collective: ~100 % utilization, SMs and NVLink idle, {window.hung} reports in a row",
                "the job is stuck: dump its stacks and restart it from its checkpoint",
            )
        )
    if window.nvlink_crc.sustained(NVLINK_CRC_PER_HOUR):
        findings.append(
            (
                DEGRADED,
                f"NVLink CRC errors rising: {window.nvlink_crc.last_hour} in the last hour",
                "inspect or reseat the NVLink; reset the GPU if the errors keep rising",
            )
        )
    if window.ce.sustained(CE_AT_RISK_PER_HOUR):
        findings.append(
            (
                AT_RISK,
                f"corrected ECC errors rising: {window.ce.last_hour} in the last hour",
                f"{DRAIN_AT_CHECKPOINT}; run diagnostics",
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


def is_fault(verdict: Verdict) -> bool:
    """A verdict that counts as an occurrence of a fault on the GPU (for escalation)."""
    return verdict.health in (UNHEALTHY, LOST)


def rma_reason(verdict: Verdict, occurrences: int) -> str:
    """Why the GPU is due for RMA, or "" if it is not (yet)."""
    if any(reason.startswith("row remap failure") for reason in verdict.reasons):
        return "row remap failure flag set (NVIDIA's RMA rule, after a field diagnostic)"
    if occurrences >= RMA_AFTER_OCCURRENCES:
        return f"fault came back after {occurrences - 1} resets or reboots ({occurrences} times in 30 days)"
    return ""


def escalate(verdict: Verdict, occurrences: int) -> Verdict:
    """A fault verdict on its ``occurrences``-th boot in the window: the action grows with it (gpud)."""
    if occurrences >= RMA_AFTER_OCCURRENCES:
        return Verdict(
            verdict.health,
            (*verdict.reasons, f"occurrence {occurrences} in 30 days: it returns after resets and reboots"),
            "drain node; hardware inspection and RMA",
        )
    if occurrences == RMA_AFTER_OCCURRENCES - 1:
        return Verdict(
            verdict.health,
            (*verdict.reasons, f"occurrence {occurrences} in 30 days (it came back after a reset or reboot)"),
            f"{verdict.action}; if it happens a third time, replace the GPU",
        )
    return verdict
