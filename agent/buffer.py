"""The agent's report buffer: numbering, caps, the spool and renumbering, with no network in it.

Reports are numbered per node and boot (1, 2, 3, ...) and kept, in order, until the collector
acknowledges them. When the buffer is full the oldest report that carries only telemetry is
dropped first; reports that carry events (XIDs, lost GPUs, inventory changes) are dropped only
past EVENT_HARD_CAP_FACTOR times the cap. Every drop is counted in the node's AgentStats. With a
spool, every report is on disk too, so an agent restart loses none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from gpufleet.agent.spool import Spool
from gpufleet.v1 import ingest_pb2, telemetry_pb2

log = logging.getLogger(__name__)

# Reports that carry events may fill this many times the buffer's size.
EVENT_HARD_CAP_FACTOR = 4


@dataclass
class Pending:
    report: ingest_pb2.Report
    carries_events: bool


def carries_events(report: ingest_pb2.Report) -> bool:
    """Reports an operator must not lose: XIDs, lost GPUs, inventory and allocation changes."""
    return (
        report.HasField("inventory")
        or report.HasField("allocations")
        or any(gpu.xid_events or gpu.read_status == telemetry_pb2.GPU_READ_STATUS_LOST for gpu in report.gpus)
    )


class ReportBuffer:
    """Unacknowledged reports of one node, oldest first."""

    def __init__(self, max_reports: int, stats: telemetry_pb2.AgentStats, spool: Spool | None = None) -> None:
        self._pending: list[Pending] = []
        self._max = max_reports
        self._stats = stats
        self._spool = spool
        self._next_sequence = 1
        self._renumbered = False
        if spool is not None:
            stats.reports_dropped_total += spool.discard_other_boots()
            self._pending = [Pending(report, carries_events(report)) for report in spool.load()]
            if self._pending:
                self._next_sequence = self._pending[-1].report.sequence + 1
                log.info("resuming %d spooled reports", len(self._pending))
        # Reports numbered by this process start here (spooled ones keep their numbers).
        self._first_new_sequence = self._next_sequence

    def __len__(self) -> int:
        return len(self._pending)

    def __iter__(self) -> Iterator[ingest_pb2.Report]:
        return (pending.report for pending in self._pending)

    def add(self, report: ingest_pb2.Report, *, events: bool = False) -> None:
        """Number ``report`` and keep it (``events``: it must not be lost, whatever it holds)."""
        report.sequence = self._next_sequence
        self._next_sequence += 1
        self._pending.append(Pending(report, events or carries_events(report)))
        if self._spool is not None:
            self._spool.write(report)
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        while len(self._pending) > self._max:
            victim = next((i for i, p in enumerate(self._pending) if not p.carries_events), None)
            if victim is None:
                if len(self._pending) <= self._max * EVENT_HARD_CAP_FACTOR:
                    return
                victim = 0
                self._stats.event_reports_dropped_total += 1
            dropped = self._pending.pop(victim)
            self._stats.reports_dropped_total += 1
            if self._spool is not None:
                self._spool.remove(dropped.report.sequence)

    def resume_after(self, last_acked: int) -> None:
        """The collector's first answer: what it holds. If it holds more than this process numbered
        from (the agent restarted within the same boot), continue its numbering, so that fresh
        reports are not taken as duplicates; then drop what it holds."""
        if not self._renumbered and last_acked >= self._first_new_sequence:
            shift = last_acked + 1 - self._first_new_sequence
            renumbered = [p.report for p in self._pending if p.report.sequence >= self._first_new_sequence]
            for report in renumbered:
                report.sequence += shift
            if self._spool is not None:
                self._spool.renumber(renumbered, shift)
            self._next_sequence += shift
            self._first_new_sequence += shift
        self._renumbered = True
        self.acknowledged(last_acked)

    def acknowledged(self, sequence: int) -> None:
        """The collector holds everything up to ``sequence``: forget it."""
        keep = 0
        while keep < len(self._pending) and self._pending[keep].report.sequence <= sequence:
            if self._spool is not None:
                self._spool.remove(self._pending[keep].report.sequence)
            keep += 1
        if keep:
            del self._pending[:keep]

    def first_after(self, sequence: int) -> tuple[int, ingest_pb2.Report] | None:
        """The first report numbered after ``sequence``, and how many come before it."""
        for position, pending in enumerate(self._pending):
            if pending.report.sequence > sequence:
                return position, pending.report
        return None

    def count_after(self, sequence: int) -> int:
        return sum(1 for pending in self._pending if pending.report.sequence > sequence)
