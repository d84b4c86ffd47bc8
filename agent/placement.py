"""Which collector serves a node: rendezvous hashing over the collectors the agent is given.

Every node ranks the collectors by a hash of its node id and each collector's address and
prefers the first (highest random weight, Thaler and Ravishankar's rendezvous hashing). Each
node computes its ranking alone, from the same inputs, so the fleet agrees on who owns whom
without asking anyone. Rendezvous rather than ``hash(node) % N``: when one collector leaves,
only the nodes it owned move (each to its own second choice, so they spread over the others),
and a collector that joins takes about 1/N of the nodes, from every other collector alike; with
a modulo nearly every node would move (vmagent's static cluster split has that problem).

A collector address that is a DNS name counts as every address it resolves to (a Kubernetes
headless Service, a round-robin record): ``members`` resolves it again each time it is called,
so the members follow the name.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from gpufleet.rendezvous import rank, weight
from gpufleet.settings import parse_host_port

log = logging.getLogger(__name__)

__all__ = ["expand", "members", "rank", "weight"]

# socket.getaddrinfo's signature, for tests and callers that resolve differently.
Resolve = Callable[..., list[tuple[Any, ...]]]

# Configured names that did not resolve, logged once each (in this process, however many
# simulated nodes share the name) until they resolve again.
_unresolved: set[str] = set()


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _member(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """``ip:port`` in one spelling, so that every agent hashes a collector alike."""
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _host_port(address: str) -> tuple[str, int]:
    try:
        return parse_host_port(address)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"collector address: {exc}") from None


def needs_resolving(addresses: Sequence[str]) -> bool:
    """True if any address is a host name (``members`` then asks the resolver, which may block)."""
    return any(_literal(_host_port(address)[0]) is None for address in addresses)


def members(addresses: Sequence[str], resolve: Resolve | None = None) -> dict[str, str | None]:
    """Each member (``ip:port``) of the collectors at ``addresses``, with the host name it was
    resolved from (None for a literal address): a name stands for every address it resolves to
    (IPv4 and IPv6, TCP). A name that does not resolve is skipped (and logged once, until it
    resolves again); when nothing resolves, the addresses as given, so that gRPC's own resolver
    says what is wrong with them."""
    resolve = resolve or socket.getaddrinfo
    found: dict[str, str | None] = {}
    for address in addresses:
        host, port = _host_port(address)
        literal = _literal(host)
        if literal is not None:
            found.setdefault(_member(literal, port), None)
            continue
        ips = _resolve(address, host, port, resolve)
        for ip in ips:
            found.setdefault(_member(ip, port), host)
    return found or dict.fromkeys(addresses)


def expand(addresses: Sequence[str], resolve: Resolve | None = None) -> list[str]:
    """The members of the collectors at ``addresses`` (see ``members``)."""
    return list(members(addresses, resolve))


def _resolve(
    address: str, host: str, port: int, resolve: Resolve
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        _skip(address, f"does not resolve ({exc})")
        return []
    ips = [
        ip
        for family, *_, sockaddr in infos
        if family in (socket.AF_INET, socket.AF_INET6) and (ip := _literal(str(sockaddr[0]))) is not None
    ]
    if not ips:
        _skip(address, "resolves to no IP address")
    elif address in _unresolved:
        _unresolved.discard(address)
        log.info("collector address %s resolves again", address)
    return ips


def _skip(address: str, why: str) -> None:
    if address not in _unresolved:
        _unresolved.add(address)
        log.warning("collector address %s %s; skipped until it resolves", address, why)
