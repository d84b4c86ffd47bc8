"""Command-line flags with GPUFLEET_* environment variables as fallback, validated alike.

Explicit flags win over the environment, which wins over the documented default. A
value from the environment goes through the same checks as the flag (its type, its
choices, booleans spelled one of a few ways): a bad one stops the program at start
with one line naming the flag and the variable, so a typo in a security setting
fails closed instead of leaving the setting off.

argparse does the parsing; this module only feeds it the environment. ConfigArgParse
and pydantic-settings do the same with more machinery (config files, models) that none
of gpufleet's three programs needs, and neither names the variable in its error.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

ENV_PREFIX = "GPUFLEET_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Set on each argparse action that has an environment variable: its name.
ENV_ATTRIBUTE = "gpufleet_env"

log = logging.getLogger(__name__)


def env_name(flag: str) -> str:
    """``--grpc-listen`` -> ``GPUFLEET_GRPC_LISTEN``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, a non-zero exit: what an operator should see instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and exit 2), like every other start-up error."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)")


def _convert(raw: str, kwargs: dict[str, Any]) -> Any:
    """``raw`` as argparse would take it for a flag declared with ``kwargs``."""
    convert: Callable[[str], Any] = kwargs.get("type") or str
    try:
        value = convert(raw)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ValueError(str(exc) or f"not a valid {getattr(convert, '__name__', 'value')}") from None
    choices = kwargs.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"choose from {', '.join(map(str, choices))}")
    return value


def parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {', '.join(TRUE_WORDS)} or {', '.join(w for w in FALSE_WORDS if w)}")


def _from_environment(raw: str, kwargs: dict[str, Any]) -> Any:
    action = kwargs.get("action")
    if action == "store_true":
        return parse_bool(raw)
    if action == "append":
        return [_convert(item.strip(), kwargs) for item in raw.split(",") if item.strip()]
    return _convert(raw, kwargs)


def add_flag(
    parser: argparse._ActionsContainer, flag: str, *aliases: str, default: Any = None, **kwargs: Any
) -> None:
    """Add ``flag`` whose default comes from its environment variable (checked now), then ``default``."""
    env = env_name(flag)
    raw = os.environ.get(env)
    value = False if default is None and kwargs.get("action") == "store_true" else default
    if raw is not None:
        try:
            value = _from_environment(raw, kwargs)
        except ValueError as exc:
            fail(f"{env}={raw!r} is not a valid value for {flag}: {exc}")
    help_text = kwargs.pop("help", "")
    shown = f" (env {env}; default: {default})" if default not in (None, False, [], "") else f" (env {env})"
    action = parser.add_argument(flag, *aliases, default=value, help=help_text + shown, **kwargs)
    setattr(action, ENV_ATTRIBUTE, env)


def known_variables(parser: argparse.ArgumentParser) -> set[str]:
    """The GPUFLEET_* variables ``parser`` (and its subcommands) read."""
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= known_variables(sub)
        elif env := getattr(action, ENV_ATTRIBUTE, None):
            names.add(env)
    return names


def unknown_variables(parser: argparse.ArgumentParser) -> list[str]:
    """One warning per GPUFLEET_* variable that ``parser`` does not read (a typo, most likely)."""
    known = known_variables(parser)
    warnings = []
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{name} is set but {parser.prog} has no such setting (ignored){hint}")
    return warnings


def warn_unknown_variables(parser: argparse.ArgumentParser) -> None:
    for warning in unknown_variables(parser):
        log.warning("%s", warning)


# -- types for flags (each also checks the environment's value) -------------------------


def parse_host_port(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port`` -> (host, port), with a clear error."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or default_host
    if "/" in host or " " in host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def host_port(value: str) -> str:
    """A HOST:PORT flag value, checked and kept as text (a gRPC target)."""
    parse_host_port(value)
    return value


def host_ports(value: str) -> list[str]:
    """``a:1,b:2`` -> ``["a:1", "b:2"]``, each checked as HOST:PORT."""
    targets = [item.strip() for item in value.split(",") if item.strip()]
    if not targets:
        raise argparse.ArgumentTypeError("expected HOST:PORT[,HOST:PORT...]")
    for target in targets:
        parse_host_port(target)
    return targets


def _number(convert: Callable[[str], float], minimum: float, inclusive: bool) -> Callable[[str], Any]:
    def check(value: str) -> Any:
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if math.isnan(number) or (number < minimum if inclusive else number <= minimum):
            bound = f"at least {minimum:g}" if inclusive else f"more than {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value!r}")
        return number

    check.__name__ = f"{convert.__name__} {'>=' if inclusive else '>'} {minimum:g}"
    return check


positive_float = _number(float, 0, inclusive=False)
non_negative_float = _number(float, 0, inclusive=True)
positive_int = _number(int, 1, inclusive=True)
non_negative_int = _number(int, 0, inclusive=True)


def at_least(minimum: float) -> Callable[[str], Any]:
    return _number(float, minimum, inclusive=True)


def pem_file(value: str) -> str:
    """A readable PEM file ('' means not set)."""
    if not value:
        return value
    try:
        text = Path(value).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None
    if b"-----BEGIN " not in text:
        raise argparse.ArgumentTypeError(f"{value} is not a PEM file (no '-----BEGIN' line)")
    return value


def readable_file(value: str) -> str:
    """A file that can be read now ('' means not set)."""
    if value:
        try:
            Path(value).read_bytes()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None
    return value


def log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(LOG_LEVELS)}")
    return level


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# -- shared flags and helpers --------------------------------------------------------------


def setup_logging(level: str) -> None:
    """Log lines to stderr, once per process (only called from entry points)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def add_log_level(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--log-level", default="info", type=log_level, help=f"one of {', '.join(LOG_LEVELS)}")


def labels_from_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``["rack=r1", "zone=a"]`` -> ``{"rack": "r1", "zone": "a"}``."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value, got {pair!r}")
        labels[key.strip()] = value.strip()
    return labels


def label_pair(value: str) -> str:
    """A KEY=VALUE flag value, checked."""
    labels_from_pairs([value])
    return value


def price_pair(value: str) -> tuple[str, float]:
    """A MODEL=PRICE flag value: a GPU model (part of its name) and a price per GPU-hour."""
    model, sep, price = value.partition("=")
    if not sep or not model.strip():
        raise argparse.ArgumentTypeError(f"expected MODEL=PRICE (e.g. H100=2.50), got {value!r}")
    try:
        amount = float(price)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the price in {value!r} is not a number") from None
    if not 0 < amount < float("inf"):
        raise argparse.ArgumentTypeError(f"the price in {value!r} must be a positive number")
    return model.strip(), amount
