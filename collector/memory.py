"""The collector's long-lived objects and Python's garbage collector.

At 100,000 GPUs the collector holds 1-2 million objects that live for the whole run; with the
default thresholds a full collection walks all of them and stops the process for 0.4-0.7 s
(docs/benchmarks.md). So, once a second, whatever survived is collected and then frozen
(`gc.freeze()`: left out of later collections): each collection walks only what is new since,
and nothing unreachable is ever frozen, since a collection comes first. Frozen objects that die
are still freed at once by reference counting; only a reference cycle among frozen objects
would outlive its use, so every FULL_COLLECTION_S the freeze is lifted for one full collection.
Every collection's pause is measured (`gpufleet_collector_gc_pause_seconds`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram

# How often everything is collected, frozen objects included (cycles among them are freed then).
FULL_COLLECTION_S = 600.0


class LongLivedObjects:
    def __init__(self, pauses: Histogram, clock: Callable[[], float] = time.monotonic) -> None:
        self._pauses = pauses
        self._clock = clock
        self._last_full = clock()
        self._started_at: float | None = None
        self._generation_names = {generation: str(generation) for generation in range(3)}
        gc.callbacks.append(self._timed)

    def _timed(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        # Taken first: observing allocates, which may start (and time) a collection of its own.
        started, self._started_at = self._started_at, None
        if started is not None:
            self._pauses.labels(self._generation_names[info.get("generation", 0)]).observe(
                time.perf_counter() - started
            )

    def settle(self) -> None:
        """Collect what is new, then freeze what survived (once a second, and after the restore)."""
        now = self._clock()
        if now - self._last_full >= FULL_COLLECTION_S:
            self._last_full = now
            gc.unfreeze()
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)
