"""A reliability record per GPU serial: its installs, faults and verdicts, and whether it is due for RMA.

A GPU's serial outlives its node, its slot and the collector: a GPU moved to another node
brings its history along, and a fault that returns after resets and reboots is counted as
the same GPU's. A fault *occurrence* is one boot of the node in which the GPU went
unhealthy or lost (a reboot, or a reset, ends it); the escalation rule in health.py reads
how many occurrences fell in the last RECURRENCE_WINDOW_NS. The store keeps every record
(``to_json``/``from_json``) and reads them back at start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpufleet.collector.health import Verdict

# A record keeps this many installs, occurrences and verdict changes (the newest).
INSTALLS_KEPT = 16
OCCURRENCES_KEPT = 32
VERDICTS_KEPT = 32
# Occurrences older than this no longer count towards escalation (gpud counts recurrences
# across reboots; a window keeps a fault of two years ago from sending a GPU back).
RECURRENCE_WINDOW_NS = 30 * 86_400 * 10**9


@dataclass(slots=True)
class Install:
    """A slot the GPU was seen in."""

    node_id: str
    hostname: str
    gpu_index: int
    first_seen_unix_nano: int
    last_seen_unix_nano: int


@dataclass(slots=True)
class Occurrence:
    """One boot in which the GPU went unhealthy or lost."""

    time_unix_nano: int
    node_id: str
    boot_id: str
    health: str
    reason: str
    action: str


@dataclass(slots=True)
class VerdictChange:
    time_unix_nano: int
    old: str
    new: str
    reason: str


@dataclass(slots=True)
class SerialRecord:
    serial: str
    uuid: str = ""
    model: str = ""
    # Oldest first, the newest kept (plain lists: a deque costs 600 bytes even empty, and there
    # is a record for every GPU of the fleet).
    installs: list[Install] = field(default_factory=list)
    occurrences: list[Occurrence] = field(default_factory=list)
    verdicts: list[VerdictChange] = field(default_factory=list)
    # Boots (reboots and resets) of the nodes it was installed in, since it was first seen.
    reboots: int = 0
    rma_due: bool = False
    rma_reason: str = ""
    rma_since_unix_nano: int = 0
    # Bumped on every change, so the store rewrites the record only then.
    version: int = 0

    @property
    def installed(self) -> Install | None:
        return self.installs[-1] if self.installs else None

    def recent_occurrences(self, now_unix_nano: int) -> int:
        return sum(1 for o in self.occurrences if now_unix_nano - o.time_unix_nano < RECURRENCE_WINDOW_NS)

    def to_json(self) -> str:
        return json.dumps(
            {
                "serial": self.serial,
                "uuid": self.uuid,
                "model": self.model,
                "installs": [_fields(i) for i in self.installs],
                "occurrences": [_fields(o) for o in self.occurrences],
                "verdicts": [_fields(v) for v in self.verdicts],
                "reboots": self.reboots,
                "rma_due": self.rma_due,
                "rma_reason": self.rma_reason,
                "rma_since_unix_nano": self.rma_since_unix_nano,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> SerialRecord:
        data = json.loads(text)
        record = cls(
            serial=data["serial"],
            uuid=data.get("uuid", ""),
            model=data.get("model", ""),
            reboots=data.get("reboots", 0),
            rma_due=data.get("rma_due", False),
            rma_reason=data.get("rma_reason", ""),
            rma_since_unix_nano=data.get("rma_since_unix_nano", 0),
        )
        record.installs = [Install(**i) for i in data.get("installs", ())][-INSTALLS_KEPT:]
        record.occurrences = [Occurrence(**o) for o in data.get("occurrences", ())][-OCCURRENCES_KEPT:]
        record.verdicts = [VerdictChange(**v) for v in data.get("verdicts", ())][-VERDICTS_KEPT:]
        return record


def _keep(items: list[Any], item: Any, kept: int) -> None:
    """Append, dropping the oldest beyond ``kept``."""
    items.append(item)
    if len(items) > kept:
        del items[0]


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


class Reliability:
    """Every GPU serial the collector has seen, by serial and by UUID."""

    def __init__(self) -> None:
        self._by_serial: dict[str, SerialRecord] = {}
        self._serial_by_uuid: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._by_serial)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_serial.values())

    def find(self, key: str) -> SerialRecord | None:
        """A record by serial or by UUID."""
        record = self._by_serial.get(key)
        if record is None and key in self._serial_by_uuid:
            record = self._by_serial.get(self._serial_by_uuid[key])
        return record

    def due_for_rma(self) -> list[SerialRecord]:
        return sorted((r for r in self._by_serial.values() if r.rma_due), key=lambda r: r.rma_since_unix_nano)

    def restore(self, record: SerialRecord) -> None:
        self._by_serial[record.serial] = record
        if record.uuid:
            self._serial_by_uuid[record.uuid] = record.serial

    def record(self, serial: str) -> SerialRecord:
        record = self._by_serial.get(serial)
        if record is None:
            record = self._by_serial[serial] = SerialRecord(serial)
        return record

    def seen(
        self,
        serial: str,
        uuid: str,
        model: str,
        node_id: str,
        hostname: str,
        gpu_index: int,
        now_unix_nano: int,
    ) -> SerialRecord:
        """The GPU is in this slot now (a new slot is a new install)."""
        record = self.record(serial)
        if uuid and record.uuid != uuid:
            record.uuid = uuid
            self._serial_by_uuid[uuid] = serial
            record.version += 1
        if model and record.model != model:
            record.model = model
            record.version += 1
        here = record.installed
        if here is not None and (here.node_id, here.gpu_index) == (node_id, gpu_index):
            here.last_seen_unix_nano = now_unix_nano
            here.hostname = hostname
        else:
            install = Install(node_id, hostname, gpu_index, now_unix_nano, now_unix_nano)
            _keep(record.installs, install, INSTALLS_KEPT)
            record.version += 1
        return record

    def rebooted(self, record: SerialRecord) -> None:
        record.reboots += 1
        record.version += 1

    def occurrence(
        self, record: SerialRecord, node_id: str, boot_id: str, now_unix_nano: int, verdict: Verdict
    ) -> int:
        """The GPU went unhealthy or lost in this boot; its occurrences in the window (this one too)."""
        if not any(o.node_id == node_id and o.boot_id == boot_id for o in reversed(record.occurrences)):
            reason = verdict.reasons[0] if verdict.reasons else ""
            occurrence = Occurrence(now_unix_nano, node_id, boot_id, verdict.name, reason, verdict.action)
            _keep(record.occurrences, occurrence, OCCURRENCES_KEPT)
            record.version += 1
        return record.recent_occurrences(now_unix_nano)

    def verdict_changed(
        self, record: SerialRecord, now_unix_nano: int, before: Verdict, after: Verdict
    ) -> None:
        reason = "; ".join(after.reasons)
        _keep(record.verdicts, VerdictChange(now_unix_nano, before.name, after.name, reason), VERDICTS_KEPT)
        record.version += 1

    def flag_rma(self, record: SerialRecord, now_unix_nano: int, reason: str) -> bool:
        """Mark the GPU due for RMA; True if it was not before."""
        if record.rma_due:
            return False
        record.rma_due = True
        record.rma_reason = reason
        record.rma_since_unix_nano = now_unix_nano
        record.version += 1
        return True
