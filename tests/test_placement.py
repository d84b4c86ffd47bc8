"""Placement: rendezvous ranking of the collectors, and names that stand for several of them."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from gpufleet.agent import placement
from gpufleet.agent.placement import expand, members, rank, weight

THREE = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
FIVE = [f"10.0.0.{n}:50051" for n in range(1, 6)]
NODES = [hashlib.sha256(f"node-{index}".encode()).hexdigest()[:32] for index in range(10_000)]


def owners(collectors: list[str]) -> dict[str, str]:
    return {node: rank(node, collectors)[0] for node in NODES}


# -- ranking ------------------------------------------------------------------------------------


def test_the_ranking_is_the_same_everywhere() -> None:
    """Golden values: a change here moves nodes between collectors in every fleet that upgrades."""
    assert weight("node-a", "10.0.0.1:50051") == 1444826603035988718
    assert rank("node-a", THREE) == ["10.0.0.3:50051", "10.0.0.2:50051", "10.0.0.1:50051"]
    assert rank("node-b", THREE) == ["10.0.0.2:50051", "10.0.0.3:50051", "10.0.0.1:50051"]
    assert rank("", THREE) == ["10.0.0.1:50051", "10.0.0.3:50051", "10.0.0.2:50051"]


def test_the_ranking_does_not_depend_on_the_process_or_the_order_given() -> None:
    code = f"from gpufleet.agent.placement import rank; print(rank('node-b', {THREE[::-1]!r}))"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == repr(rank("node-b", THREE))
    assert rank("node-b", THREE) == rank("node-b", THREE[::-1]) == rank("node-b", [*THREE, THREE[0]])


@pytest.mark.parametrize("collectors", [THREE, FIVE], ids=["3", "5"])
def test_nodes_spread_evenly_over_the_collectors(collectors: list[str]) -> None:
    share = len(NODES) / len(collectors)
    counts = Counter(owners(collectors).values())
    assert set(counts) == set(collectors)
    assert all(0.9 * share <= count <= 1.1 * share for count in counts.values()), counts


@pytest.mark.parametrize("collectors", [THREE, FIVE], ids=["3", "5"])
def test_removing_a_collector_moves_only_its_nodes_and_spreads_them(collectors: list[str]) -> None:
    before = owners(collectors)
    gone = collectors[0]
    after = owners(collectors[1:])
    moved = {node for node in NODES if before[node] != after[node]}
    assert moved == {node for node in NODES if before[node] == gone}
    # Each goes to its own second choice: the others share the load about equally.
    share = len(moved) / (len(collectors) - 1)
    landed = Counter(after[node] for node in moved)
    assert all(0.8 * share <= count <= 1.2 * share for count in landed.values()), landed


@pytest.mark.parametrize("collectors", [THREE, FIVE], ids=["3", "5"])
def test_adding_a_collector_moves_about_one_in_n_all_to_it(collectors: list[str]) -> None:
    before = owners(collectors)
    new = "10.0.0.99:50051"
    after = owners([*collectors, new])
    moved = [node for node in NODES if before[node] != after[node]]
    assert all(after[node] == new for node in moved)
    expected = len(NODES) / (len(collectors) + 1)
    assert 0.9 * expected <= len(moved) <= 1.1 * expected, len(moved)
    # What rendezvous hashing saves: a modulo split over one more collector moves most nodes.
    modulo_moved = sum(
        1 for node in NODES if int(node, 16) % len(collectors) != int(node, 16) % (len(collectors) + 1)
    )
    assert modulo_moved > 0.7 * len(NODES)


# -- names that stand for several collectors ----------------------------------------------------


def fake_dns(table: dict[str, list[str]]) -> placement.Resolve:
    """A resolver answering from ``table`` (name -> IPs) as getaddrinfo does, failing for the rest."""

    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in table[host]
        ]

    return resolve


def test_a_name_counts_as_every_address_it_resolves_to() -> None:
    resolve = fake_dns({"localhost": ["127.0.0.1", "::1"], "collectors.example": ["10.0.0.7", "10.0.0.8"]})
    assert expand(["localhost:50051"], resolve) == ["127.0.0.1:50051", "[::1]:50051"]
    assert members(["collectors.example:7000", "10.0.0.1:7000", "10.0.0.7:7000"], resolve) == {
        "10.0.0.7:7000": "collectors.example",
        "10.0.0.8:7000": "collectors.example",
        "10.0.0.1:7000": None,
    }


def test_literal_addresses_are_kept_in_one_spelling_without_asking_the_resolver() -> None:
    def no_dns(*_: Any, **__: Any) -> list[tuple[Any, ...]]:
        raise AssertionError("a literal address was resolved")

    given = ["[::1]:50051", "[0:0::1]:50051", "127.0.0.1:50051", ":50052"]
    assert expand(given, no_dns) == ["[::1]:50051", "127.0.0.1:50051", "127.0.0.1:50052"]
    assert not placement.needs_resolving(given)
    assert placement.needs_resolving([*given, "collector:50051"])


def test_this_machine_resolves_localhost_to_loopback_members() -> None:
    found = expand(["localhost:50051"])
    assert found and set(found) <= {"127.0.0.1:50051", "[::1]:50051"}, found


def test_a_name_that_does_not_resolve_is_skipped_and_logged_once_until_it_resolves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gpufleet.agent.placement")
    table: dict[str, list[str]] = {"a.example": ["10.0.0.1"]}
    resolve = fake_dns(table)
    given = ["a.example:50051", "b.example:50051"]
    for _ in range(3):
        assert expand(given, resolve) == ["10.0.0.1:50051"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "b.example:50051" in warnings[0] and "does not resolve" in warnings[0]
    table["b.example"] = ["10.0.0.2"]
    assert expand(given, resolve) == ["10.0.0.1:50051", "10.0.0.2:50051"]
    assert "b.example:50051 resolves again" in caplog.text
    del table["b.example"]
    expand(given, resolve)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2  # logged anew


def test_when_nothing_resolves_the_names_are_kept_for_grpc_to_explain() -> None:
    given = ["nowhere.example:50051", "nothing.example:50051"]
    assert members(given, fake_dns({})) == dict.fromkeys(given)
    assert rank("node-a", expand(given, fake_dns({})))  # still a ranking to try


def test_a_malformed_address_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        expand(["collector"])
