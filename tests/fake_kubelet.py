"""A stand-in kubelet: the real pod-resources v1 service on a real unix socket, and a liar beside it.

:class:`FakeKubelet` serves the generated ``v1.PodResourcesLister`` with grpc.aio, so the agent's
client meets the same wire as on a node. Pods come and go while it runs; it can hang (take a
call and never answer) or answer UNIMPLEMENTED where old kubelets do. :func:`garbage_server` is
something else listening on the socket: it answers every connection with bytes that are not HTTP/2.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import grpc

from gpufleet.kubelet.podresources.v1 import api_pb2, api_pb2_grpc

# A container's devices: (resource name, device ids) pairs.
Devices = Iterable[tuple[str, Iterable[str]]]


def pod(namespace: str, name: str, containers: Mapping[str, Devices]) -> api_pb2.PodResources:
    """A pod as the kubelet lists it, its containers each with the devices they were given."""
    return api_pb2.PodResources(
        name=name,
        namespace=namespace,
        containers=[
            api_pb2.ContainerResources(
                name=container,
                devices=[
                    api_pb2.ContainerDevices(resource_name=resource, device_ids=list(ids))
                    for resource, ids in devices
                ],
            )
            for container, devices in containers.items()
        ],
    )


class _Lister(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet

    async def List(  # noqa: N802
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        self.kubelet.list_calls += 1
        await self.kubelet.answering()
        return api_pb2.ListPodResourcesResponse(pod_resources=list(self.kubelet.pods.values()))

    async def GetAllocatableResources(  # noqa: N802
        self, request: api_pb2.AllocatableResourcesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AllocatableResourcesResponse:
        if not self.kubelet.serves_allocatable:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown method GetAllocatableResources")
        await self.kubelet.answering()
        return api_pb2.AllocatableResourcesResponse(devices=self.kubelet.allocatable)


class FakeKubelet:
    """A kubelet's pod-resources server on ``socket_path``; start() again after stop() to "restart" it."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.pods: dict[tuple[str, str], api_pb2.PodResources] = {}
        self.allocatable: list[api_pb2.ContainerDevices] = []
        self.serves_allocatable = True
        self.hang = False
        self.list_calls = 0
        self._server: grpc.aio.Server | None = None
        self._released = asyncio.Event()

    def add(self, resources: api_pb2.PodResources) -> None:
        self.pods[(resources.namespace, resources.name)] = resources

    def remove(self, namespace: str, name: str) -> None:
        del self.pods[(namespace, name)]

    async def answering(self) -> None:
        """Return at once, or (hanging) only when the server stops: a call that never gets its answer."""
        if self.hang:
            await self._released.wait()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a kubelet replaces the socket a previous one left
        self._released = asyncio.Event()
        self._server = grpc.aio.server()
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Lister(self), self._server)
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        await self._server.start()

    async def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


@contextlib.asynccontextmanager
async def running_kubelet(socket_path: Path) -> AsyncIterator[FakeKubelet]:
    kubelet = FakeKubelet(socket_path)
    await kubelet.start()
    try:
        yield kubelet
    finally:
        await kubelet.stop()


@contextlib.asynccontextmanager
async def garbage_server(socket_path: Path) -> AsyncIterator[asyncio.Server]:
    """A unix socket whose listener writes junk to whoever connects, then hangs up."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\xffNOT-HTTP/2 \xde\xad\xbe\xef\r\n" * 64)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, path=str(socket_path))
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


class _SyncLister(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: ThreadedKubelet) -> None:
        self.kubelet = kubelet

    def List(  # noqa: N802
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        return api_pb2.ListPodResourcesResponse(pod_resources=list(self.kubelet.pods.values()))


class ThreadedKubelet:
    """The same service on grpc's threaded server, for tests that have no event loop of their own
    (a grpc.aio server on a second thread's loop would share grpc's process-wide aio state)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        # Replaced whole by the test (one atomic swap), read by the server's threads.
        self.pods: dict[tuple[str, str], api_pb2.PodResources] = {}
        self._server: grpc.Server | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_SyncLister(self), self._server)
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
