"""Who holds a GPU: the limits on what an agent may say about it, shared by agent and collector.

An allocation's values come from outside gpufleet (pod names, Slurm job names, user names),
so both ends hold them to the same limits: a value longer than MAX_VALUE_CHARS is cut, a node
with more than MAX_ALLOCATIONS_PER_NODE allocations keeps the first ones, and each cut or drop
is counted. The agent does it so that honest nodes never hit the collector's check; the
collector does it again because an agent may be hostile.
"""

from __future__ import annotations

from gpufleet.v1 import allocation_pb2

# Kubernetes names are at most 253 characters (a DNS subdomain); Slurm's are shorter.
MAX_VALUE_CHARS = 253
# Eight GPUs of seven MIG instances, each shared by a few workloads, fit many times over.
MAX_ALLOCATIONS_PER_NODE = 256
MAX_SOURCES = 8
TRUNCATED_MARK = "…"

# The string fields of an Allocation, in wire order.
VALUE_FIELDS = ("source", "namespace", "pod", "container", "job", "user", "account", "partition", "job_name")


def _cut(value: str) -> str:
    return value[: MAX_VALUE_CHARS - len(TRUNCATED_MARK)] + TRUNCATED_MARK


def bound(allocations: allocation_pb2.Allocations) -> int:
    """Hold ``allocations`` to the limits, in place; return how many values were cut or dropped."""
    cut = 0
    extra = len(allocations.allocations) - MAX_ALLOCATIONS_PER_NODE
    if extra > 0:
        del allocations.allocations[MAX_ALLOCATIONS_PER_NODE:]
        cut += extra
    extra = len(allocations.sources) - MAX_SOURCES
    if extra > 0:
        del allocations.sources[MAX_SOURCES:]
        cut += extra
    for allocation in allocations.allocations:
        for name in VALUE_FIELDS:
            value = getattr(allocation, name)
            if len(value) > MAX_VALUE_CHARS:
                setattr(allocation, name, _cut(value))
                cut += 1
    for source in allocations.sources:
        for name in ("name", "error"):
            value = getattr(source, name)
            if len(value) > MAX_VALUE_CHARS:
                setattr(source, name, _cut(value))
                cut += 1
    return cut


class Prices:
    """A price per GPU-hour per model, from ``--price MODEL=PRICE`` (case-insensitive substring;
    the longest matching key wins, so "H100 NVL=3" beats "H100=2.5" for an H100 NVL)."""

    def __init__(self, prices: dict[str, float] | None = None) -> None:
        self._prices = sorted(
            ((key.lower(), price) for key, price in (prices or {}).items()), key=lambda kv: -len(kv[0])
        )
        self._cache: dict[str, float | None] = {}

    def __bool__(self) -> bool:
        return bool(self._prices)

    def items(self) -> list[tuple[str, float]]:
        return list(self._prices)

    def per_hour(self, model: str) -> float | None:
        if model not in self._cache:
            name = model.lower()
            self._cache[model] = next((price for key, price in self._prices if key in name), None)
        return self._cache[model]
