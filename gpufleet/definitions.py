"""What the fleet's numbers mean, shared by the collector (that counts) and the CLI (that says)."""

from __future__ import annotations

# A reachable GPU whose utilization is below this is idle (it is worth nothing then).
IDLE_UTILIZATION_PERCENT = 5
# A reachable GPU whose SM activity (NVML GPM) is below this is idle too, however high its
# utilization: a hung job keeps a kernel resident (100 % "utilization") with its SMs doing nothing.
IDLE_SM_ACTIVE_RATIO = 0.05
IDLE_SM_ACTIVE_PPM = round(IDLE_SM_ACTIVE_RATIO * 1_000_000)
