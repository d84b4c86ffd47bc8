"""What the fleet's numbers mean, shared by the collector (that counts) and the CLI (that says)."""

from __future__ import annotations

# A reachable GPU whose utilization is below this is idle (it is worth nothing then).
IDLE_UTILIZATION_PERCENT = 5
