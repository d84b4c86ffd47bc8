"""Health verdicts from the rules in the facts file."""

from __future__ import annotations

import pytest

from gpufleet.collector import health
from gpufleet.v1 import telemetry_pb2

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
    assert judge(row_remap_pending=True).health == health.DEGRADED
    failure = judge(row_remap_pending=True, row_remap_failure=True)
    assert failure.health == health.UNHEALTHY and "RMA" in failure.action
    assert len(failure.reasons) == 2
    assert judge(ecc_uncorrected_volatile=1).health == health.UNHEALTHY
    assert judge(ecc_corrected_aggregate=500).health == health.HEALTHY  # rising SBE: watch only


def test_thermal_slowdown_degrades() -> None:
    verdict = judge(clock_event_reasons=0x40)
    assert verdict.health == health.DEGRADED and "cooling" in verdict.action


def test_recovery_action_from_the_driver() -> None:
    assert judge(recovery_action=2).action == "reboot node"
    assert judge(recovery_action=0).health == health.HEALTHY
