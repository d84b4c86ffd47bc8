"""How simulated GPUs fail: causes, rates and the telemetry each fault leaves behind.

Rates are the Llama 3 405B run's (gpu-fleet-facts.md section 2: 419 interruptions
in 884,736 H100 GPU-days), restricted to causes a GPU's own telemetry shows. The
mapping from cause to XIDs and counters follows the same file's suggested mapping
and its XID table (section 3). A multiplier compresses time for tests and demos.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Failures per 1,000 GPU-days, by cause (facts section 2).
LLAMA3_RATES: dict[str, float] = {
    "fell_off_bus": 0.167 * 0.4,  # faulty GPU: XID 79, the GPU vanishes
    "gsp": 0.167 * 0.2 + 0.019,  # faulty GPU and GSP: XID 119/120
    "microcontroller": 0.167 * 0.2,  # faulty GPU: XID 62
    "nvlink": 0.167 * 0.2,  # faulty GPU incl. NVLink: XID 74, NVLink errors rise
    "hbm": 0.081,  # XID 48, then XID 63 (remap) or XID 64 (remap failed)
    "sram": 0.021,  # XID 48 with an uncontained error (XID 95)
    "application": 0.061,  # software bug: XID 13/31/43, the GPU stays healthy
    "thermal": 0.007,  # thermal interface: HW thermal slowdown
}
# "Bad cluster" (facts section 2): about 0.8 failures per 1,000 GPU-days instead of 0.47.
PRESETS: dict[str, float] = {"none": 0.0, "healthy": 1.0, "bad-cluster": 0.8 / 0.474}
# "hbm" is either of the last two, at random; they can also be injected on purpose.
FAULT_KINDS = (*LLAMA3_RATES, "hbm_remapped", "hbm_remap_failed")

SECONDS_PER_DAY = 86_400
# Of HBM faults, the share whose row remap fails (an approximation: the facts file gives none).
HBM_REMAP_FAILURE_SHARE = 0.3


@dataclass
class FaultState:
    """What faults have done to one GPU so far (kept until the simulated node restarts)."""

    lost: bool = False
    thermal: bool = False
    dbe_volatile: int = 0
    dbe_aggregate: int = 0
    remapped_uncorrectable: int = 0
    remap_pending: bool = False
    remap_failure: bool = False
    nvlink_errors: int = 0
    # What a scenario (scenario.py) does beyond the faults above.
    ce_volatile: int = 0
    ce_aggregate: int = 0
    remapped_correctable: int = 0
    remap_pending_correctable: bool = False  # a remap after corrected errors: no reset asked for yet
    clock_factor: float = 1.0  # a sagging SM clock
    read_errors: int = 0  # the next this many reads fail
    reasons_once: int = 0  # clock event bits for the next sample only

    def add_corrected(self, count: int) -> None:
        self.ce_volatile += count
        self.ce_aggregate += count

    def after_reboot(self) -> FaultState:
        """What survives a reboot: the lifetime counters and flags; the GPU is back on the bus."""
        return FaultState(
            dbe_aggregate=self.dbe_aggregate,
            remapped_uncorrectable=self.remapped_uncorrectable,
            remap_failure=self.remap_failure,
            ce_aggregate=self.ce_aggregate,
            remapped_correctable=self.remapped_correctable,
        )

    def apply(self, kind: str, rng: random.Random) -> list[int]:
        """Take a fault; return the XIDs it raises."""
        if kind == "fell_off_bus":
            self.lost = True
            return [79]
        if kind == "gsp":
            return [rng.choice((119, 120))]
        if kind == "microcontroller":
            return [62]
        if kind == "nvlink":
            self.nvlink_errors += rng.randint(10, 500)
            return [74]
        if kind == "application":
            return [rng.choice((13, 31, 43))]
        if kind == "thermal":
            self.thermal = True
            return []
        self.dbe_volatile += 1
        self.dbe_aggregate += 1
        if kind == "sram":
            return [48, 95]
        if kind == "hbm_remap_failed" or (kind == "hbm" and rng.random() < HBM_REMAP_FAILURE_SHARE):
            self.remap_failure = True
            return [48, 64]
        self.remapped_uncorrectable += 1
        self.remap_pending = True
        return [48, 63]


class FaultModel:
    """Draws faults per GPU per sample from per-GPU-day rates."""

    def __init__(self, preset: str = "none", multiplier: float = 1.0, seed: int = 0) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown fault preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if multiplier < 0:
            raise ValueError("the fault rate multiplier cannot be negative")
        scale = PRESETS[preset] * multiplier
        self._per_gpu_second = {
            kind: rate * scale / 1000 / SECONDS_PER_DAY for kind, rate in LLAMA3_RATES.items()
        }
        self.enabled = scale > 0
        self.rng = random.Random(seed)

    def draw(self, interval_s: float) -> list[str]:
        """The faults one GPU suffers during one interval (usually none)."""
        if not self.enabled:
            return []
        return [kind for kind, rate in self._per_gpu_second.items() if self.rng.random() < rate * interval_s]
