"""CPU seconds and memory of a process, from /proc (Linux)."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process, all its threads (those ended too)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_bytes(pid: int) -> dict[str, int]:
    """Resident set size now (rss) and at its peak (hwm)."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values["rss" if key == "VmRSS" else "hwm"] = int(rest.split()[0]) * 1024
    return values


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` fall (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(math.ceil(fraction * len(ordered)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def open_fds(pid: int) -> int:
    """Open file descriptors of the process (its /proc/PID/fd entries)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (other work shares it)."""
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "?"
