"""The CLI's commands: each asks the collector one thing and renders the answer (table, JSON, CSV)."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from gpufleet import event_kinds as kinds
from gpufleet.allocations import Prices
from gpufleet.cli import output
from gpufleet.cli.client import GIB, FleetClient, gpu_row, node_row, record_detail, record_row
from gpufleet.definitions import IDLE_SM_ACTIVE_RATIO, IDLE_UTILIZATION_PERCENT
from gpufleet.event_kinds import event_row
from gpufleet.v1 import events_pb2, query_pb2

HEALTH_CHOICES = ("healthy", "at_risk", "degraded", "unhealthy", "lost", "unreachable")
NODE_STATE_CHOICES = ("up", "stale", "down")
SORT_CHOICES = ("node", "utilization", "temperature", "power", "memory", "health")

GPU_COLUMNS = [
    ("node", "NODE"),
    ("gpu", "GPU"),
    ("model", "MODEL"),
    ("health", "HEALTH"),
    ("util_pct", "UTIL%"),
    ("mem_gib", "MEM GiB"),
    ("temperature_celsius", "TEMP C"),
    ("power_watts", "POWER W"),
    ("sm_pct", "SM%"),
    ("cluster", "CLUSTER"),
    ("held_by", "HELD BY"),
]
NODE_COLUMNS = [
    ("node", "NODE"),
    ("state", "STATE"),
    ("cluster", "CLUSTER"),
    ("rack", "RACK"),
    ("gpus", "GPUS"),
    ("unhealthy_gpus", "UNHEALTHY"),
    ("driver_version", "DRIVER"),
    ("last_seen", "LAST SEEN"),
]


def _with_table_columns(row: dict[str, Any]) -> dict[str, Any]:
    ratio, used, total = row["utilization_ratio"], row["memory_used_bytes"], row["memory_total_bytes"]
    row = dict(row)
    row["util_pct"] = None if ratio is None else round(ratio * 100)
    row["sm_pct"] = None if row["sm_active_ratio"] is None else round(row["sm_active_ratio"] * 100)
    row["mem_gib"] = None if used is None else f"{used / GIB:.1f}/{(total or 0) / GIB:.0f}"
    return row


def _age(unix_seconds: float) -> str:
    if not unix_seconds:
        return "never"
    seconds = max(datetime.now(timezone.utc).timestamp() - unix_seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def cmd_summary(client: FleetClient, args: argparse.Namespace) -> str:
    s = client.summary()
    if args.output != "table":
        rows = [
            {
                "nodes": s.nodes,
                "gpus": s.gpus,
                "idle_gpus": s.idle_gpus,
                "mean_gpu_utilization_ratio": s.mean_gpu_utilization_ratio
                if s.HasField("mean_gpu_utilization_ratio")
                else None,
                "power_draw_watts": s.power_draw_watts,
                **{f"nodes_{c.key}": c.count for c in s.nodes_by_state},
                **{f"gpus_{c.key}": c.count for c in s.gpus_by_health},
            }
        ]
        return output.render(rows, [], args.output)
    utilization = (
        f"{s.mean_gpu_utilization_ratio * 100:.1f} %" if s.HasField("mean_gpu_utilization_ratio") else "-"
    )
    idle_share = f" ({s.idle_gpus / s.gpus * 100:.1f} % of the fleet)" if s.gpus else ""
    lines = [
        f"Nodes    {s.nodes:>8}   " + ", ".join(f"{c.count} {c.key}" for c in s.nodes_by_state),
        f"GPUs     {s.gpus:>8}   " + ", ".join(f"{c.count} {c.key}" for c in s.gpus_by_health),
        f"Idle     {s.idle_gpus:>8}   GPUs under {IDLE_UTILIZATION_PERCENT} % utilization{idle_share}",
        f"Util     {utilization:>8}   mean over reachable GPUs",
        f"Power    {s.power_draw_watts / 1000:>8.1f}   kW",
        *(
            [f"Tier     {s.coverage.answered:>8}   of {s.coverage.collectors} collectors answered"]
            if s.coverage.collectors > 1
            else []
        ),
        "",
        output.table(
            [{"model": c.key, "gpus": c.count} for c in s.gpus_by_model],
            [("model", "MODEL"), ("gpus", "GPUS")],
        ),
        "",
        output.table(
            [{"cluster": c.key or "(none)", "gpus": c.count} for c in s.gpus_by_cluster],
            [("cluster", "CLUSTER"), ("gpus", "GPUS")],
        ),
    ]
    return "\n".join(lines)


def cmd_nodes(client: FleetClient, args: argparse.Namespace) -> str:
    request = query_pb2.ListNodesRequest(cluster=args.cluster)
    if args.state:
        request.state = query_pb2.NodeState.Value(f"NODE_STATE_{args.state.upper()}")  # type: ignore[assignment]
    rows = [node_row(n) for n in client.nodes(request)]
    for row in rows:
        row["last_seen"] = _age(row["last_seen_unix"])
    return output.render(rows, NODE_COLUMNS, args.output)


def cmd_gpus(client: FleetClient, args: argparse.Namespace) -> str:
    request = query_pb2.ListGpusRequest(
        model=args.model,
        node=args.node,
        cluster=args.cluster,
        idle_only=args.idle,
        sort_by=args.sort,
        namespace=args.namespace,
        pod=args.pod,
        job=args.job,
        user=args.user,
    )
    if args.health:
        request.health = query_pb2.GpuHealth.Value(f"GPU_HEALTH_{args.health.upper()}")  # type: ignore[assignment]
    rows = [gpu_row(g) for g in client.gpus(request)]
    if args.output == "table":
        rows = [_with_table_columns(r) for r in rows]
    return output.render(rows, GPU_COLUMNS, args.output)


def cmd_node(client: FleetClient, args: argparse.Namespace) -> str:
    answer = client.node(args.name)
    rows = [gpu_row(g) for g in answer.gpus]
    node = node_row(answer.node)
    if args.output == "json":
        import json

        return json.dumps({**node, "gpu_list": rows}, indent=2)
    if args.output == "csv":
        return output.render(rows, GPU_COLUMNS, "csv")
    inv = answer.node.inventory
    header = [
        f"Node     {node['node']}  ({node['state']}, last seen {_age(node['last_seen_unix'])})",
        f"Id       {node['node_id']}",
        f"Where    datacenter={inv.datacenter or '-'} cluster={inv.cluster or '-'} rack={inv.rack or '-'}"
        + "".join(f" {k}={v}" for k, v in sorted(inv.labels.items())),
        f"Driver   {inv.driver_version or '-'} (CUDA {inv.cuda_version or '-'}), "
        f"agent {inv.agent_version or '-'}",
        "",
    ]
    table_rows = [_with_table_columns(r) for r in rows]
    body = output.table(
        table_rows, [c for c in GPU_COLUMNS if c[0] not in ("node", "cluster")] + [("uuid", "UUID")]
    )
    problems = [
        f"GPU {r['gpu']}: {r['health']}: {'; '.join(r['reasons'])} -> {r['action']}"
        for r in rows
        if r["reasons"]
    ]
    return "\n".join(header + [body] + (["", *problems] if problems else []))


RMA_COLUMNS = [
    ("serial", "SERIAL"),
    ("uuid", "UUID"),
    ("node", "NODE"),
    ("gpu", "GPU"),
    ("since", "SINCE"),
    ("occurrences", "OCCURRENCES"),
    ("rma_reason", "REASON"),
]


def _when(unix_seconds: float | None) -> str:
    """A time as the event log shows it (UTC, to the second), or "-"."""
    if not unix_seconds:
        return "-"
    return datetime.fromtimestamp(unix_seconds, timezone.utc).isoformat(timespec="seconds")


def cmd_rma(client: FleetClient, args: argparse.Namespace) -> str:
    """The GPUs due for RMA, with the evidence: since when, how many fault occurrences, and why."""
    rows = [record_row(r) for r in client.rma()]
    if args.output != "table":
        return output.render(rows, RMA_COLUMNS, args.output)
    if not rows:
        return "no GPU is due for RMA"
    for row in rows:
        row["since"] = _when(row["rma_since_unix"])
        row["node"] = row["node"] or "(not installed here)"
    return output.render(rows, RMA_COLUMNS, "table")


INSTALL_COLUMNS = [
    ("hostname", "NODE"),
    ("gpu", "GPU"),
    ("first", "FIRST SEEN"),
    ("last", "LAST SEEN"),
    ("node_id", "NODE ID"),
]
OCCURRENCE_COLUMNS = [
    ("time", "TIME"),
    ("node", "NODE"),
    ("boot_id", "BOOT"),
    ("health", "HEALTH"),
    ("reason", "REASON"),
    ("action", "ACTION"),
]
VERDICT_COLUMNS = [("time", "TIME"), ("old", "OLD"), ("new", "NEW"), ("reason", "REASON")]


def cmd_gpu(client: FleetClient, args: argparse.Namespace) -> str:
    """One GPU's reliability record: where it is, whether it is due for RMA, its installs and faults."""
    record = client.gpu_record(args.key)
    detail = record_detail(record)
    if args.output == "json":
        return json.dumps(detail, indent=2)
    if args.output == "csv":
        return output.render([record_row(record)], RMA_COLUMNS, "csv")
    if detail["node"]:
        now = f"node {detail['node']} GPU {detail['gpu']}: {detail['health']}"
        if detail["reasons"]:
            now += f": {'; '.join(detail['reasons'])} -> {detail['action']}"
    else:
        now = "not installed on a node the collector serves"
    rma = (
        f"due since {_when(detail['rma_since_unix'])}: {detail['rma_reason']}"
        if record.rma_due
        else "not due"
    )
    header = [
        f"GPU      {record.serial}  ({record.model or '-'})",
        f"UUID     {record.uuid or '-'}",
        f"Now      {now}",
        f"RMA      {rma}",
        f"Reboots  {record.reboots} (of the nodes it was in, since first seen)",
    ]
    return "\n".join(header + _record_tables(detail))


def _record_tables(detail: dict[str, Any]) -> list[str]:
    """A record's installs, fault occurrences and verdict changes, as tables (times in UTC)."""
    hostnames = {i["node_id"]: i["hostname"] for i in detail["installs"]}
    installs = [
        {**i, "first": _when(i["first_seen_unix"]), "last": _when(i["last_seen_unix"])}
        for i in detail["installs"]
    ]
    occurrences = [
        {**o, "time": _when(o["time_unix"]), "node": hostnames.get(o["node_id"], o["node_id"])}
        for o in detail["occurrences"]
    ]
    verdicts = [{**v, "time": _when(v["time_unix"])} for v in detail["verdict_changes"]]
    return [
        "",
        f"Installs ({len(installs)})",
        output.table(installs, INSTALL_COLUMNS),
        "",
        f"Fault occurrences ({len(occurrences)}, one per boot)",
        output.table(occurrences, OCCURRENCE_COLUMNS),
        "",
        f"Verdict history ({len(verdicts)})",
        output.table(verdicts, VERDICT_COLUMNS),
    ]


EVENT_COLUMNS = [
    ("time", "TIME"),
    ("severity", "SEVERITY"),
    ("node", "NODE"),
    ("gpu", "GPU"),
    ("kind", "KIND"),
    ("reason", "REASON"),
    ("action", "ACTION"),
]
SEVERITY_CHOICES = ("info", "warning", "critical")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: str) -> float | None:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value.strip())
    return float(match.group(1)) * DURATION_UNITS[match.group(2)] if match else None


def parse_duration(value: str) -> float:
    """``30s``, ``10m``, ``2h``, ``3d`` -> seconds."""
    seconds = _seconds(value)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, 2h or 1d, got {value!r}")
    return seconds


def parse_since(value: str) -> int:
    """``30s``, ``10m``, ``2h``, ``3d`` ago, or an ISO 8601 time -> Unix nanoseconds."""
    seconds = _seconds(value)
    if seconds is not None:
        return int((datetime.now(timezone.utc).timestamp() - seconds) * 1e9)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 10m or an ISO time, got {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1e9)


def _event_filter(args: argparse.Namespace) -> query_pb2.EventFilter:
    event_filter = query_pb2.EventFilter(node=args.node, kinds=args.kind or [])
    if args.severity:
        event_filter.min_severity = events_pb2.Severity.Value(f"SEVERITY_{args.severity.upper()}")  # type: ignore[assignment]
    if args.since:
        event_filter.since_unix_nano = args.since
    return event_filter


def _stream_rows(
    rows: Iterator[dict[str, Any]], columns: Sequence[tuple[str, str]], fmt: str
) -> Iterator[str]:
    """Rows as they come: JSON lines, CSV, or a table with fixed column widths."""
    widths = {"time": 25, "severity": 8, "node": 18, "gpu": 3, "kind": 18, "reason": 50}
    if fmt == "table":
        yield "  ".join(heading.ljust(widths.get(key, 0)) for key, heading in columns).rstrip()
    for index, row in enumerate(rows):
        if fmt == "json":
            yield json.dumps(row)
        elif fmt == "csv":
            yield output.csv_lines([row], list(row), header=index == 0)
        else:
            yield "  ".join(
                output.cell(row.get(key)).ljust(widths.get(key, 0)) for key, _ in columns
            ).rstrip()


def cmd_events(client: FleetClient, args: argparse.Namespace) -> str | Iterator[str]:
    event_filter = _event_filter(args)
    if args.follow:
        return _stream_rows((event_row(e) for e in client.follow(event_filter)), EVENT_COLUMNS, args.output)
    rows = [event_row(e) for e in client.events(event_filter, args.limit)]
    return output.render(rows, EVENT_COLUMNS, args.output)


def cmd_forget(client: FleetClient, args: argparse.Namespace) -> str:
    answer = client.forget(args.name)
    return f"forgot node {args.name} ({answer.node_id})"


def cmd_history(client: FleetClient, args: argparse.Namespace) -> str:
    event_filter = query_pb2.EventFilter(node=args.name, kinds=kinds.INVENTORY_KINDS)
    rows = [event_row(e) for e in client.events(event_filter)]
    return output.render(rows, [c for c in EVENT_COLUMNS if c[0] not in ("node", "action")], args.output)


JOB_COLUMNS = [
    ("workload", "JOB/POD"),
    ("source", "SOURCE"),
    ("user", "USER"),
    ("gpus", "GPUS"),
    ("nodes", "NODES"),
    ("sm_pct", "SM%"),
    ("tensor_pct", "TENSOR%"),
    ("idle_gpus", "IDLE"),
    ("since", "SINCE"),
    ("cluster", "CLUSTER"),
]


def _gpus(value: float) -> float | int:
    """GPU counts as integers where they are whole (MIG instances make fractions)."""
    return int(value) if float(value).is_integer() else round(value, 2)


def _percent(view: query_pb2.WorkloadView, field: str) -> int | None:
    return round(getattr(view, field) * 100) if view.HasField(field) else None


def workload_row(view: query_pb2.WorkloadView) -> dict[str, Any]:
    """A workload (or group) as a flat row in base units (the CLI's JSON and CSV)."""
    name = f"job {view.job}" if view.job else (f"{view.namespace}/{view.pod}" if view.pod else "")
    return {
        "workload": name + (f" ({view.job_name})" if view.job_name else ""),
        "cluster": view.cluster,
        "source": view.source,
        "namespace": view.namespace,
        "pod": view.pod,
        "job": view.job,
        "user": view.user,
        "gpus": _gpus(view.gpus),
        "nodes": view.nodes,
        "idle_gpus": _gpus(view.idle_gpus),
        "idle_gpu_hours": round(view.idle_gpu_seconds / 3600, 3),
        "utilization_ratio": view.mean_utilization_ratio if view.HasField("mean_utilization_ratio") else None,
        "sm_active_ratio": view.mean_sm_active_ratio if view.HasField("mean_sm_active_ratio") else None,
        "tensor_active_ratio": view.mean_tensor_active_ratio
        if view.HasField("mean_tensor_active_ratio")
        else None,
        "since_unix": view.since_unix_nano / 1e9,
    }


def cmd_jobs(client: FleetClient, args: argparse.Namespace) -> str:
    answer = client.workloads(query_pb2.ListWorkloadsRequest(group_by="workload", cluster=args.cluster))
    views = sorted(answer.workloads, key=lambda v: (-v.gpus, v.cluster, v.job, v.namespace, v.pod))
    rows = [workload_row(v) for v in views]
    if args.output == "table":
        for row, view in zip(rows, views, strict=True):
            row["sm_pct"] = _percent(view, "mean_sm_active_ratio")
            row["tensor_pct"] = _percent(view, "mean_tensor_active_ratio")
            row["since"] = _age(row["since_unix"])
    return output.render(rows, JOB_COLUMNS, args.output)


def _prices(args: argparse.Namespace, answer: query_pb2.ListWorkloadsResponse) -> Prices:
    """The prices given to this command, or else the collector's."""
    return Prices(dict(args.price) if args.price else {p.model: p.per_gpu_hour for p in answer.prices})


def cmd_idle(client: FleetClient, args: argparse.Namespace) -> str:
    """Allocated GPUs idle for at least --for, by group, the most wasteful first."""
    by = "workload" if args.by == "job" else args.by
    request = query_pb2.ListWorkloadsRequest(
        group_by=by, idle_for_seconds=int(args.idle_for), cluster=args.cluster
    )
    answer = client.workloads(request)
    prices = _prices(args, answer)
    rows = []
    for view in answer.workloads:
        row = workload_row(view)
        group = {"namespace": view.namespace, "user": view.user, "cluster": view.cluster}.get(
            args.by, row["workload"]
        )
        row["group"] = group or "(none)"
        priced = {model: prices.per_hour(model) for model in view.idle_gpu_seconds_by_model}
        if prices and all(price is not None for price in priced.values()):
            row["idle_cost_per_hour"] = round(
                sum(gpus * (priced[model] or 0) for model, gpus in view.idle_gpus_by_model.items()), 2
            )
            row["idle_cost"] = round(
                sum(s / 3600 * (priced[model] or 0) for model, s in view.idle_gpu_seconds_by_model.items()), 2
            )
        else:
            row["idle_cost_per_hour"] = row["idle_cost"] = None
        rows.append(row)
    rows = [row for row in rows if row["idle_gpus"]]
    rows.sort(
        key=lambda r: (-(r["idle_cost_per_hour"] or 0), -r["idle_gpus"], -r["idle_gpu_hours"], r["group"])
    )
    columns = [
        ("group", args.by.upper()),
        ("idle_gpus", "IDLE GPUS"),
        ("gpus", "OF GPUS"),
        ("idle_gpu_hours", "IDLE GPU-H"),
    ]
    if prices:
        columns += [("idle_cost_per_hour", "COST/H"), ("idle_cost", "COST SO FAR")]
    if args.by != "cluster":
        columns.append(("cluster", "CLUSTER"))
    if args.output == "table" and not rows:
        return (
            f"no allocated GPU has been idle for {args.idle_for:g} s or more "
            f"(idle: under {IDLE_UTILIZATION_PERCENT} % utilization or "
            f"{IDLE_SM_ACTIVE_RATIO:.0%} SM activity)"
        )
    return output.render(rows, columns, args.output)
