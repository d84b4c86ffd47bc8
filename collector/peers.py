"""Asking the other collectors of a tier: the same question, each answering for the nodes it serves.

A collector that is asked a question about the fleet (`gpufleet summary`, `nodes`, `gpus`, ...)
answers for its own nodes and asks every live peer of the tier the same question, marked
`gpufleet-scope: member` (answer for your own nodes, ask nobody). Peers that do not answer in
PEER_TIMEOUT_S, or answer what does not parse, are named in the answer's coverage: the result is
then partial, made only of what was answered, never of a guess.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpufleet import wire
from gpufleet.collector.tier import Member, Tier
from gpufleet.v1 import query_pb2

log = logging.getLogger(__name__)

SCOPE_KEY = "gpufleet-scope"
MEMBER_SCOPE = "member"
PEER_TIMEOUT_S = 2.0
SERVICE = "/gpufleet.v1.QueryService/"


@dataclass
class Gathered:
    """The peers' answers to one question, and who answered."""

    answers: list[Any] = field(default_factory=list)
    # Peers that answered NOT_FOUND (for questions about one node or its events).
    not_found: int = 0
    coverage: query_pb2.Coverage = field(default_factory=query_pb2.Coverage)


def member_scoped(context: grpc.aio.ServicerContext) -> bool:
    """Whether the caller is a peer asking for this collector's own nodes only."""
    return any(
        key == SCOPE_KEY and value == MEMBER_SCOPE for key, value in context.invocation_metadata() or ()
    )


class Peers:
    """Channels to the tier's live peers, and the gathering of their answers."""

    def __init__(self, tier: Tier, credentials: grpc.ChannelCredentials | None = None) -> None:
        self._tier = tier
        self._credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}

    def members(self) -> list[Member]:
        """The live peers, as of the tier's last renewal."""
        return list(self._tier.peers)

    def _channel(self, member: Member) -> grpc.aio.Channel:
        channel = self._channels.get(member.address)
        if channel is None:
            options = list(wire.CLIENT_OPTIONS)
            channel = (
                grpc.aio.insecure_channel(member.address, options=options)
                if self._credentials is None
                else grpc.aio.secure_channel(member.address, self._credentials, options=options)
            )
            self._channels[member.address] = channel
        return channel

    async def gather(
        self,
        method: str,
        request: Any,
        response_type: Callable[[bytes], Any],
        context: grpc.aio.ServicerContext,
    ) -> Gathered:
        """Ask every live peer ``method`` (with the caller's token); count this collector as answered."""
        peers = list(self._tier.peers)
        await self._close_gone({peer.address for peer in peers})
        metadata = [(SCOPE_KEY, MEMBER_SCOPE)]
        metadata += [(k, v) for k, v in context.invocation_metadata() or () if k == "authorization"]
        results = await asyncio.gather(
            *(self._ask(peer, method, request, response_type, metadata) for peer in peers)
        )
        gathered = Gathered(coverage=query_pb2.Coverage(collectors=len(peers) + 1, answered=1))
        for peer, (status, answer) in zip(peers, results, strict=True):
            if status == grpc.StatusCode.OK:
                gathered.answers.append(answer)
                gathered.coverage.answered += 1
            elif status == grpc.StatusCode.NOT_FOUND:
                gathered.not_found += 1
                gathered.coverage.answered += 1
            else:
                gathered.coverage.missing.append(peer.collector_id)
        return gathered

    async def _ask(
        self,
        peer: Member,
        method: str,
        request: Any,
        response_type: Callable[[bytes], Any],
        metadata: Sequence[tuple[str, str]],
    ) -> tuple[grpc.StatusCode, Any]:
        call = self._channel(peer).unary_unary(
            SERVICE + method, request_serializer=type(request).SerializeToString, response_deserializer=None
        )
        try:
            raw = await call(request, timeout=PEER_TIMEOUT_S, metadata=tuple(metadata))
            return grpc.StatusCode.OK, response_type(raw)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.debug("peer %s did not answer %s: %s", peer.collector_id, method, exc.code().name)
            return exc.code(), None
        except Exception as exc:  # an answer that does not parse: that peer is missing, not wrong
            log.warning("peer %s answered %s with what does not parse: %s", peer.collector_id, method, exc)
            return grpc.StatusCode.DATA_LOSS, None

    async def _close_gone(self, live: set[str]) -> None:
        gone = [self._channels.pop(a) for a in [a for a in self._channels if a not in live]]
        for channel in gone:
            await channel.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
