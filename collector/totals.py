"""The fleet's totals, kept as running sums while nodes change: one source for every reader.

Each node contributes integers (GPUs by cluster, model and health; nodes by cluster and state;
utilization, idle GPUs and power of its reachable GPUs); the totals add a node's new share and
subtract its old one, so nothing walks the fleet to answer. The exposition computes each node's
share while it renders the node and hands it here; /metrics/fleet and GetFleetSummary (and any
later view) read the same numbers, by the same rules.

A GPU counts towards utilization, idle and power only when it is reachable: its node is up, it is
in the node's inventory, and its latest read succeeded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from gpufleet.definitions import IDLE_UTILIZATION_PERCENT

# ("gpus", cluster, model, health) -> GPUs, ("nodes", cluster, state) -> 1,
# ("util", cluster, model) -> percent summed, ("util_n", cluster, model) -> GPUs in that sum,
# ("idle", cluster, model) -> GPUs, ("power", cluster) -> milliwatts, ("power_n", cluster) -> GPUs.
Contribution = dict[tuple[str, ...], int]


class ModelShare:
    """What a node's GPUs of one model add up to, while the node is rendered (slots: it is hot)."""

    __slots__ = ("healths", "idle", "measured", "milliwatts", "powered", "utilization_percent")

    def __init__(self) -> None:
        self.healths: dict[str, int] = {}
        self.utilization_percent = 0
        self.measured = 0
        self.idle = 0
        self.milliwatts = 0
        self.powered = 0

    def reachable(self, utilization_percent: int | None, milliwatts: int | None) -> None:
        if utilization_percent is not None:
            self.utilization_percent += utilization_percent
            self.measured += 1
            self.idle += utilization_percent < IDLE_UTILIZATION_PERCENT
        if milliwatts is not None:
            self.milliwatts += milliwatts
            self.powered += 1


def contribution(cluster: str, state: str, by_model: dict[str, ModelShare]) -> Contribution:
    share: Contribution = {("nodes", cluster, state): 1}
    for model, part in by_model.items():
        for health, count in part.healths.items():
            share[("gpus", cluster, model, health)] = count
        if part.measured:
            share[("util", cluster, model)] = part.utilization_percent
            share[("util_n", cluster, model)] = part.measured
            share[("idle", cluster, model)] = part.idle
        if part.powered:
            for key, value in ((("power", cluster), part.milliwatts), (("power_n", cluster), part.powered)):
                share[key] = share.get(key, 0) + value
    return share


@dataclass(frozen=True)
class FleetSummary:
    nodes_by_state: Counter[str]
    gpus_by_health: Counter[str]
    gpus_by_model: Counter[str]
    gpus_by_cluster: Counter[str]
    idle_gpus: int
    # Mean over the reachable GPUs that report utilization (None: none does).
    mean_utilization_ratio: float | None
    power_watts: float
    # How many GPUs the mean is over (to weigh it with other collectors' in a tier).
    measured_gpus: int = 0

    @property
    def gpus(self) -> int:
        return sum(self.gpus_by_health.values())

    @property
    def nodes(self) -> int:
        return sum(self.nodes_by_state.values())


class FleetTotals:
    def __init__(self) -> None:
        self.totals: Contribution = {}

    def replace(self, old: Contribution, new: Contribution) -> bool:
        """A node's share changed from ``old`` to ``new`` (either may be empty); True if it did."""
        if old == new:
            return False
        self._account(old, -1)
        self._account(new, 1)
        return True

    def _account(self, share: Contribution, sign: int) -> None:
        totals = self.totals
        for key, value in share.items():
            total = totals.get(key, 0) + sign * value
            if total:
                totals[key] = total
            else:
                totals.pop(key, None)

    def rows(self, kind: str) -> list[tuple[tuple[str, ...], int]]:
        """The totals of one kind ("gpus", "nodes", "util_n", ...), sorted by their labels."""
        return sorted((key[1:], value) for key, value in self.totals.items() if key[0] == kind)

    def get(self, *key: str) -> int:
        return self.totals.get(key, 0)

    def summary(self) -> FleetSummary:
        by_state: Counter[str] = Counter()
        by_health: Counter[str] = Counter()
        by_model: Counter[str] = Counter()
        by_cluster: Counter[str] = Counter()
        utilization = measured = idle = milliwatts = 0
        for key, value in self.totals.items():
            kind = key[0]
            if kind == "gpus":
                _, cluster, model, health = key
                by_health[health] += value
                by_model[model] += value
                by_cluster[cluster] += value
            elif kind == "nodes":
                by_state[key[2]] += value
            elif kind == "util":
                utilization += value
            elif kind == "util_n":
                measured += value
            elif kind == "idle":
                idle += value
            elif kind == "power":
                milliwatts += value
        return FleetSummary(
            nodes_by_state=by_state,
            gpus_by_health=by_health,
            gpus_by_model=by_model,
            gpus_by_cluster=by_cluster,
            idle_gpus=idle,
            mean_utilization_ratio=utilization / 100 / measured if measured else None,
            power_watts=milliwatts / 1000,
            measured_gpus=measured,
        )
