"""The agent's report buffer on its own: numbering, caps, renumbering, acknowledgement, spool."""

from __future__ import annotations

from pathlib import Path

from gpufleet.agent.buffer import EVENT_HARD_CAP_FACTOR, ReportBuffer
from gpufleet.agent.sources.sim import SimulatedSource
from gpufleet.agent.spool import Spool
from gpufleet.v1 import ingest_pb2, telemetry_pb2


def report(source: SimulatedSource) -> ingest_pb2.Report:
    return ingest_pb2.Report(gpus=source.sample(with_processes=False))


def test_reports_are_numbered_and_forgotten_once_acknowledged() -> None:
    buffer = ReportBuffer(10, telemetry_pb2.AgentStats())
    source = SimulatedSource("H100", 8, seed=0)
    for _ in range(5):
        buffer.add(report(source))
    assert [r.sequence for r in buffer] == [1, 2, 3, 4, 5]
    buffer.acknowledged(3)
    assert [r.sequence for r in buffer] == [4, 5]
    assert buffer.first_after(4) == (1, list(buffer)[1]) and buffer.count_after(3) == 2
    assert buffer.first_after(5) is None


def test_a_full_buffer_drops_telemetry_before_events() -> None:
    stats = telemetry_pb2.AgentStats()
    buffer = ReportBuffer(4, stats)
    source = SimulatedSource("H100", 8, seed=0)
    buffer.add(report(source))
    source.inject(0, "hbm")
    buffer.add(report(source))  # sequence 2 carries XIDs 48 and 63
    for _ in range(6):
        buffer.add(report(source))
    kept = [r.sequence for r in buffer]
    assert 2 in kept and len(kept) == 4
    assert stats.reports_dropped_total == 4 and stats.event_reports_dropped_total == 0
    buffer.add(report(source), events=True)
    assert next(iter(buffer)).sequence == 2  # events outlive newer telemetry


def test_events_are_dropped_only_past_the_hard_cap() -> None:
    stats = telemetry_pb2.AgentStats()
    buffer = ReportBuffer(2, stats)
    source = SimulatedSource("H100", 8, seed=0)
    for _ in range(2 * EVENT_HARD_CAP_FACTOR + 3):
        buffer.add(report(source), events=True)
    assert len(buffer) == 2 * EVENT_HARD_CAP_FACTOR
    assert stats.event_reports_dropped_total == 3


def test_a_restart_within_the_boot_continues_the_collectors_numbering(tmp_path: Path) -> None:
    """The collector already holds 7 reports of this boot: this process's go on from 8."""
    buffer = ReportBuffer(10, telemetry_pb2.AgentStats())
    source = SimulatedSource("H100", 8, seed=0)
    for _ in range(3):
        buffer.add(report(source))
    buffer.resume_after(7)
    assert [r.sequence for r in buffer] == [8, 9, 10]
    buffer.add(report(source))
    assert [r.sequence for r in buffer][-1] == 11
    buffer.resume_after(9)  # a later reconnect only drops what the collector holds
    assert [r.sequence for r in buffer] == [10, 11]


def test_spooled_reports_survive_and_are_removed_when_acknowledged(tmp_path: Path) -> None:
    source = SimulatedSource("H100", 8, seed=0)
    first = ReportBuffer(10, telemetry_pb2.AgentStats(), Spool(tmp_path, "node", "boot"))
    for _ in range(3):
        first.add(report(source))
    first.acknowledged(1)
    again = ReportBuffer(10, telemetry_pb2.AgentStats(), Spool(tmp_path, "node", "boot"))
    assert [r.sequence for r in again] == [2, 3]
    again.add(report(source))
    assert [r.sequence for r in again][-1] == 4
