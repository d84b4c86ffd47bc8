"""An optional on-disk copy of the reports not yet acknowledged, so an agent restart loses none.

One file per report, named by its sequence number, under a folder per boot: the
collector numbers reports per node and boot, so reports of an earlier boot can no
longer be resumed and are discarded (counted) when the agent starts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from google.protobuf.message import DecodeError

from gpufleet.v1 import ingest_pb2

log = logging.getLogger(__name__)

SUFFIX = ".report"


class Spool:
    def __init__(self, directory: Path, node_id: str, boot_id: str) -> None:
        self.root = directory / node_id
        self.directory = self.root / boot_id
        self.directory.mkdir(parents=True, exist_ok=True)

    def discard_other_boots(self) -> int:
        """Remove reports spooled during earlier boots; return how many there were."""
        discarded = 0
        for other in self.root.iterdir():
            if other != self.directory and other.is_dir():
                discarded += sum(1 for _ in other.glob(f"*{SUFFIX}"))
                shutil.rmtree(other, ignore_errors=True)
        if discarded:
            log.warning("discarded %d reports spooled before the node rebooted", discarded)
        return discarded

    def load(self) -> list[ingest_pb2.Report]:
        """The spooled reports, oldest first; unreadable files are removed."""
        reports = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                reports.append(ingest_pb2.Report.FromString(path.read_bytes()))
            except (OSError, DecodeError) as exc:
                log.warning("dropping unreadable spooled report %s: %s", path, exc)
                path.unlink(missing_ok=True)
        return sorted(reports, key=lambda report: report.sequence)

    def _path(self, sequence: int) -> Path:
        return self.directory / f"{sequence:020d}{SUFFIX}"

    def write(self, report: ingest_pb2.Report) -> None:
        path = self._path(report.sequence)
        partial = path.with_suffix(".partial")
        partial.write_bytes(report.SerializeToString())
        partial.replace(path)

    def remove(self, sequence: int) -> None:
        self._path(sequence).unlink(missing_ok=True)

    def renumber(self, reports: list[ingest_pb2.Report], shift: int) -> None:
        """Move spooled files to new sequence numbers (highest first, so none collide)."""
        for report in sorted(reports, key=lambda r: r.sequence, reverse=True):
            old = self._path(report.sequence - shift)
            if old.exists():
                old.replace(self._path(report.sequence))
