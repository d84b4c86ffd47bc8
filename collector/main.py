"""gpufleet-collector: the central service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import gpufleet
from collector.mqtt import MqttConfig
from collector.service import Collector, CollectorConfig
from collector.state import Liveness
from gpufleet.settings import add_flag, add_log_level, fail, parse_host_port, setup_logging

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
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("shutting down (signal again to exit at once)")
            stopping.set()
        else:
            for task in asyncio.all_tasks(loop):
                task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stopping.wait()
    await collector.stop()


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
        admission_rate_per_s=args.admission_rate,
        admission_burst=args.admission_burst,
        mqtt=mqtt_config(args),
    )
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
