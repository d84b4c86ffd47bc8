"""Settings both ends of the gRPC connection must agree on."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

PROTOCOL_VERSION = 1

# gRPC's default receive limit. An 8-GPU report is about 2 KiB; a query page
# is kept well under this by its page size.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Agents ping every 30 s by default, so a dead collector (or a hung one:
# SIGSTOP) is noticed within the ping interval plus KEEPALIVE_TIMEOUT_MS. The
# server must permit pings this often, or it answers with GOAWAY
# "too_many_pings": it accepts one every MIN_PING_INTERVAL_MS at most.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 5_000

# Trailing metadata of a RESOURCE_EXHAUSTED answer: when to try again.
RETRY_AFTER_KEY = "retry-after-ms"


def client_options(keepalive_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Channel options for agents and the CLI; ``keepalive_ms`` is clamped to what servers accept."""
    keepalive_ms = max(keepalive_ms, MIN_PING_INTERVAL_MS)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", min(KEEPALIVE_TIMEOUT_MS, keepalive_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # One TCP connection per channel, even for many simulated nodes in one
        # process: otherwise grpc shares one connection between all of them.
        ("grpc.use_local_subchannel_pool", 1),
    ]


CLIENT_OPTIONS = client_options()

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 5),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def message_dict(message: Any) -> dict[str, Any]:
    """A message as JSON-ready data, with zero values (GPU index 0) shown."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
