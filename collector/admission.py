"""Admission control: a token bucket that tells whoever is over budget when to come back.

When 1,250 agents reconnect at once (a collector restart), the ones over the
budget are told when to come back (RESOURCE_EXHAUSTED with a retry-after-ms
hint), each a slot further in the future, so the herd arrives at the rate the
collector can take instead of stampeding and backing off at random. The same
bucket, one per node, caps the reports per second a node may send.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("admission rate must be positive and burst at least 1")
        self.rate = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._reserved_until = self._updated

    def take(self) -> bool:
        """Take a token if there is one (a budget that is simply spent, no slot reserved)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def admit(self) -> float:
        """0 if the caller may go ahead, else the seconds after which it should try again."""
        if self.take():
            return 0.0
        now = self._clock()
        self._reserved_until = max(self._reserved_until, now) + 1 / self.rate
        return self._reserved_until - now
