"""gpufleet-collector: the central service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gpufleet
from gpufleet.collector.auth import BasicAuth, ServerSecurity, Tokens, TokensFileError
from gpufleet.collector.http import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER
from gpufleet.collector.ingest import IngestPolicy
from gpufleet.collector.limits import Limits
from gpufleet.collector.mqtt import MqttConfig
from gpufleet.collector.service import Collector, CollectorConfig
from gpufleet.collector.state import Liveness
from gpufleet.collector.store import StoreBusy
from gpufleet.collector.store_postgres import DatabaseRefused, is_postgres_url
from gpufleet.collector.tier import DEFAULT_LEASE_S
from gpufleet.collector.workers import supervise
from gpufleet.settings import (
    Parser,
    add_flag,
    add_log_level,
    fail,
    host_port,
    non_negative_int,
    parse_host_port,
    pem_file,
    positive_float,
    positive_int,
    price_pair,
    readable_file,
    setup_logging,
    warn_unknown_variables,
)
from gpufleet.signals import stop_on_signals

log = logging.getLogger("gpufleet.collector")


def advertised_address(value: str) -> str:
    """--advertise: HOST:PORT, or empty for this host's address."""
    return host_port(value) if value else ""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpufleet-collector",
        description="Collect GPU telemetry from gpufleet agents; serve Prometheus metrics and fleet queries.",
    )
    add_flag(
        parser,
        "--grpc-listen",
        default="0.0.0.0:50051",
        type=parse_host_port,
        help="where agents and the CLI connect (HOST:PORT)",
    )
    add_flag(
        parser,
        "--http-listen",
        default="0.0.0.0:9490",
        type=parse_host_port,
        help="where Prometheus scrapes /metrics (HOST:PORT)",
    )
    add_flag(
        parser,
        "--stale-after-intervals",
        type=positive_float,
        default=3.0,
        help="a node is stale after this many missed report intervals",
    )
    add_flag(
        parser,
        "--down-after-intervals",
        type=positive_float,
        default=10.0,
        help="a node is down after this many missed report intervals",
    )
    add_flag(
        parser,
        "--db",
        default="gpufleet-collector.db",
        help="where the fleet's inventory, watermarks and event log are kept: a SQLite file, a "
        "postgresql://USER:PASSWORD@HOST:PORT/DB URL, or 'none' (memory only)",
    )
    add_flag(
        parser,
        "--admission-rate",
        type=positive_float,
        default=500.0,
        help="new agent streams accepted per second before agents are told when to retry",
    )
    add_flag(
        parser, "--admission-burst", type=positive_int, default=500, help="new agent streams accepted at once"
    )
    security = parser.add_argument_group("security (docs/security.md)")
    add_flag(
        security,
        "--tls-cert",
        default="",
        type=pem_file,
        help="serve gRPC and HTTP with TLS: certificate (PEM)",
    )
    add_flag(security, "--tls-key", default="", type=pem_file, help="the certificate's private key (PEM)")
    add_flag(
        security,
        "--tls-client-ca",
        default="",
        type=pem_file,
        help="require gRPC clients to present a certificate signed by this CA (mutual TLS)",
    )
    add_flag(
        security,
        "--bind-node-id-to-cert",
        action="store_true",
        help="with --tls-client-ca: an agent may only report under its certificate's identity",
    )
    add_flag(
        security,
        "--tokens-file",
        default="",
        type=readable_file,
        help="require scoped bearer tokens (lines of 'SCOPE NAME SECRET'; scopes agent, read, admin)",
    )
    add_flag(
        security,
        "--metrics-auth",
        default="none",
        choices=("none", "token", "basic"),
        help="protect /metrics with a read token (from --tokens-file) or basic auth",
    )
    add_flag(
        security,
        "--metrics-basic-auth-file",
        default="",
        type=readable_file,
        help="'user:password' lines for --metrics-auth basic",
    )
    add_flag(
        parser,
        "--price",
        action="append",
        type=price_pair,
        default=[],
        help="MODEL=PRICE per GPU-hour (repeatable, e.g. H100=2.50): count what allocated and idle "
        "GPUs cost (docs/attribution.md); MODEL matches part of the GPU's name",
    )
    tier = parser.add_argument_group("a tier of collectors on one PostgreSQL --db (docs/operations.md)")
    add_flag(
        tier,
        "--collector-id",
        default="",
        help="this collector's name, on its own metrics and in the tier (default: HOST:GRPC_PORT in a "
        "tier; none for a collector on its own)",
    )
    add_flag(
        tier,
        "--advertise",
        default="",
        type=advertised_address,
        help="the HOST:PORT agents give for this collector in --collector (default: this host's address "
        "and the gRPC port); nodes nobody serves go to the collector their agents would prefer",
    )
    add_flag(
        tier,
        "--workers",
        type=positive_int,
        default=1,
        help="run this many collector processes on this host, members of one tier (needs a PostgreSQL "
        "--db): the same gRPC port, HTTP on --http-listen's port + 0 .. N-1",
    )
    add_flag(
        tier,
        "--lease-seconds",
        type=positive_float,
        default=DEFAULT_LEASE_S,
        help="how long a collector's nodes stay its own without renewal: after a crash, others take "
        "them over within this time",
    )
    limits = parser.add_argument_group("limits on what agents send")
    defaults = Limits()
    add_flag(
        limits,
        "--max-gpus-per-node",
        type=positive_int,
        default=defaults.max_gpus_per_node,
        help="GPUs a node may report",
    )
    add_flag(
        limits,
        "--max-labels-per-node",
        type=non_negative_int,
        default=defaults.max_labels_per_node,
        help="operator labels a node may carry",
    )
    add_flag(
        limits,
        "--reports-per-second",
        type=positive_float,
        default=defaults.reports_per_second,
        help="sustained reports per second per node (bursts of --report-burst allowed)",
    )
    add_flag(
        limits,
        "--report-burst",
        type=positive_int,
        default=defaults.report_burst,
        help="reports a node may send at once",
    )
    add_flag(
        limits,
        "--max-streams",
        type=positive_int,
        default=defaults.max_streams,
        help="agent streams open at once",
    )
    add_flag(
        limits,
        "--hello-timeout",
        type=positive_float,
        default=defaults.hello_timeout_s,
        help="seconds a new stream has to say hello",
    )
    add_flag(
        limits,
        "--max-nodes",
        type=positive_int,
        default=defaults.max_nodes,
        help="nodes the collector keeps in all; new ones beyond are refused",
    )
    add_flag(
        limits,
        "--registrations-per-peer-per-second",
        type=positive_float,
        default=defaults.registrations_per_peer_per_second,
        help="new nodes one address (or token) may register per second",
    )
    add_flag(
        limits,
        "--registration-burst-per-peer",
        type=positive_int,
        default=defaults.registration_burst_per_peer,
        help="new nodes one address (or token) may register at once",
    )
    add_flag(
        limits,
        "--max-streams-per-peer",
        type=positive_int,
        default=defaults.max_streams_per_peer,
        help="agent streams one address (or token) may hold open",
    )
    add_flag(
        limits,
        "--events-per-node-per-second",
        type=positive_float,
        default=defaults.events_per_node_per_second,
        help="XID and health events a node may add to the event log per second (beyond: summarised)",
    )
    add_flag(
        limits,
        "--event-burst-per-node",
        type=positive_int,
        default=defaults.event_burst_per_node,
        help="XID and health events a node may add to the event log at once",
    )
    add_flag(
        limits,
        "--http-max-connections",
        type=positive_int,
        default=MAX_CONNECTIONS,
        help="HTTP connections at once (the longest idle one is closed to make room)",
    )
    add_flag(
        limits,
        "--http-max-connections-per-peer",
        type=positive_int,
        default=MAX_CONNECTIONS_PER_PEER,
        help="HTTP connections at once from one address",
    )
    mqtt = parser.add_argument_group("MQTT events (off unless --mqtt-broker is set)")
    add_flag(
        mqtt,
        "--mqtt-broker",
        default="",
        type=broker_address,
        help="publish events to this broker: HOST:PORT, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)",
    )
    add_flag(mqtt, "--mqtt-username", default="", help="broker user name")
    add_flag(
        mqtt, "--mqtt-password-file", default="", type=readable_file, help="file holding the broker password"
    )
    add_flag(mqtt, "--mqtt-tls", action="store_true", help="connect to the broker with TLS")
    add_flag(
        mqtt, "--mqtt-ca-file", default="", type=pem_file, help="CA certificate(s) to verify the broker with"
    )
    add_flag(mqtt, "--mqtt-topic-prefix", default="gpufleet/v1", help="first levels of every topic")
    add_flag(
        mqtt,
        "--mqtt-queue-limit",
        type=positive_int,
        default=100_000,
        help="events kept while the broker is away (oldest dropped first)",
    )
    add_log_level(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {gpufleet.__version__}")
    return parser


async def serve(config: CollectorConfig) -> None:
    collector = Collector(config)
    try:
        await collector.start()
    except (OSError, StoreBusy, DatabaseRefused) as exc:
        fail(str(exc))
    stopping = asyncio.Event()
    stop_on_signals(stopping, "shutting down")
    await stopping.wait()
    await collector.stop()


def server_security(args: argparse.Namespace) -> ServerSecurity:
    if bool(args.tls_cert) != bool(args.tls_key):
        fail("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        fail("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    if args.bind_node_id_to_cert and not args.tls_client_ca:
        fail("--bind-node-id-to-cert needs --tls-client-ca (the identity comes from the client certificate)")
    try:
        tokens = Tokens.from_file(Path(args.tokens_file)) if args.tokens_file else None
        basic = BasicAuth(Path(args.metrics_basic_auth_file)) if args.metrics_auth == "basic" else None
    except TokensFileError as exc:
        fail(str(exc))
    if args.metrics_auth == "token" and tokens is None:
        fail("--metrics-auth token needs --tokens-file")
    return ServerSecurity(
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
        tokens=tokens,
        metrics_token=args.metrics_auth == "token",
        metrics_basic_auth=basic,
    )


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False


MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def broker_address(value: str) -> BrokerAddress | None:
    """``HOST:PORT``, ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``; '' means no broker."""
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep:
        return BrokerAddress(*parse_host_port(value))
    if scheme.lower() not in MQTT_PORTS or not rest or "/" in rest.rstrip("/"):
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT, mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {value!r}"
        )
    rest = rest.rstrip("/")
    default_port = MQTT_PORTS[scheme.lower()]
    has_port = rest.rsplit(":", 1)[-1].isdigit() and not rest.endswith("]")
    host, port = parse_host_port(rest if has_port else f"{rest}:{default_port}")
    return BrokerAddress(host, port, tls=scheme.lower() == "mqtts")


def mqtt_config(args: argparse.Namespace) -> MqttConfig | None:
    broker: BrokerAddress | None = args.mqtt_broker
    if broker is None:
        return None
    password = Path(args.mqtt_password_file).read_text().strip() if args.mqtt_password_file else None
    return MqttConfig(
        host=broker.host,
        port=broker.port,
        username=args.mqtt_username or None,
        password=password,
        tls=args.mqtt_tls or broker.tls,
        ca_file=Path(args.mqtt_ca_file) if args.mqtt_ca_file else None,
        topic_prefix=args.mqtt_topic_prefix,
        queue_limit=args.mqtt_queue_limit,
    )


def raise_open_files_limit() -> None:
    """Take the open-files limit up to its hard ceiling: every agent stream is a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info("open-files limit: %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    warn_unknown_variables(parser)
    if not args.stale_after_intervals < args.down_after_intervals:
        fail("need --stale-after-intervals < --down-after-intervals")
    (grpc_host, grpc_port), (http_host, http_port) = args.grpc_listen, args.http_listen
    if args.workers > 1:
        if not is_postgres_url(args.db):
            fail("--workers needs a PostgreSQL --db (postgresql://...): the workers share the fleet there")
        if grpc_port == 0 or http_port == 0:
            fail("--workers needs fixed ports in --grpc-listen and --http-listen (not 0)")
        argv = list(sys.argv[1:] if argv is None else argv)
        raise SystemExit(supervise(argv, args.workers, args.collector_id, (http_host, http_port), grpc_port))
    config = CollectorConfig(
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        http_host=http_host,
        http_port=http_port,
        liveness=Liveness(args.stale_after_intervals, args.down_after_intervals),
        db_path=None if args.db.lower() in ("", "none") or is_postgres_url(args.db) else Path(args.db),
        db_url=args.db if is_postgres_url(args.db) else "",
        ingest=IngestPolicy(
            limits=Limits(
                max_gpus_per_node=args.max_gpus_per_node,
                max_labels_per_node=args.max_labels_per_node,
                reports_per_second=args.reports_per_second,
                report_burst=args.report_burst,
                max_streams=args.max_streams,
                hello_timeout_s=args.hello_timeout,
                max_nodes=args.max_nodes,
                registrations_per_peer_per_second=args.registrations_per_peer_per_second,
                registration_burst_per_peer=args.registration_burst_per_peer,
                max_streams_per_peer=args.max_streams_per_peer,
                events_per_node_per_second=args.events_per_node_per_second,
                event_burst_per_node=args.event_burst_per_node,
            ),
            admission_rate_per_s=args.admission_rate,
            admission_burst=args.admission_burst,
            bind_node_id_to_certificate=args.bind_node_id_to_cert,
        ),
        mqtt=mqtt_config(args),
        security=server_security(args),
        http_max_connections=args.http_max_connections,
        http_max_connections_per_peer=args.http_max_connections_per_peer,
        prices=dict(args.price),
        collector_id=args.collector_id,
        advertise=args.advertise,
        lease_s=args.lease_seconds,
    )
    raise_open_files_limit()
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
