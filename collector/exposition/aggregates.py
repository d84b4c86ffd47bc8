"""The fleet aggregates (`gpufleet_fleet_*`), rendered from the fleet's running totals."""

from __future__ import annotations

from gpufleet.collector.exposition.catalog import (
    FLEET_GPUS,
    FLEET_IDLE,
    FLEET_NODES,
    FLEET_POWER,
    FLEET_RMA_DUE,
    FLEET_UTILIZATION,
)
from gpufleet.collector.exposition.textformat import escape_label_value, format_value
from gpufleet.collector.totals import FleetTotals


def _line(name: str, labels: str, value: float | int) -> str:
    return f"{name}{{{labels}}} {format_value(value)}\n"


def render_aggregates(totals: FleetTotals) -> str:
    """The fleet aggregates, from the fleet's running totals."""
    out = [FLEET_GPUS.header()]
    for (cluster, model, state), count in totals.rows("gpus"):
        out.append(_line(FLEET_GPUS.name, _cluster_model(cluster, model) + f',health="{state}"', count))
    out.append(FLEET_NODES.header())
    for (cluster, state), count in totals.rows("nodes"):
        out.append(_line(FLEET_NODES.name, f'cluster="{escape_label_value(cluster)}",state="{state}"', count))
    measured = totals.rows("util_n")
    out.append(FLEET_UTILIZATION.header())
    for (cluster, model), count in measured:
        mean = totals.get("util", cluster, model) / 100 / count
        out.append(_line(FLEET_UTILIZATION.name, _cluster_model(cluster, model), mean))
    out.append(FLEET_IDLE.header())
    for (cluster, model), _ in measured:
        out.append(_line(FLEET_IDLE.name, _cluster_model(cluster, model), totals.get("idle", cluster, model)))
    out.append(FLEET_POWER.header())
    for (cluster,), _ in totals.rows("power_n"):
        watts = totals.get("power", cluster) / 1000
        out.append(_line(FLEET_POWER.name, f'cluster="{escape_label_value(cluster)}"', watts))
    out.append(FLEET_RMA_DUE.header())
    for (cluster, model), count in totals.rows("rma"):
        out.append(_line(FLEET_RMA_DUE.name, _cluster_model(cluster, model), count))
    return "".join(out)


def _cluster_model(cluster: str, model: str) -> str:
    return f'cluster="{escape_label_value(cluster)}",model="{escape_label_value(model)}"'
