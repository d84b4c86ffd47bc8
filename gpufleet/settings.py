"""Command-line flags with GPUFLEET_* environment variables as fallback.

Explicit flags win over the environment, which wins over the documented default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

ENV_PREFIX = "GPUFLEET_"


def env_name(flag: str) -> str:
    """``--grpc-listen`` -> ``GPUFLEET_GRPC_LISTEN``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_flag(
    parser: argparse._ActionsContainer, flag: str, *aliases: str, default: Any = None, **kwargs: Any
) -> None:
    """Add ``flag`` whose default comes from its environment variable, then ``default``."""
    env = env_name(flag)
    value = os.environ.get(env)
    if value is not None and kwargs.get("action") == "store_true":
        value = value.lower() in ("1", "true", "yes", "on")  # type: ignore[assignment]
    elif value is not None and kwargs.get("action") == "append":
        value = [item for item in value.split(",") if item]  # type: ignore[assignment]
    help_text = kwargs.pop("help", "")
    shown = f" (env {env}; default: {default})" if default not in (None, False, []) else f" (env {env})"
    parser.add_argument(
        flag, *aliases, default=default if value is None else value, help=help_text + shown, **kwargs
    )


def parse_host_port(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port`` -> (host, port), with a clear error."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return (host.strip("[]") or default_host), int(port)


def setup_logging(level: str) -> None:
    """Log lines to stderr, once per process (only called from entry points)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def add_log_level(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log verbosity",
    )


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, a non-zero exit: what an operator should see instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def labels_from_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``["rack=r1", "zone=a"]`` -> ``{"rack": "r1", "zone": "a"}``."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value, got {pair!r}")
        labels[key.strip()] = value.strip()
    return labels
