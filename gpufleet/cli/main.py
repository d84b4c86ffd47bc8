"""gpufleet: fleet queries for operators (summary, nodes, GPUs, a node, a GPU's record, RMA, events),
a live view, the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import gpufleet
from gpufleet import event_kinds as kinds
from gpufleet.cli import output
from gpufleet.cli.client import CollectorUnavailable, FleetClient
from gpufleet.cli.commands import (
    HEALTH_CHOICES,
    NODE_STATE_CHOICES,
    SEVERITY_CHOICES,
    SORT_CHOICES,
    cmd_events,
    cmd_forget,
    cmd_gpu,
    cmd_gpus,
    cmd_history,
    cmd_idle,
    cmd_jobs,
    cmd_node,
    cmd_nodes,
    cmd_rma,
    cmd_summary,
    parse_duration,
    parse_since,
)
from gpufleet.definitions import IDLE_UTILIZATION_PERCENT
from gpufleet.security import SecuritySettingsError, add_client_security_flags, client_security
from gpufleet.settings import (
    Parser,
    add_flag,
    fail,
    host_port,
    positive_float,
    positive_int,
    price_pair,
    unknown_variables,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpufleet", description="Ask a gpufleet collector about the GPU fleet.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {gpufleet.__version__}")
    connection = Parser(add_help=False)
    add_flag(
        connection,
        "--collector",
        default="127.0.0.1:50051",
        type=host_port,
        help="collector gRPC address HOST:PORT",
    )
    add_flag(
        connection, "--timeout", type=positive_float, default=10.0, help="seconds to wait for each answer"
    )
    add_client_security_flags(connection)
    common = Parser(add_help=False, parents=[connection])
    add_flag(common, "--output", "-o", default="table", choices=output.FORMATS, help="output format")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("summary", parents=[common], help="the fleet at a glance")
    p.set_defaults(run=cmd_summary)

    p = commands.add_parser("nodes", parents=[common], help="list nodes")
    p.add_argument("--cluster", default="", help="only this cluster")
    p.add_argument("--state", choices=NODE_STATE_CHOICES, help="only nodes in this state")
    p.set_defaults(run=cmd_nodes)

    p = commands.add_parser("gpus", parents=[common], help="list GPUs")
    p.add_argument("--model", default="", help="model name contains this (e.g. H100)")
    p.add_argument("--node", default="", help="only this node (name or id)")
    p.add_argument("--cluster", default="", help="only this cluster")
    p.add_argument("--health", choices=HEALTH_CHOICES, help="only GPUs in this health state")
    p.add_argument(
        "--idle",
        action="store_true",
        help=f"only idle GPUs (under {IDLE_UTILIZATION_PERCENT} %% utilization)",
    )
    p.add_argument(
        "--sort",
        default="node",
        choices=SORT_CHOICES + tuple(f"-{c}" for c in SORT_CHOICES),
        help="sort key; prefix with - for descending",
    )
    for holder in ("namespace", "pod", "job", "user"):
        p.add_argument(f"--{holder}", default="", help=f"only GPUs held by this {holder}")
    p.set_defaults(run=cmd_gpus)

    p = commands.add_parser("jobs", parents=[common], help="who holds GPUs: Kubernetes pods and Slurm jobs")
    p.add_argument("--cluster", default="", help="only this cluster")
    p.set_defaults(run=cmd_jobs)

    p = commands.add_parser(
        "idle",
        parents=[common],
        help="allocated GPUs that sit idle, by team, job or user, the costliest first",
    )
    p.add_argument(
        "--for",
        dest="idle_for",
        type=parse_duration,
        default=0.0,
        metavar="DURATION",
        help="only GPUs idle at least this long: 30m, 2h, 1d (default: idle now)",
    )
    p.add_argument(
        "--by", default="namespace", choices=("namespace", "job", "user", "cluster"), help="group by"
    )
    p.add_argument("--cluster", default="", help="only this cluster")
    p.add_argument(
        "--price",
        action="append",
        type=price_pair,
        default=[],
        metavar="MODEL=PRICE",
        help="price per GPU-hour (repeatable, e.g. H100=2.50; default: the collector's --price)",
    )
    p.set_defaults(run=cmd_idle)

    p = commands.add_parser("node", parents=[common], help="one node in detail")
    p.add_argument("name", help="node name or id")
    p.set_defaults(run=cmd_node)

    p = commands.add_parser(
        "gpu", parents=[common], help="one GPU's reliability record: installs, faults, verdicts, RMA"
    )
    p.add_argument("key", metavar="SERIAL|UUID", help="the GPU's serial or UUID")
    p.set_defaults(run=cmd_gpu)

    p = commands.add_parser("rma", parents=[common], help="GPUs due for RMA, with the evidence")
    p.set_defaults(run=cmd_rma)

    p = commands.add_parser(
        "events", parents=[common], help="the fleet's event log (--follow: as it happens)"
    )
    p.add_argument("--node", default="", help="only this node (name or id)")
    p.add_argument("--severity", choices=SEVERITY_CHOICES, help="only events at least this severe")
    p.add_argument("--since", type=parse_since, help="only events since then: 10m, 2h, 3d or an ISO time")
    p.add_argument("--kind", action="append", choices=kinds.ALL_KINDS, help="only this kind (repeatable)")
    p.add_argument("--limit", type=int, default=1000, help="at most this many, the newest (max 1000)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing events as they happen")
    p.set_defaults(run=cmd_events)

    p = commands.add_parser(
        "top", parents=[connection], help="a live view of the fleet in the terminal (q quits)"
    )
    add_flag(p, "--refresh", type=positive_float, default=2.0, help="seconds between refreshes")
    add_flag(p, "--once", action="store_true", help="print one frame as plain text and exit")
    add_flag(p, "--rows", type=positive_int, default=20, help="with --once: GPUs to print")
    p.set_defaults(run=cmd_top)

    p = commands.add_parser(
        "history", parents=[common], help="a node's inventory history (GPU and driver changes)"
    )
    p.add_argument("name", help="node name or id")
    p.set_defaults(run=cmd_history)

    p = commands.add_parser(
        "forget", parents=[common], help="forget a decommissioned node (needs an admin token)"
    )
    p.add_argument("name", help="node name or id")
    p.set_defaults(run=cmd_forget)

    p = commands.add_parser("certs", help="create a development CA and certificates for mutual TLS")
    p.add_argument("directory", type=Path, help="where to write the PEM files")
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="DNS name of the collector (repeatable; default: localhost)",
    )
    p.add_argument(
        "--server-ip",
        action="append",
        default=[],
        help="IP address of the collector (repeatable; default: 127.0.0.1)",
    )
    p.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="issue an agent certificate whose identity is this node id (repeatable)",
    )
    p.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="issue a client certificate, e.g. for the CLI (repeatable)",
    )
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.set_defaults(run=None)

    p = commands.add_parser("token", help="add a scoped token to a collector's tokens file")
    p.add_argument("scope", choices=("agent", "read", "admin"), help="what the token may do")
    p.add_argument("name", help="who holds it (shown in logs, never the secret)")
    p.add_argument(
        "--tokens-file", type=Path, required=True, help="the collector's tokens file (appended to)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="write the secret here, for the holder's --token-file"
    )
    p.set_defaults(run=None)

    p = commands.add_parser("demo", help="run a collector and a simulated 10,000-GPU fleet on this machine")
    p.add_argument("--nodes", type=int, default=1250, help="simulated nodes (8 GPUs each)")
    p.add_argument("--interval", type=float, default=10.0, help="report interval in seconds")
    p.add_argument("--grpc-port", type=int, default=50051, help="collector gRPC port (0: any free port)")
    p.add_argument("--http-port", type=int, default=9490, help="collector HTTP port (0: any free port)")
    p.set_defaults(run=None)
    return parser


def cmd_top(client: FleetClient, args: argparse.Namespace) -> str | list[str]:
    """`gpufleet top`, imported when asked for (Textual takes a while to load)."""
    from gpufleet.cli import top

    return top.cmd_top(client, args)


def sort_value_attached(argv: list[str]) -> list[str]:
    """``--sort -temperature`` as ``--sort=-temperature``: argparse takes a value led by '-' for a flag."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1] == "--sort" and token.startswith("-") and token[1:] in SORT_CHOICES:
            joined[-1] = f"--sort={token}"
        else:
            joined.append(token)
    return joined


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sort_value_attached(sys.argv[1:] if argv is None else list(argv)))
    for warning in unknown_variables(parser):
        print(f"warning: {warning}", file=sys.stderr)
    if args.command == "demo":
        from gpufleet.cli.demo import run_demo

        sys.exit(run_demo(args.nodes, args.interval, args.grpc_port, args.http_port))
    if args.command in ("certs", "token"):
        from gpufleet.cli import certs

        try:
            print(certs.run(args))
        except OSError as exc:
            fail(f"{exc.filename or ''}: {exc.strerror or exc}")
        except ValueError as exc:
            fail(str(exc))
        return
    try:
        security = client_security(args)
    except SecuritySettingsError as exc:
        fail(str(exc))
    try:
        with FleetClient(args.collector, args.timeout, security) as client:
            result = args.run(client, args)
            for line in [result] if isinstance(result, str) else result:
                print(line, flush=True)
            if warning := client.partial():
                print(f"warning: {warning}", file=sys.stderr)
    except CollectorUnavailable as exc:
        fail(str(exc), code=1)
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
