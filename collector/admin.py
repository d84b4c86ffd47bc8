"""AdminService: changes to the fleet's state (admin tokens only, when tokens are in use)."""

from __future__ import annotations

import logging

import grpc

from gpufleet.collector.state import FleetState
from gpufleet.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, state: FleetState) -> None:
        self._state = state

    async def ForgetNode(  # noqa: N802
        self, request: admin_pb2.ForgetNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ForgetNodeResponse:
        node = self._state.find(request.node)
        if node is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no node named or with id {request.node!r}")
        assert node is not None
        if node.streams:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"node {node.name} is connected; stop its agent first"
            )
        self._state.forget(node)
        log.info("forgot node %s (%s)", node.name, node.node_id)
        return admin_pb2.ForgetNodeResponse(node_id=node.node_id)
