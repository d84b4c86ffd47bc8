"""Rendezvous hashing (highest random weight): who serves a node, from its id and the members alone.

Agents rank the collectors they are given to pick one (`agent/placement.py`); collectors rank the
live members of their tier the same way to share out the nodes no agent brought (a node that is
down when its collector died), so both sides agree on each node's preferred collector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def weight(node_id: str, member: str) -> int:
    """The node's weight for one collector: the same in every process, on every Python."""
    digest = hashlib.blake2b(f"{node_id}\0{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(node_id: str, collectors: Sequence[str]) -> list[str]:
    """The collectors in the order ``node_id`` tries them: its preferred one first."""
    return sorted(dict.fromkeys(collectors), key=lambda member: (-weight(node_id, member), member))
