"""gpufleet-collector: the central service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import gpufleet
from collector.auth import BasicAuth, ServerSecurity, Tokens, TokensFileError
from collector.ingest import IngestPolicy
from collector.limits import Limits
from collector.mqtt import MqttConfig
from collector.service import Collector, CollectorConfig
from collector.state import Liveness
from gpufleet.settings import add_flag, add_log_level, fail, parse_host_port, setup_logging
from gpufleet.signals import stop_on_signals

log = logging.getLogger("collector")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        type=float,
        default=3.0,
        help="a node is stale after this many missed report intervals",
    )
    add_flag(
        parser,
        "--down-after-intervals",
        type=float,
        default=10.0,
        help="a node is down after this many missed report intervals",
    )
    add_flag(
        parser,
        "--db",
        default="gpufleet-collector.db",
        help="SQLite database for the fleet's inventory, watermarks and event log ('none': memory only)",
    )
    add_flag(
        parser,
        "--admission-rate",
        type=float,
        default=500.0,
        help="new agent streams accepted per second before agents are told when to retry",
    )
    add_flag(parser, "--admission-burst", type=int, default=500, help="new agent streams accepted at once")
    security = parser.add_argument_group("security (docs/security.md)")
    add_flag(security, "--tls-cert", default="", help="serve gRPC and HTTP with TLS: certificate (PEM)")
    add_flag(security, "--tls-key", default="", help="the certificate's private key (PEM)")
    add_flag(
        security,
        "--tls-client-ca",
        default="",
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
        help="'user:password' lines for --metrics-auth basic",
    )
    limits = parser.add_argument_group("limits on what agents send")
    defaults = Limits()
    add_flag(
        limits,
        "--max-gpus-per-node",
        type=int,
        default=defaults.max_gpus_per_node,
        help="GPUs a node may report",
    )
    add_flag(
        limits,
        "--max-labels-per-node",
        type=int,
        default=defaults.max_labels_per_node,
        help="operator labels a node may carry",
    )
    add_flag(
        limits,
        "--reports-per-second",
        type=float,
        default=defaults.reports_per_second,
        help="sustained reports per second per node (bursts of --report-burst allowed)",
    )
    add_flag(
        limits,
        "--report-burst",
        type=int,
        default=defaults.report_burst,
        help="reports a node may send at once",
    )
    add_flag(
        limits, "--max-streams", type=int, default=defaults.max_streams, help="agent streams open at once"
    )
    add_flag(
        limits,
        "--hello-timeout",
        type=float,
        default=defaults.hello_timeout_s,
        help="seconds a new stream has to say hello",
    )
    mqtt = parser.add_argument_group("MQTT events (off unless --mqtt-broker is set)")
    add_flag(mqtt, "--mqtt-broker", default="", help="publish events to this broker, HOST:PORT")
    add_flag(mqtt, "--mqtt-username", default="", help="broker user name")
    add_flag(mqtt, "--mqtt-password-file", default="", help="file holding the broker password")
    add_flag(mqtt, "--mqtt-tls", action="store_true", help="connect to the broker with TLS")
    add_flag(mqtt, "--mqtt-ca-file", default="", help="CA certificate(s) to verify the broker with")
    add_flag(mqtt, "--mqtt-topic-prefix", default="gpufleet/v1", help="first levels of every topic")
    add_flag(
        mqtt,
        "--mqtt-queue-limit",
        type=int,
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
    except OSError as exc:
        fail(str(exc))
    stopping = asyncio.Event()
    stop_on_signals(stopping, "shutting down")
    await stopping.wait()
    await collector.stop()


def _readable(path: str, what: str) -> Path:
    """``path``, once it is known to be readable (so a typo is said at start, in one line)."""
    try:
        Path(path).read_bytes()
        return Path(path)
    except OSError as exc:
        fail(f"cannot read {what} {path}: {exc.strerror}")
        raise  # not reached


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
        tls_cert=_readable(args.tls_cert, "certificate") if args.tls_cert else None,
        tls_key=_readable(args.tls_key, "private key") if args.tls_key else None,
        client_ca=_readable(args.tls_client_ca, "client CA") if args.tls_client_ca else None,
        tokens=tokens,
        metrics_token=args.metrics_auth == "token",
        metrics_basic_auth=basic,
    )


def mqtt_config(args: argparse.Namespace) -> MqttConfig | None:
    if not args.mqtt_broker:
        return None
    try:
        host, port = parse_host_port(args.mqtt_broker)
    except argparse.ArgumentTypeError as exc:
        fail(f"--mqtt-broker: {exc}")
    password = None
    if args.mqtt_password_file:
        try:
            password = Path(args.mqtt_password_file).read_text().strip()
        except OSError as exc:
            fail(f"cannot read --mqtt-password-file: {exc}")
    if args.mqtt_queue_limit < 1:
        fail("--mqtt-queue-limit must be at least 1")
    return MqttConfig(
        host=host,
        port=port,
        username=args.mqtt_username or None,
        password=password,
        tls=args.mqtt_tls,
        ca_file=Path(args.mqtt_ca_file) if args.mqtt_ca_file else None,
        topic_prefix=args.mqtt_topic_prefix,
        queue_limit=args.mqtt_queue_limit,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if not 0 < args.stale_after_intervals < args.down_after_intervals:
        fail("need 0 < --stale-after-intervals < --down-after-intervals")
    if args.admission_rate <= 0 or args.admission_burst < 1:
        fail("need --admission-rate > 0 and --admission-burst >= 1")
    (grpc_host, grpc_port), (http_host, http_port) = args.grpc_listen, args.http_listen
    config = CollectorConfig(
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        http_host=http_host,
        http_port=http_port,
        liveness=Liveness(args.stale_after_intervals, args.down_after_intervals),
        db_path=None if args.db.lower() in ("", "none") else Path(args.db),
        ingest=IngestPolicy(
            limits=Limits(
                max_gpus_per_node=args.max_gpus_per_node,
                max_labels_per_node=args.max_labels_per_node,
                reports_per_second=args.reports_per_second,
                report_burst=args.report_burst,
                max_streams=args.max_streams,
                hello_timeout_s=args.hello_timeout,
            ),
            admission_rate_per_s=args.admission_rate,
            admission_burst=args.admission_burst,
            bind_node_id_to_certificate=args.bind_node_id_to_cert,
        ),
        mqtt=mqtt_config(args),
        security=server_security(args),
    )
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
