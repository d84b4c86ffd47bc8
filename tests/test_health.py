"""Health verdicts from the rules in the facts file."""

from __future__ import annotations

import pytest

from gpufleet import wire
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.collector import health
from gpufleet.collector.eventlog import EventMatch
from gpufleet.collector.state import FleetState
from gpufleet.v1 import ingest_pb2, telemetry_pb2
from tests.fleet import inventory_for

OK = telemetry_pb2.GPU_READ_STATUS_OK


def judge(xids: dict[int, int] | None = None, **fields: object) -> health.Verdict:
    return health.judge(telemetry_pb2.GpuSample(read_status=OK, **fields), xids or {})  # type: ignore[arg-type]


def test_a_quiet_gpu_is_healthy() -> None:
    assert judge(gpu_utilization_percent=99, clock_event_reasons=0x1) == health.HEALTHY_VERDICT


@pytest.mark.parametrize("code", [13, 31, 43, 45])
def test_application_xids_leave_the_gpu_healthy(code: int) -> None:
    assert judge({code: 3}).health == health.HEALTHY


@pytest.mark.parametrize(
    ("code", "action"),
    [(48, "reset GPU"), (79, "reboot node"), (64, "RMA"), (119, "reset GPU"), (74, "reset GPU")],
)
def test_hardware_xids_make_it_unhealthy_with_an_action(code: int, action: str) -> None:
    verdict = judge({code: 1})
    assert verdict.health == health.UNHEALTHY
    assert action in verdict.action
    assert f"XID {code}" in verdict.reasons[0]


def test_lost_gpu() -> None:
    verdict = health.judge(telemetry_pb2.GpuSample(read_status=telemetry_pb2.GPU_READ_STATUS_LOST), {})
    assert verdict.health == health.LOST and verdict.action == "reboot node"


def test_memory_rules() -> None:
    pending = judge(row_remap_pending=True)
    assert pending.health == health.AT_RISK and "next checkpoint" in pending.action
    failure = judge(row_remap_pending=True, row_remap_failure=True)
    assert failure.health == health.UNHEALTHY and "RMA" in failure.action
    assert len(failure.reasons) == 2
    assert judge(ecc_uncorrected_volatile=1).health == health.UNHEALTHY
    assert judge(ecc_corrected_aggregate=500).health == health.HEALTHY  # rising SBE: watch only


def observed(samples: list[telemetry_pb2.GpuSample], minutes_apart: float = 1.0) -> health.GpuWindow:
    """A window that has seen these samples, one every ``minutes_apart`` minutes."""
    window = health.GpuWindow()
    for i, sample in enumerate(samples):
        at = int(i * minutes_apart * 60e9) + 10**18
        # As if every GPU of its node read the same (a collective spins on all of them).
        window.observe(sample, at, peer_clock_mhz=None, hung=health.looks_hung_alone(sample, 700_000))
    return window


def test_thermal_slowdown_degrades_once_it_lasts() -> None:
    hot = telemetry_pb2.GpuSample(read_status=OK, clock_event_reasons=0x40)
    for seen in range(1, health.PERSISTENT_REPORTS + 1):
        verdict = health.judge(hot, {}, observed([hot] * seen))
        assert (verdict.health == health.DEGRADED) == (seen == health.PERSISTENT_REPORTS), seen
    assert "cooling" in verdict.action
    # One cool report in between starts the count again.
    cool = telemetry_pb2.GpuSample(read_status=OK)
    assert health.judge(hot, {}, observed([hot, hot, cool, hot, hot])) == health.HEALTHY_VERDICT


def test_brief_read_errors_are_noise_lasting_ones_degrade() -> None:
    error = telemetry_pb2.GpuSample(
        read_status=telemetry_pb2.GPU_READ_STATUS_ERROR, read_error="Unknown Error"
    )
    assert health.judge(error, {}, observed([error, error])) == health.HEALTHY_VERDICT
    assert health.judge(error, {}, observed([error] * 3)).health == health.DEGRADED


def hung(**fields: object) -> telemetry_pb2.GpuSample:
    spin = {"gpu_utilization_percent": 100, "sm_active_ppm": 10_000, "nvlink_tx_bytes_per_second": 1000}
    return telemetry_pb2.GpuSample(read_status=OK, **{**spin, **fields})  # type: ignore[arg-type]


def test_a_hung_collective_needs_several_reports() -> None:
    sample = hung()
    assert health.judge(sample, {}, observed([sample] * 2)) == health.HEALTHY_VERDICT
    verdict = health.judge(sample, {}, observed([sample] * 3))
    assert verdict.health == health.DEGRADED and "hung collective" in verdict.reasons[0]
    assert "restart it from its checkpoint" in verdict.action
    # A busy GPU (SMs active) is not hung.
    assert health.judge(sample, {}, observed([hung(sm_active_ppm=800_000)] * 3)) == health.HEALTHY_VERDICT


def test_a_hung_collective_needs_several_gpus_of_the_node() -> None:
    state = FleetState()
    source = SimulatedSource("H100", 8, node_index=2, workload="training")
    node = state.hello(
        ingest_pb2.Hello(protocol_version=wire.PROTOCOL_VERSION, inventory=inventory_for(source, 2))
    )

    def reports(count: int) -> None:
        for _ in range(count):
            gpus = source.sample(with_processes=False)
            state.apply_report(node, ingest_pb2.Report(sequence=node.last_sequence + 1, gpus=gpus))

    source.override_behaviour(0, "stuck")  # one GPU spinning alone: not a collective
    reports(health.PERSISTENT_REPORTS + 2)
    assert node.gpus[0].verdict == health.HEALTHY_VERDICT
    source.override_behaviour(1, "stuck")  # two ranks of one collective
    reports(health.PERSISTENT_REPORTS)
    assert {i for i, gpu in node.gpus.items() if "hung collective" in " ".join(gpu.verdict.reasons)} == {0, 1}


def test_a_sustained_corrected_ecc_rate_is_at_risk_a_burst_is_not() -> None:
    def counts(values: list[int]) -> list[telemetry_pb2.GpuSample]:
        return [telemetry_pb2.GpuSample(read_status=OK, ecc_corrected_aggregate=v) for v in values]

    rising = counts([i * 2 for i in range(60)])  # 2 a minute for an hour
    verdict = health.judge(rising[-1], {}, observed(rising))
    assert verdict.health == health.AT_RISK and "corrected ECC errors rising" in verdict.reasons[0]
    assert "drain at the next checkpoint" in verdict.action
    burst = counts([0] * 30 + [500] * 30)  # one burst of 500
    assert health.judge(burst[-1], {}, observed(burst)) == health.HEALTHY_VERDICT
    trickle = counts([i // 20 for i in range(60)])  # 3 an hour
    assert health.judge(trickle[-1], {}, observed(trickle)) == health.HEALTHY_VERDICT


def test_xid_92_is_an_early_warning() -> None:
    verdict = judge({92: 1})
    assert verdict.health == health.AT_RISK and "next checkpoint" in verdict.action


def test_a_fault_that_keeps_coming_back_escalates_to_rma() -> None:
    fault = judge({79: 1})
    assert health.escalate(fault, 1) == fault
    assert "if it happens a third time, replace the GPU" in health.escalate(fault, 2).action
    third = health.escalate(fault, health.RMA_AFTER_OCCURRENCES)
    assert third.health == health.UNHEALTHY and "RMA" in third.action
    assert health.rma_reason(third, 3).startswith("fault came back after 2 resets or reboots")
    assert health.rma_reason(fault, 1) == ""
    assert "row remap failure" in health.rma_reason(judge(row_remap_failure=True), 1)


def test_recovery_action_from_the_driver() -> None:
    assert judge(recovery_action=2).action == "reboot node"
    assert judge(recovery_action=0).health == health.HEALTHY


def test_verdicts_and_rates_follow_the_samples_own_time() -> None:
    """A report resent after an outage is judged, and its verdict logged, as of when it was sampled."""
    state = FleetState()
    source = SimulatedSource("H100", 8, node_index=1)
    node = state.hello(
        ingest_pb2.Hello(protocol_version=wire.PROTOCOL_VERSION, inventory=inventory_for(source, 1))
    )
    sampled = 1_700_000_000 * 10**9  # long before now
    source.inject(2, "gsp")
    report = ingest_pb2.Report(sequence=1, time_unix_nano=sampled, gpus=source.sample(with_processes=False))
    state.apply_report(node, report)
    (changed,) = state.events.query(EventMatch(kinds=frozenset({"health_changed"})), limit=10)
    assert changed.time_unix_nano == sampled and changed.gpu_index == 2
    record = node.gpus[2].serial_record
    assert record is not None and record.occurrences[0].time_unix_nano == sampled
